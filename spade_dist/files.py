"""Small file helpers shared by data_tools, checkpoints and evaluation."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, streamed (multi-GB shards and checkpoints need not fit in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
