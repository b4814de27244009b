"""The JSONL training log ``<run_dir>/logs/train_metrics.jsonl`` (docs/FORMATS.md), read by ``spade-report``.

Rank 0 appends one line per logged step, also with ``metrics.enabled: false`` (which only turns off
the exporter), so every run can be reported on. The file stays open, line-buffered: readers see
whole lines, and a logging step costs no open/fsync.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping, Optional, Union

from spade_dist.run_dir import RunDir


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class TrainingLog:
    """Appends step records to the run's training log; :meth:`close` is idempotent."""

    def __init__(self, run_dir: Union[str, Path]) -> None:
        path = RunDir(run_dir).train_metrics_log
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Optional[object] = open(path, "a", buffering=1)  # line-buffered: readers see whole lines

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
        }
        self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
