"""``spade-data shard``: dataset folders -> deterministic tar shards + per-shard records.

Flow (every step is a pure function of the input files and options, so the output never depends
on the number of workers or on which Slurm task wrote which shard):

1. ``layouts.discover`` lists the split (sorted keys) without decoding anything.
2. ``plan_shards`` cuts the key list into shards from file sizes alone (``--max-count``,
   ``--max-size``). Because the plan needs no decoding, every array task computes the same plan
   and can write only its shard indices (``--shard-slice INDEX/COUNT``).
3. Each shard's samples are decoded and validated in a process pool (ordered ``imap``), written
   to ``name.tar.tmp-<random>`` and renamed; then a sidecar record ``_parts/<shard>.json`` (sha256,
   keys, histogram, sizes, skipped samples, plan fingerprint) is renamed into place. The sidecar
   is the completion marker: a re-run skips shards whose sidecar matches the plan and the tar's
   sha256, and removes leftover temp files.
4. ``manifest.merge_manifest`` assembles ``manifest.json`` from the plan and the sidecars (also the
   ``spade-data merge-manifest`` step after an array job). It refuses while any shard is missing,
   so an incomplete split is never marked complete.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from data_tools import manifest as manifest_lib
from data_tools.layouts import (
    DatasetSpec,
    DataToolsError,
    Discovery,
    LayoutOptions,
    PlannedShard,
    SourceSample,
    discover,
)
from data_tools.records import BadSample, EncodeOptions, SampleRecord, encode_sample, encode_sample_task
from data_tools.tario import TAR_BLOCK, TAR_RECORD, member_tar_bytes, write_tar_atomic
from spade_dist.files import UnsafeNameError, check_path_component, remove_stale_temps, sha256_file

META_ESTIMATE_BYTES = 400  # meta.json payload assumed by the size plan (one 512-byte block)


@dataclass(frozen=True)
class ShardSlice:
    """Shard indices ``index, index + count, ...`` of the plan (one Slurm array task)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "ShardSlice":
        try:
            index_text, count_text = text.split("/")
            result = cls(int(index_text), int(count_text))
        except ValueError:
            raise DataToolsError(f"--shard-slice must be INDEX/COUNT (e.g. 3/8), got {text!r}") from None
        if result.count < 1 or not 0 <= result.index < result.count:
            raise DataToolsError(f"--shard-slice {text!r}: need 0 <= INDEX < COUNT")
        return result

    def owns(self, shard_index: int) -> bool:
        return shard_index % self.count == self.index


def shard_file_name(name: str, split: str, index: int) -> str:
    return f"{name}-{split}-{index:06d}.tar"


def _source_stats(root: Path, sample: SourceSample) -> tuple[int, list[list[int]]]:
    """(tar bytes of the sample stored verbatim, [[size, mtime_ns] per source file]).

    The byte estimate is exact when files are stored verbatim, except for meta.json's length. The
    sizes and mtimes go into the shard fingerprint so that a resumed run notices edited sources.
    """
    total = member_tar_bytes(META_ESTIMATE_BYTES)
    stamps = []
    for rel in sample.files():
        try:
            stat = (root / rel).stat()
        except OSError as err:
            raise DataToolsError(f"cannot stat {root / rel}: {err}") from None
        total += member_tar_bytes(stat.st_size)
        stamps.append([stat.st_size, stat.st_mtime_ns])
    return total, stamps


def shard_order(samples: Sequence[SourceSample], shuffle_seed: Optional[int]) -> list[SourceSample]:
    """The order samples are written in: sorted by key (``None``), else shuffled by ``shuffle_seed``.

    Datasets are often sorted by city / scene, and training mixes only by shard order plus a small
    buffer, so shuffling once here decides how well batches mix. The order is ``sha256(seed:key)``:
    deterministic for a seed (same seed -> byte-identical shards, on any machine and Python version),
    and a sample added later does not move the others.
    """
    if shuffle_seed is None:
        return list(samples)
    return sorted(samples, key=lambda s: hashlib.sha256(f"{shuffle_seed}:{s.key}".encode()).digest())


def plan_shards(root: Path, samples: Sequence[SourceSample], name: str, split: str,
                max_count: int, max_size: Optional[int], encode: EncodeOptions) -> list[PlannedShard]:
    """Cut the samples, in the given order, into shards of at most ``max_count`` samples and ``max_size`` bytes.

    Sizes come from the source files (see ``_source_stats``); a single sample larger than the
    limit still gets its own shard. The fingerprint covers everything that determines the shard's
    bytes, so a resumed run only trusts a finished shard made from the same inputs and options.
    """
    if max_count < 1:
        raise DataToolsError(f"--max-count must be >= 1, got {max_count}")
    budget = None
    if max_size is not None:
        # The archive ends with two zero blocks and is padded to a 10240-byte record.
        budget = (max_size // TAR_RECORD) * TAR_RECORD - 2 * TAR_BLOCK
        if budget <= 0:
            raise DataToolsError(f"--max-size must be at least {TAR_RECORD} bytes, got {max_size}")
    groups: list[list[tuple[SourceSample, list[list[int]]]]] = []
    current: list[tuple[SourceSample, list[list[int]]]] = []
    current_bytes = 0
    for sample in samples:
        size, stamps = _source_stats(root, sample)
        full = len(current) >= max_count or (budget is not None and current and current_bytes + size > budget)
        if full:
            groups.append(current)
            current, current_bytes = [], 0
        current.append((sample, stamps))
        current_bytes += size
    if current:
        groups.append(current)

    plan = []
    for index, group in enumerate(groups):
        identity = {"name": name, "split": split, "encode": asdict(encode),
                    "samples": [[asdict(s), stamps] for s, stamps in group]}
        fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        plan.append(PlannedShard(index, shard_file_name(name, split, index), tuple(s for s, _ in group), fingerprint))
    return plan


def _sidecar_is_complete(out: Path, shard: PlannedShard, skip_bad: bool) -> bool:
    """True when the shard's record matches the plan and the tar on disk is the one recorded.

    A shard that skipped bad samples is only reused under ``--skip-bad``: without it the bad samples
    must be decoded again so that the run fails and names them.
    """
    record = manifest_lib.read_sidecar(out, shard.file)
    if record is None or record.get("fingerprint") != shard.fingerprint:
        return False
    if record["skipped"] and not skip_bad:
        return False
    tar_path = out / shard.file
    if record["samples"] == 0:
        return not tar_path.exists()
    return (tar_path.is_file() and tar_path.stat().st_size == record["bytes"]
            and sha256_file(tar_path) == record["sha256"])


def _relative_reason(reason: str, root: Path) -> str:
    """Manifest entries name files relative to the root, so manifests do not depend on where data lives."""
    return reason.replace(f"{root}{os.sep}", "")


def _bad_sample_error(bad: BadSample, root: Path) -> DataToolsError:
    return DataToolsError(f"bad sample {bad.key!r} ({', '.join(str(root / f) for f in bad.files)}): "
                          f"{bad.reason}; use --skip-bad to skip such samples")


def _write_shard(out: Path, root: Path, shard: PlannedShard, results: Iterator[Union[SampleRecord, BadSample]],
                 skip_bad: bool, on_sample: Callable[[], None]) -> dict:
    """Stream the shard's results into its tar (one sample in memory at a time), then write its record.

    A bad sample without ``skip_bad`` raises from inside the tar writer, which deletes the temp file:
    the shard then has neither a tar nor a record.
    """
    tar_path = out / shard.file
    remove_stale_temps(tar_path)
    # The old record must not vouch for the new tar while it is being replaced.
    manifest_lib.sidecar_path(out, shard.file).unlink(missing_ok=True)
    keys: list[str] = []
    widths: list[int] = []
    heights: list[int] = []
    histogram: Optional[np.ndarray] = None
    skipped: list[dict] = []

    def members() -> Iterator[tuple[str, bytes]]:
        nonlocal histogram
        for _ in shard.samples:
            result = next(results)
            on_sample()
            if isinstance(result, BadSample):
                if not skip_bad:
                    raise _bad_sample_error(result, root)
                skipped.append({"key": result.key, "files": list(result.files),
                                "reason": _relative_reason(result.reason, root)})
                continue
            try:  # the key becomes tar member names here and file names downstream (spade-generate)
                check_path_component(result.key, f"shard {shard.file}")
            except UnsafeNameError as exc:
                raise DataToolsError(str(exc)) from None
            keys.append(result.key)
            widths.append(result.width)
            heights.append(result.height)
            counts = np.asarray(result.histogram, dtype=np.int64)
            histogram = counts if histogram is None else histogram + counts
            yield from result.members

    write_tar_atomic(tar_path, members())
    if keys:
        size, digest = tar_path.stat().st_size, sha256_file(tar_path)
    else:
        # Every sample of this shard was bad and skipped: no empty tar; the manifest leaves it out.
        tar_path.unlink(missing_ok=True)
        size, digest = 0, ""
    sidecar = {
        "file": shard.file, "index": shard.index, "fingerprint": shard.fingerprint,
        "samples": len(keys), "bytes": size, "sha256": digest, "keys": keys,
        "class_histogram": [int(c) for c in histogram] if histogram is not None else [],
        "width": manifest_lib.size_summary(widths),
        "height": manifest_lib.size_summary(heights),
        "skipped": skipped,
    }
    manifest_lib.write_sidecar(out, shard.file, sidecar)
    return sidecar


def _encode_all(tasks: list[tuple[str, SourceSample, EncodeOptions]],
                workers: int) -> Iterator[Union[SampleRecord, BadSample]]:
    """Results in task order whatever the worker count (ordered imap), so output is worker-independent."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield encode_sample(*task)
        return
    # imap submits everything at once; windows bound how many decoded samples (with their bytes)
    # can pile up when the writer is slower than the decoders.
    window = workers * 16
    with multiprocessing.get_context().Pool(workers) as pool:
        for start in range(0, len(tasks), window):
            yield from pool.imap(encode_sample_task, tasks[start:start + window], chunksize=2)


def shard_dataset(layout: str, root: Union[str, Path], out: Union[str, Path], split: str = "train",
                  *, name: Optional[str] = None, max_count: int = 1000, max_size: Optional[int] = None,
                  workers: int = 1, max_side: Optional[int] = None, skip_bad: bool = False,
                  label_nc: Optional[int] = None, contain_dontcare_label: Optional[bool] = None,
                  no_instance: bool = False, image_dir: Optional[str] = None, label_dir: Optional[str] = None,
                  instance_dir: Optional[str] = None, shard_slice: Optional[ShardSlice] = None,
                  progress: bool = True, shuffle_seed: Optional[int] = 0) -> dict:
    """Shard one split of a dataset into ``out``; returns the manifest (a dict, also written to disk).

    With ``shard_slice`` only that slice's shards are written and no manifest is assembled; the
    return value is then ``{"split", "slice", "shards": [sidecar records written or found]}`` and
    ``merge_manifest(out)`` must run once every slice has finished.
    Samples are written in the order of :func:`shard_order` (``shuffle_seed``; None = sorted by key).
    Raises :class:`DataToolsError` for bad input (unless ``skip_bad``), naming files and ids.
    """
    root, out = Path(root).resolve(), Path(out)
    name = name or layout
    if not name or "/" in name or name.startswith("."):
        raise DataToolsError(f"--name {name!r} is not a valid file name prefix")
    if max_side is not None and max_side < 1:
        raise DataToolsError(f"--max-side must be >= 1, got {max_side}")
    layout_options = LayoutOptions(label_nc, contain_dontcare_label, no_instance, image_dir, label_dir, instance_dir)
    found: Discovery = discover(layout, root, split, layout_options)
    spec: DatasetSpec = found.spec
    if found.problems and not skip_bad:
        problem = found.problems[0]
        more = f" (and {len(found.problems) - 1} more such samples)" if len(found.problems) > 1 else ""
        raise DataToolsError(f"sample {problem.key!r} ({', '.join(str(root / f) for f in problem.files)}): "
                             f"{problem.reason}{more}; use --skip-bad to skip such samples")
    if not found.samples:
        raise DataToolsError(f"no samples found for split {split!r} under {root} (layout {layout})")

    encode = EncodeOptions(spec.label_nc, spec.contain_dontcare_label, spec.label_shift, spec.instance, max_side)
    plan = plan_shards(root, shard_order(found.samples, shuffle_seed), name, split, max_count, max_size, encode)
    out.mkdir(parents=True, exist_ok=True)
    manifest_lib.check_compatible(out, name, spec)
    manifest_lib.write_plan(out, name, split, spec, plan,
                            [{"key": p.key, "files": list(p.files), "reason": p.reason} for p in found.problems],
                            shuffle_seed)

    mine = [shard for shard in plan if shard_slice is None or shard_slice.owns(shard.index)]
    for shard in mine:  # leftovers of an interrupted writer, also beside shards that did complete
        remove_stale_temps(out / shard.file)
    todo = [shard for shard in mine if not _sidecar_is_complete(out, shard, skip_bad)]
    done_samples = sum(len(s.samples) for s in mine) - sum(len(s.samples) for s in todo)
    if todo:
        # Shards of this split are about to change: the manifest must stop listing the split until
        # it is assembled again, so a failed or interrupted run never leaves a stale entry behind.
        manifest_lib.drop_split(out, split)
    tasks = [(str(root), sample, encode) for shard in todo for sample in shard.samples]
    bar = tqdm(total=sum(len(s.samples) for s in mine), initial=done_samples, unit="img", file=sys.stderr,
               desc=f"shard {name}-{split}", disable=not progress, dynamic_ncols=True)
    results = _encode_all(tasks, workers)
    try:
        for shard in todo:
            _write_shard(out, root, shard, results, skip_bad, on_sample=lambda: bar.update(1))
    finally:
        bar.close()
        results.close()  # terminates the pool if we stopped early

    if shard_slice is not None:
        return {"split": split, "slice": f"{shard_slice.index}/{shard_slice.count}",
                "shards": [manifest_lib.read_sidecar(out, s.file) for s in mine]}
    return manifest_lib.merge_manifest(out, splits=[split])
