"""What runs inside one DataLoader worker: stream its shard segments, shuffle, decode, batch.

Each worker receives a :class:`WorkerTask` planned in the main process: the shard segments (which
keys of which shard, with their global plan indices) and the exact batch sizes it must produce.
Tar streaming is webdataset's (``url_opener`` / ``tar_file_expander`` / ``group_by_keys``, so
``pipe:`` URLs work); samples outside the worker's range are filtered by member name before their
bytes are even read into a sample, and nothing is decoded before it leaves the shuffle buffer.

Corrupt samples: skipped and reported in the batch (``_corrupt``); the worker fills its planned
batches from its remaining valid samples in order, so only its last batch(es) come out smaller.
If a planned batch would be empty, it carries one repeat of the worker's last good sample, marked
with index -1 so the position does not count it -- the batch count per rank stays fixed, which
is what keeps DDP and SyncBN from hanging.
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
            ) -> dict[str, Any]:
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
                yield (decode_sample(sample, s.preprocess, sample_rng, s.use_instance, s.image_resample),
                       sample["__index__"])
            except CorruptSample as exc:
                corrupt.append((key, exc.reason, sample["__index__"]))

    def _run(self, task: WorkerTask) -> Iterator[dict[str, Any]]:
        corrupt: list[tuple[str, str, int]] = []  # (key, reason, plan index), reported with the next batch
        last_good: Optional[DecodedSample] = None
        source = self._decoded(task, corrupt)
        for size in task.batch_sizes:
            samples: list[DecodedSample] = []
            indices: list[int] = []
            for decoded, index in source:
                samples.append(decoded)
                indices.append(index)
                if len(samples) == size:
                    break
            if not samples:
                if last_good is None:
                    raise RuntimeError(
                        f"every sample of this worker's range is corrupt ({len(corrupt)}; last: {corrupt[-5:]})")
                samples, indices = [last_good], [-1]
            last_good = samples[-1]
            reported = corrupt[:]
            corrupt.clear()
            read_now = sum(1 for i in indices if i >= 0) + len(reported)
            yield collate(samples, indices, reported, read_now)
        # The planned sizes add up to the worker's whole range, so the loop above consumed it all;
        # a sample left over means the plan and the shards disagree.
        for decoded, _ in source:
            raise RuntimeError(f"worker got more samples than planned (first extra: {decoded.key}); "
                               "the shards do not match their manifest")
