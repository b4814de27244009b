"""The JSONL training log ``<run_dir>/logs/train_metrics.jsonl`` (docs/FORMATS.md), read by ``spade-report``.

Rank 0 appends one line per logged step, also with ``metrics.enabled: false`` (which only turns off
the exporter), so every run can be reported on. The file stays open, line-buffered: readers see
whole lines, and a logging step costs no open/fsync.

Each record names the run and the (re)start that wrote it: ``lineage`` (the checkpoint lineage,
docs/CHECKPOINTING.md), ``resumed_from`` (the step that start resumed from, 0 for a fresh start) and
``start`` (its Unix time). :func:`current_run` keeps what belongs to the run as it stands: the last
lineage's records, without the steps a later start went back over (a requeue after the last
checkpoint, a rewind).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from spade_dist.run_dir import RunDir


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class TrainingLog:
    """Appends step records to the run's training log; :meth:`close` is idempotent."""

    def __init__(self, run_dir: Union[str, Path], lineage: str = "", resumed_from: int = 0) -> None:
        path = RunDir(run_dir).train_metrics_log
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Optional[object] = open(path, "a", buffering=1)  # line-buffered: readers see whole lines
        self._start = {"lineage": lineage, "resumed_from": resumed_from, "start": round(time.time(), 3)}

    def write_step(self, step: int, epoch: int, images_per_sec: float, data_wait_share: float,
                   losses: Optional[Mapping[str, float]], lrs: Optional[Mapping[str, float]],
                   grad_norms: Optional[Mapping[str, float]]) -> None:
        record = {
            "step": step, "epoch": epoch, "time": round(time.time(), 3),
            "images_per_sec": images_per_sec,
            "data_wait_share": data_wait_share,
            "losses": {k: (float(v) if _finite(v) else None) for k, v in (losses or {}).items()},
            "lr": {k: float(v) for k, v in (lrs or {}).items()},
            "grad_norms": {k: (float(v) if _finite(v) else None) for k, v in (grad_norms or {}).items()},
            **self._start,
        }
        self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def current_run(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the run as it stands, in file order: only the last record's lineage (logs of
    an earlier run that were not archived, e.g. written before lineages were recorded, are left out),
    and without the steps after the checkpoint a later (re)start resumed from: those were never
    committed, the later start logged its own. Records without these fields are kept as they are."""
    if not records:
        return []
    lineage = records[-1].get("lineage")
    if lineage:
        records = [r for r in records if r.get("lineage") == lineage]
    kept: list[dict[str, Any]] = []
    for record in records:
        start, resumed_from = record.get("start"), record.get("resumed_from")
        if kept and start is not None and start != kept[-1].get("start") and isinstance(resumed_from, int):
            kept = [r for r in kept if isinstance(r.get("step"), int) and r["step"] <= resumed_from]
        kept.append(record)
    return kept
