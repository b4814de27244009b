"""The main-process side: plan the epoch, run the workers, hand batches out, track the position.

Position policy (also in docs/DATA.md): a sample counts as delivered when the batch holding it is
handed to the caller of ``__iter__`` (or the batch reporting it corrupt, or dropped as left over by
the epoch's full batches). Samples in shuffle buffers, being decoded, or in batches prefetched by
DataLoader workers are NOT delivered; after a resume they are planned again, so every sample is
accounted for exactly once per epoch (trained, skipped as corrupt, or dropped) across a stop/resume
-- on any world size and any number of workers.
"""
from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from spade_dist.config import DataConfig
from spade_dist.data.plan import (
    EpochPlan,
    eval_batch_sizes,
    make_position,
    plan_fingerprint,
    rank_batch_sizes,
    rank_reserves,
    split_ranges,
    stable_seed,
    unpack_delivered,
    worker_batch_sizes,
    worker_reserves,
)
from spade_dist.data.sources import (
    ShardSet,
    ShardSourceError,
    check_shard_files,
    eval_spec,
    resolve_shards,
)
from spade_dist.data.stream import (
    CORRUPT_FIELD,
    DROPPED_FIELD,
    EXHAUSTED_FIELD,
    INDEX_FIELD,
    READ_FIELD,
    REPEATS_FIELD,
    ShardStream,
    StreamSettings,
    WorkerTask,
)
from spade_dist.data.transforms import PreprocessOptions

log = logging.getLogger(__name__)
RECENT_CORRUPT_KEYS = 10


class CorruptRateError(RuntimeError):
    """Too many corrupt samples: the data is broken, training on would be silently wrong."""


def _worker_start_method() -> Optional[str]:
    """Fork workers where the OS can: new workers are planned every epoch, and a process started
    by spawn (torchrun/accelerate children, our gloo tests) would otherwise spawn its workers too,
    re-importing torch in each one (tens of seconds per epoch on a loaded node). The workers only
    decode with PIL/numpy and never touch CUDA, so forking a CUDA/NCCL process is safe here."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """DataLoader collate_fn: workers send the numpy batch as it is (pickled through the pipe:
    faster for a few arrays than DataLoader's default tensor conversion, which moves every tensor
    through its own shared-memory file)."""
    return batch


def _to_torch(batch: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
    """Worker batch (numpy, narrow id dtypes) -> the docs/FORMATS.md batch (uint8 / int64
    tensors), in page-locked memory for asynchronous host-to-GPU copies when ``pin_memory``."""
    tensors = {"image": torch.from_numpy(batch["image"]), "label": torch.from_numpy(batch["label"]).long(),
               "instance": torch.from_numpy(batch["instance"]).long()}
    for name, tensor in tensors.items():
        batch[name] = tensor.pin_memory() if pin_memory else tensor
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL/numpy; torch threads would oversubscribe the cores


class ShardLoader:
    """Iterable of batch dicts for one rank (see module doc and docs/DATA.md)."""

    def __init__(self, cfg: DataConfig, shard_set: ShardSet, rank: int, world_size: int, *, train: bool,
                 batch_size: int, preprocess: PreprocessOptions, num_workers: int, max_samples: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg = cfg
        self.shard_set = shard_set
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.num_workers = num_workers
        self.max_samples = max_samples  # evaluation: only the plan's first N samples (0 = all)
        self._fingerprint = plan_fingerprint(shard_set.shards, cfg.seed, train)
        self._epoch = 0
        self._plan = EpochPlan(shard_set.shards, cfg.seed, 0, shuffle=train)
        self._delivered = np.zeros(self._plan.num_samples, dtype=bool)
        self.corrupt_samples = 0
        self.dropped_samples = 0  # left over by the epochs' full batches (drop_last), never trained in that epoch
        self.samples_read = 0
        self._recent_corrupt: deque[str] = deque(maxlen=RECENT_CORRUPT_KEYS)
        self._last_corrupt = ""  # "key: reason" of the latest corrupt sample
        # Since the last take_audit(): samples accounted without being trained, and repeated ones.
        self._retired: list[dict[str, str]] = []
        self._repeats: list[str] = []
        if train and self._plan.num_samples < world_size * batch_size:
            raise ValueError(
                f"{shard_set.manifest_path} split {shard_set.split!r} has {self._plan.num_samples} samples, "
                f"fewer than one global batch ({world_size} ranks x data.batch_size {batch_size}): every rank "
                "needs at least one full batch")

    # ---------------------------------------------------------------- epoch and position

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Samples per epoch (all ranks together)."""
        return self._plan.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. The current epoch keeps its position (so a loop calling
        ``set_epoch(start_epoch)`` after ``load_state_dict`` resumes); another epoch starts fresh."""
        if epoch == self._epoch:
            return
        self._epoch = epoch
        self._plan = EpochPlan(self.shard_set.shards, self.cfg.seed, epoch, shuffle=self.train)
        self._delivered = np.zeros(self._plan.num_samples, dtype=bool)

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch + bitmap of delivered plan indices (merge ranks with merge_positions)."""
        return make_position(self._epoch, self._delivered, self._fingerprint)

    def load_state_dict(self, position: dict[str, Any]) -> None:
        """Continue from ``position`` (usually merged over all ranks of the previous run)."""
        if position.get("fingerprint") != self._fingerprint:
            raise ValueError(
                f"data position was recorded for another dataset or seed (plan {position.get('fingerprint')!r}, "
                f"this loader's plan is {self._fingerprint!r}: {self.shard_set.manifest_path}, seed {self.cfg.seed})")
        delivered = unpack_delivered(position)
        if delivered.size != self._plan.num_samples:
            raise ValueError(f"data position has {delivered.size} samples, the plan has {self._plan.num_samples}")
        self.set_epoch(int(position["epoch"]))
        self._delivered = delivered.copy()

    # ---------------------------------------------------------------- planning

    def _remaining(self) -> np.ndarray:
        return np.flatnonzero(~self._delivered)

    @property
    def _global_batch(self) -> int:
        return self.world_size * self.batch_size

    def _rank_layout(self) -> tuple[list[int], int, np.ndarray]:
        """(this rank's batch sizes, its reserve, its plan indices in order) for what is left of the epoch."""
        remaining = self._remaining()
        if self.train:
            if remaining.size < self._global_batch:
                return [], 0, remaining[:0]  # not one full batch per rank: __iter__ retires them (docs/DATA.md)
            sizes = rank_batch_sizes(remaining.size, self.world_size, self.batch_size)
            reserves = rank_reserves(remaining.size, self.world_size, self.batch_size)
        else:
            if self.max_samples:
                remaining = remaining[: self.max_samples]
            sizes = eval_batch_sizes(remaining.size, self.world_size, self.batch_size)
            reserves = [0] * self.world_size
        ranges = split_ranges(remaining, [sum(s) + r for s, r in zip(sizes, reserves)])
        return sizes[self.rank], reserves[self.rank], ranges[self.rank]

    def pending_epoch(self) -> int:
        """The epoch the next iteration runs: the current one, or the next when the current one has
        nothing left for this world size (complete, or only samples ``__iter__`` retires)."""
        if self.train and self._remaining().size < self._global_batch:
            return self._epoch + 1
        return self._epoch

    def __len__(self) -> int:
        """Batches this rank yields in the next iteration (equal on all ranks when training)."""
        if self.train and self._remaining().size < self._global_batch:
            # The current epoch is done (or only has samples __iter__ will retire): the next
            # iteration runs the next epoch in full.
            return len(rank_batch_sizes(self._plan.num_samples, self.world_size, self.batch_size)[self.rank])
        return len(self._rank_layout()[0])

    def _settings(self) -> StreamSettings:
        rank_sizes, reserve, rank_indices = self._rank_layout()
        per_worker = worker_batch_sizes(rank_sizes, self.num_workers)
        reserves = worker_reserves(reserve, per_worker)
        pieces = split_ranges(rank_indices, [sum(s) + r for s, r in zip(per_worker, reserves)])
        tasks = []
        for sizes, indices in zip(per_worker, pieces):
            first = int(indices[0]) if indices.size else -1
            tasks.append(WorkerTask(
                segments=self._plan.segments(indices), batch_sizes=sizes,
                shuffle_buffer=self.cfg.shuffle_buffer if self.train else 0,
                shuffle_seed=stable_seed("buffer", self.cfg.seed, self._epoch, first, indices.size)))
        return StreamSettings(self.preprocess, self.cfg.image_resample, self.cfg.seed, self._epoch if self.train else 0,
                              use_instance=not self.cfg.no_instance, tasks=tasks,
                              label_ids=(self.cfg.label_nc, self.cfg.contain_dontcare_label), full_batches=self.train)

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.train:
            remaining = self._remaining()
            if 0 < remaining.size < self._global_batch:
                # Only after a resume onto another layout: fewer samples left in the epoch than one
                # full batch per rank, so these few samples are retired for this epoch.
                keys = [self._plan.key_of(int(i)) for i in remaining]
                log.warning("epoch %d: %d samples left for %d ranks x batch %d are skipped for this epoch: %s",
                            self._epoch, remaining.size, self.world_size, self.batch_size, keys)
                self._delivered[remaining] = True
                self.dropped_samples += remaining.size
                self._retired += [{"key": k, "reason": "dropped"} for k in keys]
            if self._plan.num_samples and self._delivered.all():
                self.set_epoch(self._epoch + 1)  # the previous epoch is complete: go on with the next
        stream = ShardStream(self._settings())
        pin = bool(self.cfg.pin_memory and torch.cuda.is_available())
        if self.num_workers > 0:
            batches = iter(DataLoader(
                stream, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers, worker_init_fn=_worker_init,
                persistent_workers=False,
                multiprocessing_context=_worker_start_method()))
        else:
            batches = iter(stream)
        for batch in batches:
            self._account(batch.pop(CORRUPT_FIELD), int(batch.pop(READ_FIELD)))
            if batch.pop(EXHAUSTED_FIELD, False):
                raise CorruptRateError(
                    f"every sample of a loader worker's range is corrupt, the last {self._last_corrupt}; the shards of "
                    f"{self.shard_set.manifest_path} do not fit this config (data.label_nc, "
                    "data.contain_dontcare_label) or are damaged (spade-data verify)")
            indices = batch.pop(INDEX_FIELD)
            self._account_unused(batch.pop(DROPPED_FIELD), int(batch.pop(REPEATS_FIELD)), batch["key"])
            if self.train:  # evaluation passes are always complete: no position to keep
                self._delivered[indices[indices >= 0]] = True
            yield _to_torch(batch, pin)

    def take_audit(self) -> tuple[list[dict[str, str]], list[str]]:
        """(samples accounted without training: ``{"key", "reason": "corrupt" | "dropped"}``, keys that
        filled a batch a second time) since the last call: with the trained keys, what the key audit
        records per step (``train.log_keys``)."""
        retired, repeats = self._retired, self._repeats
        self._retired, self._repeats = [], []
        return retired, repeats

    def _account(self, corrupt: list[tuple[str, str, int]], read: int) -> None:
        self.samples_read += read
        for key, reason, index in corrupt:
            if self.train:  # consumed: a resume must not retry (and re-count) it
                self._delivered[index] = True
            self.corrupt_samples += 1
            self._recent_corrupt.append(key)
            self._last_corrupt = f"{key}: {reason}"
            self._retired.append({"key": key, "reason": "corrupt"})
            log.warning("skipped corrupt sample %s (%s) in %s", key, reason, self.shard_set.manifest_path)
        limit = self.cfg.max_corrupt_fraction
        if corrupt and self.samples_read >= self.cfg.corrupt_min_samples \
                and self.corrupt_samples > limit * self.samples_read:
            raise CorruptRateError(
                f"{self.corrupt_samples} of {self.samples_read} samples read were corrupt "
                f"({self.corrupt_samples / self.samples_read:.2%} > data.max_corrupt_fraction {limit:.2%}); "
                f"last corrupt keys: {list(self._recent_corrupt)} (shards of {self.shard_set.manifest_path})")

    def _account_unused(self, dropped: list[tuple[str, int]], repeats: int, keys: list[str]) -> None:
        """Reserve samples a worker did not need (dropped for the epoch, as the official drop_last), and
        repeats that completed a batch after a worker ran out of valid samples."""
        if dropped:
            if self.train:
                self._delivered[[index for _, index in dropped]] = True
            self.dropped_samples += len(dropped)
            self._retired += [{"key": key, "reason": "dropped"} for key, _ in dropped]
            log.info("epoch %d: %d sample(s) left over by full batches are dropped for this epoch: %s",
                     self._epoch, len(dropped), [key for key, _ in dropped])
        if repeats and self.train:
            self._repeats += keys[len(keys) - repeats:]
            log.warning("epoch %d: a loader worker ran out of valid samples; its batch repeats %d of them: %s",
                        self._epoch, repeats, keys[len(keys) - repeats:])


# -------------------------------------------------------------------- builders


def train_preprocess(cfg: DataConfig) -> PreprocessOptions:
    return PreprocessOptions(cfg.preprocess_mode, cfg.load_size, cfg.crop_size, cfg.aspect_ratio, flip=not cfg.no_flip)


def eval_preprocess(cfg: DataConfig) -> PreprocessOptions:
    """Official test mode: no flip, and the dataset test defaults load at crop size (e.g. COCO:
    load 286 for training, 256 for testing) so resize_and_crop keeps the whole resized image."""
    load = cfg.crop_size if cfg.preprocess_mode in ("resize_and_crop", "scale_width_and_crop",
                                                    "scale_shortside_and_crop") else cfg.load_size
    return PreprocessOptions(cfg.preprocess_mode, load, cfg.crop_size, cfg.aspect_ratio, flip=False)


def build_train_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> ShardLoader:
    """Training loader of one rank: shuffled per epoch, equal batch count on all ranks, resumable.
    Checks up front that every shard is there with its manifest size (:class:`ShardSourceError`
    naming the file otherwise)."""
    shard_set = resolve_shards(cfg.shards, cfg.split, cfg.manifest)
    check_shard_files(shard_set)
    return ShardLoader(cfg, shard_set, rank, world_size, train=True, batch_size=cfg.batch_size,
                       preprocess=train_preprocess(cfg), num_workers=cfg.num_workers)


def build_eval_loader(cfg: DataConfig, split: Optional[str] = None, rank: int = 0, world_size: int = 1,
                      batch_size: Optional[int] = None, max_samples: int = 0) -> ShardLoader:
    """Evaluation loader: no shuffle/flip, official test-mode crop, every sample once, unpadded.

    Shards come from ``data.val_shards`` (else the training manifest / directory); the split is
    ``split`` or ``data.val_split``. ``max_samples`` > 0 keeps the split's first samples in shard
    order (the same ones on any number of ranks), split over the ranks as the whole split would be.
    """
    spec = eval_spec(cfg.shards, cfg.val_shards, cfg.manifest)
    if spec is None:
        raise ShardSourceError(
            f"no validation shards: set data.val_shards or data.manifest (data.shards {cfg.shards!r} names no manifest)")
    shard_set = resolve_shards(spec, split or cfg.val_split, cfg.manifest)
    return ShardLoader(cfg, shard_set, rank, world_size, train=False, batch_size=batch_size or cfg.batch_size,
                       preprocess=eval_preprocess(cfg), num_workers=cfg.num_workers, max_samples=max_samples)
