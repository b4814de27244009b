"""The metrics an evaluation record can hold: where each value sits in a ``metrics.jsonl`` line, its
display name, which direction is better, and the best record by one of them.

No torch here: the reports, the exporter and ``spade-eval compare`` read records with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class MetricInfo:
    key: str  # the record field holding the value
    label: str  # for tables and charts
    lower_is_better: bool


# Every name of config.EvalMetric (tests/test_eval_segmentation.py checks they agree).
METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo("fid", "FID", True),
    "kid": MetricInfo("kid_mean", "KID", True),
    "miou": MetricInfo("miou", "mIoU", False),
    "pixel_accuracy": MetricInfo("pixel_accuracy", "pixel accuracy", False),
}


def metric_value(record: dict[str, Any], metric: str) -> Optional[float]:
    """The record's finite value of ``metric``, or None (not computed, skipped line, non-finite)."""
    value = record.get(METRICS[metric].key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def better(a: float, b: float, metric: str) -> bool:
    """Whether value ``a`` of ``metric`` is strictly better than ``b``."""
    return a < b if METRICS[metric].lower_is_better else a > b


def protocol_hash_of(record: dict[str, Any], metric: str) -> str:
    """The short hash of the protocol ``metric`` was computed under; "unrecorded" for lines written
    before protocols were recorded."""
    hashes = record.get("protocol_hash")
    return str(hashes.get(metric, "unrecorded")) if isinstance(hashes, dict) else "unrecorded"


def best_record(records: Sequence[dict[str, Any]], metric: str, protocol_hash: Optional[str] = None) -> Optional[dict]:
    """The ``ok`` record with the best ``metric`` (the earliest step on a tie); with ``protocol_hash``,
    only among records computed under that protocol (scores of other protocols do not compare)."""
    best: Optional[dict] = None
    for record in records:
        value = metric_value(record, metric) if record.get("status") == "ok" else None
        if value is None or (protocol_hash is not None and protocol_hash_of(record, metric) != protocol_hash):
            continue
        if best is None or better(value, metric_value(best, metric), metric) or (  # type: ignore[arg-type]
                value == metric_value(best, metric) and record["step"] < best["step"]):
            best = record
    return best
