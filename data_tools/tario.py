"""Deterministic tar shards: fixed member metadata, written atomically; reading them back.

Why fixed metadata: the same input must give byte-identical shards (reproducible sha256 in the
manifest, cheap "did anything change?" checks, and resumable Slurm array jobs that may rewrite a
shard another task already wrote). Shards are written with :func:`spade_dist.files.atomic_output`:
a reader (or a resumed run) never sees a half-written shard under its final name.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterable

from spade_dist.files import atomic_output

# GNU format: no PAX headers (which could carry host-dependent fields), long member names allowed.
TAR_FORMAT = tarfile.GNU_FORMAT
TAR_BLOCK = tarfile.BLOCKSIZE  # 512
TAR_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive end to a multiple of this
MEMBER_MODE = 0o644


def member_tar_bytes(payload_size: int) -> int:
    """Bytes one regular member occupies in a GNU tar: a header block plus the payload padded to 512."""
    return TAR_BLOCK + -(-payload_size // TAR_BLOCK) * TAR_BLOCK


def write_tar_atomic(final: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``members`` (name, payload) in the given order to ``final`` via a temp file + rename.

    Every header field that could vary between hosts or runs is pinned (mtime, owner, mode).
    """
    with atomic_output(final) as raw:
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
