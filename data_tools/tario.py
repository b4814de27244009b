"""Deterministic, atomic file output: tar shards with fixed metadata, JSON written by rename.

Why fixed metadata: the same input must give byte-identical shards (reproducible sha256 in the
manifest, cheap "did anything change?" checks, and resumable Slurm array jobs that may rewrite a
shard another task already wrote). Why temp name + ``os.replace``: a reader (or a resumed run)
never sees a half-written shard or manifest under its final name.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable
from spade_dist.files import sha256_file  # noqa: F401 - re-exported

# GNU format: no PAX headers (which could carry host-dependent fields), long member names allowed.
TAR_FORMAT = tarfile.GNU_FORMAT
TAR_BLOCK = tarfile.BLOCKSIZE  # 512
TAR_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive end to a multiple of this
MEMBER_MODE = 0o644


def member_tar_bytes(payload_size: int) -> int:
    """Bytes one regular member occupies in a GNU tar: a header block plus the payload padded to 512."""
    return TAR_BLOCK + -(-payload_size // TAR_BLOCK) * TAR_BLOCK


def temp_name(final: Path) -> Path:
    """The temp file a writer uses for ``final``; the pid keeps concurrent writers apart."""
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete leftovers ``final.tmp-*`` from an interrupted writer; returns what was removed."""
    removed = []
    for leftover in sorted(final.parent.glob(f"{final.name}.tmp-*")):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def write_tar_atomic(final: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``members`` (name, payload) in the given order to ``final`` via a temp file + rename.

    Every header field that could vary between hosts or runs is pinned (mtime, owner, mode).
    """
    tmp = temp_name(final)
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=TAR_FORMAT) as tar:
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    info.mtime = 0
                    info.mode = MEMBER_MODE
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.type = tarfile.REGTYPE
                    tar.addfile(info, io.BytesIO(payload))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON bytes used for every file we write (stable across runs, diff-friendly)."""
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_bytes_atomic(final: Path, payload: bytes) -> None:
    """Write ``payload`` to ``final`` via a temp file + rename (readers see old or new, never half)."""
    tmp = temp_name(final)
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(final: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``final`` via a temp file + rename (readers see old or new, never half)."""
    write_bytes_atomic(final, dumps_json(obj))


def read_tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Read a shard into ``{key: {field: payload}}``, keeping member order. Raises tarfile.TarError."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, dot, field = base.partition(".")
            if not dot:
                raise tarfile.TarError(f"{path}: member {info.name!r} has no '.field' suffix")
            handle = tar.extractfile(info)
            assert handle is not None  # regular file
            samples.setdefault(key, {})[field] = handle.read()
    return samples
