"""Progress bars for long command-line phases (tqdm on stderr).

Shown only on rank 0, only when stderr is a terminal (no bar noise in Slurm logs, pipes or CI), and
never when the user asked for ``--no-progress``.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

from tqdm import tqdm


def progress_wanted(requested: bool = True, rank: int = 0) -> bool:
    """Whether to draw bars: asked for (no ``--no-progress``), rank 0, and stderr is a terminal."""
    return requested and rank == 0 and sys.stderr.isatty()


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, total: Optional[float] = None, desc: str,
                 unit: str = "it", enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr (``disable`` when not ``enabled``: then it only passes items through)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)
