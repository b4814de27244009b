"""Small file helpers shared by data_tools, checkpoints, evaluation and the run directory."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Union

# Files meant for other services (Prometheus discovery targets, galleries, reports, run markers)
# must be readable by a server running as another user: mkstemp alone creates them 0600.
SHARED_FILE_MODE = 0o644


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, streamed (multi-GB shards and checkpoints need not fit in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_atomic(path: Union[str, Path], data: Union[str, bytes], mode: int = SHARED_FILE_MODE,
                 fsync: bool = False) -> Path:
    """Write ``data`` through a temp file in the same directory + ``os.replace``: a concurrent
    reader (Prometheus, a browser, the FID watcher, a batch script) sees the old or the new file,
    never half of one. The file gets ``mode`` (default 0644: world-readable) whatever the umask
    does to mkstemp's 0600. ``fsync`` makes the content durable before the rename (markers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class UnsafeNameError(ValueError):
    """A name read from data (a sample key) that would escape its directory if used in a path."""


def check_path_component(name: str, what: str) -> str:
    """Return ``name`` if it is safe as one file name component, else raise :class:`UnsafeNameError`.

    Sample keys come from shards and manifests, i.e. from whoever produced the data; they become file
    names (``spade-generate``'s outputs). A separator, a ``..`` / ``.`` component, an empty name or a NUL
    would write outside the intended directory or fail obscurely, so such keys are rejected outright
    rather than rewritten (two rewritten keys could collide)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or ".." in name):
        raise UnsafeNameError(f"{what}: unsafe sample key {name!r} (path separators, '..' and empty keys are not allowed)")
    return name
