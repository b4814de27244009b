"""Console output of a spade-dist process, through ``logging``, set up once by its entry point.

- ``spade_dist.train`` (:data:`PROGRESS_LOGGER`): the training loop's progress lines, printed as
  ``[spade-train] ...`` on stdout (flushed per line: batch logs and ``tail -f`` see them at once).
- every other logger (``spade_dist.checkpoint``, ``spade_dist.data``, libraries): time, name,
  level and message on stderr.
- Rank-aware: in a job of several processes only rank 0 prints INFO; the other ranks print
  warnings and errors, tagged with their rank, so N ranks do not print every line N times.

Library code only calls ``logging.getLogger(...)``; nothing is printed by a library function called
from a notebook or a test unless the caller configures logging (this module or its own).
"""
from __future__ import annotations

import logging
import os
import sys

PROGRESS_LOGGER = "spade_dist.train"
PROGRESS_PREFIX = "[spade-train]"


class _CurrentStream(logging.StreamHandler):
    """A handler on the *current* ``sys.stdout`` / ``sys.stderr`` (pytest and launchers may replace
    them; the stream a handler was made with may be closed by the time it writes), flushed per line."""

    def __init__(self, name: str) -> None:
        self.stream_name = name
        super().__init__(getattr(sys, name))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.stream_name)  # not setStream: it would flush the old one
        super().emit(record)
        self.flush()


def launch_rank() -> int:
    """This process's global rank as its launcher set it (``RANK``; 0 when started alone)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def configure_logging(rank: int, level: int = logging.INFO) -> None:
    """Set up the process's console output as described in the module docstring (replaces any
    earlier setup, so calling it again is harmless)."""
    main = rank == 0
    tag = "" if main else f"rank {rank} "
    logging.basicConfig(level=level if main else max(level, logging.WARNING), force=True,
                        handlers=[_CurrentStream("stderr")],
                        format=f"%(asctime)s {tag}%(name)s %(levelname)s %(message)s")
    progress = logging.getLogger(PROGRESS_LOGGER)
    for handler in list(progress.handlers):
        progress.removeHandler(handler)
    handler = _CurrentStream("stdout")
    handler.setFormatter(logging.Formatter(f"{PROGRESS_PREFIX} {tag}%(message)s"))
    progress.addHandler(handler)
    progress.setLevel(level if main else max(level, logging.WARNING))
    progress.propagate = False
