"""On-disk layout of checkpoints: step directory names, the COMMITTED marker, scanning, retention.

A step directory is trusted only when its ``COMMITTED`` marker exists, parses, and every file it
lists has the recorded size (and, when asked, sha256). The marker is written last, by rank 0, after
every rank finished writing, via a temporary file and ``os.replace`` — so a reader never sees a
half-written marker, and "latest" is found by scanning instead of following a symlink that could
race with a writer.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Union

from spade_dist.files import TEMP_INFIX, sha256_file, write_atomic
from spade_dist.run_dir import RunDir

MARKER_NAME = "COMMITTED"
CONFIG_NAME = "config.yaml"
FORMAT_VERSION = 1
log = logging.getLogger("spade_dist.checkpoint")
_STEP_RE = re.compile(r"^step-(\d{9,})$")


class InvalidCheckpoint(RuntimeError):
    """A step directory is not a usable checkpoint; the message says which file and why."""


class CheckpointIncompatibleError(ValueError):
    """A valid checkpoint that this run cannot continue from (different state names, or
    partitioned state on another world size); the message names the checkpoint and the fix."""


class ExistingCheckpointsError(CheckpointIncompatibleError):
    """A fresh start into a run directory that holds another run's checkpoints, with
    ``checkpoint.existing=refuse``; the message names the directory and the choices."""


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:09d}"


def step_of(path: Path) -> Optional[int]:
    match = _STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints_dir(run_dir: Union[str, Path]) -> Path:
    return RunDir(run_dir).checkpoints


def list_step_dirs(ckpt_dir: Path) -> list[Path]:
    """All ``step-*`` directories (committed or not), oldest first. A ``step-*`` symlink is refused
    (a warning, left alone): resume, retention and archiving act only on real directories inside
    the run directory, so a link can never make them read or delete something outside it."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        if step_of(path) is None:
            continue
        if path.is_symlink():
            log.warning("ignoring %s: a symlink (to %s), not a step directory; checkpoints must be real "
                        "directories inside the run directory", path, os.readlink(path))
        elif path.is_dir():
            found.append((step_of(path), path))
    return [p for _, p in sorted(found)]


def write_marker(step_dir: Path, step: int, world_size: int, extra: dict, with_sha256: bool = True) -> dict:
    """Describe every file in ``step_dir`` and write the marker atomically. Returns the marker."""
    files = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name != MARKER_NAME and TEMP_INFIX not in path.name:
            rel = path.relative_to(step_dir).as_posix()
            entry = {"size": path.stat().st_size}
            if with_sha256:
                entry["sha256"] = sha256_file(path)
            files[rel] = entry
    marker = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(),
              "world_size": world_size, "files": files, **extra}
    write_atomic(step_dir / MARKER_NAME, json.dumps(marker, indent=1, sort_keys=True))
    return marker


def read_marker(step_dir: Path) -> dict:
    path = Path(step_dir) / MARKER_NAME
    if not path.is_file():
        raise InvalidCheckpoint(f"{step_dir}: no {MARKER_NAME} marker (save interrupted or still running)")
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidCheckpoint(f"{path}: unreadable marker: {exc}") from exc
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or "step" not in marker:
        raise InvalidCheckpoint(f"{path}: marker lacks 'step' or 'files'")
    return marker


def validate_step_dir(step_dir: Path, check_sha256: bool = True) -> dict:
    """Return the marker if every listed file is present with its size (and sha256); else raise
    :class:`InvalidCheckpoint` naming the first bad file."""
    step_dir = Path(step_dir)
    if step_dir.is_symlink():
        raise InvalidCheckpoint(f"{step_dir}: a symlink, not a step directory; name the directory it points to "
                                f"({step_dir.resolve()}) instead")
    marker = read_marker(step_dir)
    for rel, entry in marker["files"].items():
        path = step_dir / rel
        if not path.is_file():
            raise InvalidCheckpoint(f"{path}: listed in {MARKER_NAME} but missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise InvalidCheckpoint(f"{path}: size {size} != {entry.get('size')} recorded in {MARKER_NAME} (truncated?)")
        if check_sha256 and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            raise InvalidCheckpoint(f"{path}: sha256 differs from {MARKER_NAME} (corrupt)")
    return marker


def is_committed(step_dir: Path) -> bool:
    return (Path(step_dir) / MARKER_NAME).is_file()


def resolve_resume_target(resume: str, run_dir: Union[str, Path]) -> tuple[list[Path], bool]:
    """Turn ``resume`` (auto | none | PATH) into step directories to try, newest first.

    Returns (candidates, explicit). ``explicit`` is True when the user named one step directory: it
    must then be valid (no silent fallback to another checkpoint).
    PATH may be a step directory, a run directory, or its ``checkpoints`` directory.
    """
    if resume == "none":
        return [], False
    if resume == "auto":
        return list(reversed(list_step_dirs(checkpoints_dir(run_dir)))), False
    path = Path(resume)
    if not path.exists():
        raise InvalidCheckpoint(f"checkpoint path does not exist: {path}")
    if step_of(path) is not None:
        return [path], True
    for ckpt_dir in (path, checkpoints_dir(path)):
        dirs = list_step_dirs(ckpt_dir)
        if dirs:
            return list(reversed(dirs)), False
    raise InvalidCheckpoint(f"{path}: no checkpoint here (neither a step-* directory nor a directory holding step-* under itself or checkpoints/)")


def find_latest(path: Union[str, Path], check_sha256: bool = True,
                warn: Optional[Callable[[str], None]] = None) -> Path:
    """The newest valid step directory under a run dir / checkpoints dir, or ``path`` itself when it
    is a valid step directory. Invalid ones are reported through ``warn`` and skipped."""
    candidates, explicit = resolve_resume_target(str(path), ".")
    problems = []
    for step_dir in candidates:
        try:
            validate_step_dir(step_dir, check_sha256=check_sha256)
            return step_dir
        except InvalidCheckpoint as exc:
            if explicit:
                raise
            problems.append(str(exc))
            if warn is not None:
                warn(f"skipping checkpoint {step_dir}: {exc}")
    found = f"; skipped: {'; '.join(problems)}" if problems else ""
    raise InvalidCheckpoint(f"{path}: no valid committed checkpoint found{found}")


def select_prunable(committed_steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Steps to delete: everything but the newest ``keep_last`` and the multiples of ``keep_every``."""
    ordered = sorted(committed_steps)
    keep_last = max(keep_last, 1)  # the newest one always stays
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]


def lineage_of(step_dir: Path) -> Optional[str]:
    """The lineage id a committed checkpoint's marker records (None: unreadable or written before
    lineages existed)."""
    try:
        value = read_marker(step_dir).get("lineage")
    except InvalidCheckpoint:
        return None
    return value if isinstance(value, str) else None


def prune(ckpt_dir: Path, keep_last: int, keep_every: int, lineage: str, committed_step: int) -> list[Path]:
    """Delete this lineage's committed step directories that retention does not keep, after the
    commit of ``committed_step``.

    Only checkpoints whose marker carries ``lineage`` *and* whose step is at most ``committed_step``
    count and can go: another run's checkpoints, uncommitted ones (one may be in flight), ones without
    a lineage and ones with a higher step (left by an attempt this lineage fell back from) are never
    touched, so the checkpoint just committed is always the newest candidate and always kept.
    Deletion removes the marker first, so a concurrent reader sees "not committed" rather than a
    half-deleted checkpoint it still trusts."""
    committed = {step_of(p): p for p in list_step_dirs(ckpt_dir)
                 if is_committed(p) and step_of(p) <= committed_step and lineage_of(p) == lineage}
    removed = []
    for step in select_prunable(list(committed), keep_last, keep_every):
        path = committed[step]
        try:
            (path / MARKER_NAME).unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
