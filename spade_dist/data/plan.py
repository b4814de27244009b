"""The deterministic epoch plan, the per-rank/per-worker split and the resumable position.

Epoch plan: the shard order is permuted by (seed, epoch); concatenating the shards' samples in
that order numbers every sample of the epoch with a *global index* 0..N-1. The plan depends only
on the manifest, the seed and the epoch -- never on world size or workers -- so a position written
as "which global indices were delivered" can be resumed on any topology.

Split: the not-yet-delivered indices (in plan order) are cut into one contiguous range per rank,
and each rank's range into one contiguous range per DataLoader worker, with sizes chosen so that
EVERY RANK YIELDS THE SAME NUMBER OF FULL BATCHES (see :func:`rank_batch_sizes`; the samples left
over are reserves that refill batches around corrupt samples). Contiguous ranges mean each worker
streams only one or two shards, sequentially.

Position: a bitmap over the global indices of the current epoch (packed bits: 125 kB for a
million samples), plus the epoch and a fingerprint of (manifest shards, seed) so a position
is never applied to a different dataset. Positions of all ranks merge by OR.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from spade_dist.data.sources import ShardInfo

POSITION_FORMAT = 1


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from arbitrary parts, identical in every process (unlike ``hash(str)``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def plan_fingerprint(shards: Sequence[ShardInfo], seed: int, shuffle: bool) -> str:
    h = hashlib.sha256()
    h.update(repr((seed, shuffle)).encode())
    for shard in shards:
        h.update(shard.name.encode())
        h.update(b"\0")
        h.update("\n".join(shard.keys).encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Segment:
    """A worker's part of one shard: which keys to take and their global indices."""

    url: str
    name: str
    wanted: dict[str, int]  # key -> global index in the epoch plan


class EpochPlan:
    """Shard order and global sample numbering of one epoch."""

    def __init__(self, shards: Sequence[ShardInfo], seed: int, epoch: int, shuffle: bool) -> None:
        self.epoch = epoch
        order = list(range(len(shards)))
        if shuffle:
            order = list(np.random.default_rng(stable_seed("shard-order", seed, epoch)).permutation(len(shards)))
        self.shards = [shards[i] for i in order]
        counts = np.array([len(s.keys) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self.starts[-1])

    def segments(self, indices: np.ndarray) -> list[Segment]:
        """Group sorted global ``indices`` by shard, in plan order."""
        result: list[Segment] = []
        if indices.size == 0:
            return result
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for shard_pos in np.unique(shard_of):
            shard = self.shards[int(shard_pos)]
            chosen = indices[shard_of == shard_pos]
            offset = int(self.starts[shard_pos])
            wanted = {shard.keys[int(g) - offset]: int(g) for g in chosen}
            result.append(Segment(shard.url, shard.name, wanted))
        return result

    def key_of(self, index: int) -> str:
        shard_pos = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.shards[shard_pos].keys[index - int(self.starts[shard_pos])]


def rank_batch_sizes(num_samples: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Training batch sizes per rank: ``nb = n // (world * B)`` full batches on every rank.

    Every training batch holds exactly ``B`` samples (the official ``drop_last``): a batch of one
    sample cannot be normalised by BatchNorm (a 1 x 1 map at the generator's first layer), and one
    batch size keeps compiled graphs and memory constant. The ``n - nb * world * B`` samples left
    over are each rank's *reserve* (:func:`rank_reserves`): they refill batches whose samples turn out
    corrupt, and what a worker does not need of them is dropped for the epoch (counted, logged,
    marked delivered). Ranks get the same number of batches by construction.
    """
    per_rank = num_samples // (world_size * batch_size)
    return [[batch_size] * per_rank for _ in range(world_size)]


def rank_reserves(num_samples: int, world_size: int, batch_size: int) -> list[int]:
    """How many of the samples :func:`rank_batch_sizes` leaves over each rank gets as its reserve
    (spread as evenly as possible; zero for every rank when no rank gets a batch)."""
    per_rank = num_samples // (world_size * batch_size)
    if per_rank == 0:
        return [0] * world_size
    left = num_samples - per_rank * world_size * batch_size
    return [left // world_size + (1 if rank < left % world_size else 0) for rank in range(world_size)]


def eval_batch_sizes(num_samples: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Unpadded evaluation split: contiguous ranges of equal size (+-1) per rank, each cut into
    batches of ``batch_size`` with a smaller last one. Ranks may differ in batch count (no
    collectives run per evaluation batch)."""
    sizes = []
    for rank in range(world_size):
        count = num_samples // world_size + (1 if rank < num_samples % world_size else 0)
        sizes.append([batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else []))
    return sizes


def worker_batch_sizes(rank_sizes: list[int], num_workers: int) -> list[list[int]]:
    """Batch i of a rank comes from worker i % W (the DataLoader's round-robin order)."""
    workers = max(1, num_workers)
    return [rank_sizes[w::workers] for w in range(workers)]


def worker_reserves(reserve: int, per_worker: list[list[int]]) -> list[int]:
    """A rank's reserve spread over its workers that have batches (a worker without any could not use it)."""
    busy = [w for w, sizes in enumerate(per_worker) if sizes]
    counts = [0] * len(per_worker)
    for i, w in enumerate(busy):
        counts[w] = reserve // len(busy) + (1 if i < reserve % len(busy) else 0)
    return counts


def split_ranges(indices: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Cut ``indices`` into consecutive pieces of the given lengths."""
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if bounds[-1] != indices.size:
        raise ValueError(f"split of {indices.size} indices into counts summing to {bounds[-1]}")
    return [indices[bounds[i]:bounds[i + 1]] for i in range(len(counts))]


# --------------------------------------------------------------------------------------------
# Position
# --------------------------------------------------------------------------------------------


def make_position(epoch: int, delivered: np.ndarray, fingerprint: str) -> dict[str, Any]:
    return {
        "format": POSITION_FORMAT,
        "epoch": int(epoch),
        "num_samples": int(delivered.size),
        "fingerprint": fingerprint,
        "delivered": np.packbits(delivered.astype(bool)).tobytes(),
    }


def unpack_delivered(position: dict[str, Any]) -> np.ndarray:
    for field in ("format", "epoch", "num_samples", "fingerprint", "delivered"):
        if field not in position:
            raise ValueError(f"data loader position lacks {field!r} (keys: {sorted(position)})")
    if position["format"] != POSITION_FORMAT:
        raise ValueError(f"data loader position format {position['format']!r} is not {POSITION_FORMAT}")
    bits = np.unpackbits(np.frombuffer(position["delivered"], dtype=np.uint8), count=position["num_samples"])
    return bits.astype(bool)


def merge_positions(positions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Union of the ranks' delivered samples (all positions must be of the same epoch and plan)."""
    if not positions:
        raise ValueError("merge_positions needs at least one position")
    first = positions[0]
    merged = unpack_delivered(first)
    for i, pos in enumerate(positions[1:], start=1):
        if pos["epoch"] != first["epoch"] or pos["fingerprint"] != first["fingerprint"] \
                or pos["num_samples"] != first["num_samples"]:
            raise ValueError(
                f"cannot merge data positions: position 0 is epoch {first['epoch']} plan {first['fingerprint']}, "
                f"position {i} is epoch {pos['epoch']} plan {pos['fingerprint']}")
        merged |= unpack_delivered(pos)
    return make_position(first["epoch"], merged, first["fingerprint"])
