"""What runs inside one DataLoader worker: stream its shard segments, shuffle, decode, batch.

Each worker receives a :class:`WorkerTask` planned in the main process: the shard segments (which
keys of which shard, with their global plan indices) and the exact batch sizes it must produce.
Tar streaming is webdataset's (``url_opener`` / ``tar_file_expander`` / ``group_by_keys``, so
``pipe:`` URLs work); samples outside the worker's range are filtered by member name before their
bytes are even read into a sample, and nothing is decoded before it leaves the shuffle buffer.

Corrupt samples: skipped and reported in the batch (``_corrupt``); the worker fills its planned
batches from its remaining valid samples in order, its reserve included (the samples the epoch's
full batches leave over, docs/DATA.md). What it does not need of its range is reported as dropped
(``_dropped``) with its last batch, so the position counts it. Training batches are always full:
if a worker runs out of valid samples, the batch is completed with repeats of its valid ones
(index -1, reported in ``_repeats``), so BatchNorm always sees ``B`` samples and the batch count per
rank stays fixed (what keeps DDP and SyncBN from hanging). A worker without a single valid sample
sends no batch but ``_exhausted``: the main process raises :class:`CorruptRateError` naming the keys.
"""
from __future__ import annotations

import logging
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import gopen

from spade_dist.data.decode import CorruptSample, DecodedSample, decode_sample
from spade_dist.data.plan import Segment, stable_seed
from spade_dist.data.transforms import PreprocessOptions

log = logging.getLogger("spade_dist.data")

# Fields a batch carries from the worker to the main process only (popped before the trainer).
INDEX_FIELD = "_index"
CORRUPT_FIELD = "_corrupt"
READ_FIELD = "_read"
DROPPED_FIELD = "_dropped"  # [(key, plan index)]: reserve samples this worker did not need
REPEATS_FIELD = "_repeats"  # how many trailing samples repeat earlier ones to fill a training batch
EXHAUSTED_FIELD = "_exhausted"  # no batch: every sample of the worker's range was corrupt
PRIVATE_FIELDS = (INDEX_FIELD, CORRUPT_FIELD, READ_FIELD, DROPPED_FIELD, REPEATS_FIELD, EXHAUSTED_FIELD)


@dataclass
class WorkerTask:
    segments: list[Segment]
    batch_sizes: list[int]
    shuffle_buffer: int
    shuffle_seed: int


@dataclass
class StreamSettings:
    preprocess: PreprocessOptions
    image_resample: str
    seed: int
    epoch: int  # for per-sample crop/flip seeds
    use_instance: bool
    tasks: list[WorkerTask] = field(default_factory=list)
    # (label_nc, contain_dontcare_label): a label id outside them makes the sample corrupt here, in
    # the worker, instead of failing the train step; None = not checked.
    label_ids: Optional[tuple[int, bool]] = None
    # Training: every batch is completed to its planned size (repeats when a worker runs out).
    full_batches: bool = False


class ShardError(RuntimeError):
    """A shard does not match its manifest (unknown key) or cannot be opened."""


MISSING_REASON = "listed in the manifest but missing from the shard"


def _raw_samples(segment: Segment) -> Iterator[dict[str, Any]]:
    """Undecoded samples of ``segment`` in tar order; wanted keys missing from the tar come out
    as ``{"__key__": key, "__missing__": reason}`` so they are counted as corrupt, not lost.

    A shard that turns out truncated or unreadable part-way (a tar error, an I/O error) is not a
    crash: the rest of its wanted keys come out as missing with the shard and the error as the
    reason, so the loader skips and counts them like any corrupt sample, and the recorded position
    still covers every planned sample exactly once."""
    wanted = segment.wanted
    started: set[str] = set()

    def select(fname: str) -> bool:
        prefix, _ = tariterators.base_plus_ext(fname)
        if prefix in wanted:
            started.add(prefix)
            return True
        # The first member after the range is let through: group_by_keys emits the range's last
        # sample only when it sees the next key, and we can then stop without scanning the rest.
        return len(started) == len(wanted)

    seen: set[str] = set()
    try:
        stream = gopen(segment.url)
    except Exception as exc:
        raise ShardError(f"cannot open shard {segment.url}: {exc}") from exc
    files = tariterators.tar_file_expander([{"url": segment.url, "stream": stream}], select_files=select)
    missing_reason = MISSING_REASON
    try:
        for sample in tariterators.group_by_keys(files):
            key = sample["__key__"]
            if key not in wanted:
                continue  # the sentinel sample after the range (see select)
            if key in seen:
                raise ShardError(f"shard {segment.url}: key {key!r} appears twice")
            seen.add(key)
            yield sample
            # A local file can be closed as soon as the range is done; a pipe is read to its end
            # so the command exits cleanly.
            if len(seen) == len(wanted) and not segment.url.startswith("pipe:"):
                break
    except (tarfile.TarError, OSError, EOFError) as exc:
        missing_reason = f"shard {segment.url} unreadable after {len(seen)} sample(s) of this range: {exc}"
        log.warning("%s; skipping its remaining %d sample(s)", missing_reason, len(wanted) - len(seen))
    finally:
        files.close()
        stream.close()
    for key in wanted:
        if key not in seen:
            yield {"__key__": key, "__missing__": missing_reason}


def _shuffled(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    if size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[DecodedSample], indices: list[int], corrupt: list[tuple[str, str, int]], read: int,
            dropped: Optional[list[tuple[str, int]]] = None, repeats: int = 0) -> dict[str, Any]:
    """Stack decoded samples into the batch dict of docs/FORMATS.md (+ the private fields)."""
    shapes = {s.label.shape for s in samples}
    if len(shapes) != 1:
        raise RuntimeError(
            "samples of one batch have different sizes after preprocessing "
            f"({', '.join(f'{s.key}: {s.label.shape[1]}x{s.label.shape[0]}' for s in samples)}); "
            "use a cropping preprocess_mode or batch_size 1")
    n = len(samples)
    h, w = samples[0].label.shape
    # numpy buffers filled in place: one copy per sample (crop/flip views are resolved by the
    # assignment). Id maps keep their narrow PNG dtype (uint8 for 8-bit maps) for the trip to
    # the main process -- plain pickled numpy, a third of the int64 bytes and no shared-memory
    # file per tensor -- where ShardLoader widens them to the int64 of docs/FORMATS.md.
    image = np.empty((n, 3, h, w), dtype=np.uint8)
    label = np.empty((n, 1, h, w), dtype=np.result_type(*(s.label.dtype for s in samples)))
    instance_maps = [s.instance for s in samples if s.instance is not None]
    instance = np.zeros((n, 1, h, w), dtype=np.result_type(np.uint8, *(m.dtype for m in instance_maps)))
    for i, s in enumerate(samples):
        image[i] = s.image
        label[i, 0] = s.label
        if s.instance is not None:
            instance[i, 0] = s.instance
    return {
        "image": image, "label": label, "instance": instance,
        "key": [s.key for s in samples],
        INDEX_FIELD: np.asarray(indices, dtype=np.int64), CORRUPT_FIELD: corrupt, READ_FIELD: read,
        DROPPED_FIELD: dropped or [], REPEATS_FIELD: repeats,
    }


class ShardStream(IterableDataset):
    """Yields ready batches; DataLoader runs it with ``batch_size=None``."""

    def __init__(self, settings: StreamSettings) -> None:
        super().__init__()
        self.settings = settings

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if worker >= len(self.settings.tasks):
            return iter(())
        return self._run(self.settings.tasks[worker])

    def _decoded(self, task: WorkerTask, corrupt: list[tuple[str, str, int]]) -> Iterator[tuple[DecodedSample, int]]:
        s = self.settings
        rng = random.Random(task.shuffle_seed)

        def raw() -> Iterator[dict[str, Any]]:
            for segment in task.segments:
                for sample in _raw_samples(segment):
                    sample["__index__"] = segment.wanted[sample["__key__"]]
                    yield sample

        for sample in _shuffled(raw(), task.shuffle_buffer, rng):
            key = sample["__key__"]
            if sample.get("__missing__"):
                corrupt.append((key, sample["__missing__"], sample["__index__"]))
                continue
            try:
                sample_rng = random.Random(stable_seed("sample", s.seed, s.epoch, key))
                yield (decode_sample(sample, s.preprocess, sample_rng, s.use_instance, s.image_resample,
                                     label_ids=s.label_ids), sample["__index__"])
            except CorruptSample as exc:
                corrupt.append((key, exc.reason, sample["__index__"]))

    def _run(self, task: WorkerTask) -> Iterator[dict[str, Any]]:
        corrupt: list[tuple[str, str, int]] = []  # (key, reason, plan index), reported with the next batch
        consumed: set[int] = set()  # plan indices trained or reported corrupt
        last_good: list[DecodedSample] = []  # the latest valid samples: what a short batch repeats
        source = self._decoded(task, corrupt)
        for number, size in enumerate(task.batch_sizes, start=1):
            samples: list[DecodedSample] = []
            indices: list[int] = []
            for decoded, index in source:
                samples.append(decoded)
                indices.append(index)
                if len(samples) == size:
                    break
            consumed.update(indices)
            consumed.update(i for _, _, i in corrupt)
            if samples:
                last_good = samples
            repeats = 0
            if len(samples) < size and (self.settings.full_batches or not samples):
                if not last_good:  # not one valid sample in the whole range so far
                    yield {EXHAUSTED_FIELD: True, CORRUPT_FIELD: corrupt[:], READ_FIELD: len(corrupt)}
                    return
                repeats = size - len(samples) if self.settings.full_batches else 1
                samples += [last_good[i % len(last_good)] for i in range(repeats)]
                indices += [-1] * repeats
            reported = corrupt[:]
            corrupt.clear()
            dropped: list[tuple[str, int]] = []
            if number == len(task.batch_sizes):  # the last batch: what is left of the range is dropped
                source.close()
                dropped = [(key, index) for segment in task.segments for key, index in segment.wanted.items()
                           if index not in consumed]
            read_now = sum(1 for i in indices if i >= 0) + len(reported)
            yield collate(samples, indices, reported, read_now, dropped, repeats)
