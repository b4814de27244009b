"""Pushgateway metrics of a ``spade-data shard`` run (``--pushgateway HOST:PORT``).

Sharding ends long before a Prometheus scrape could find it, so it pushes its result once at the end
to the group ``job="spade-data-shard", dataset, split`` (plus ``slice`` for ``--shard-slice`` tasks);
the shipped Prometheus config scrapes the Pushgateway with ``honor_labels: true``.
"""
from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Gauge

from spade_dist.monitoring.pushgateway import push_job_metrics

PUSH_JOB = "spade-data-shard"


def push_shard_metrics(gateway: str, dataset: str, split: str, shards: list[dict], skipped: int, seconds: float,
                       shard_slice: Optional[str] = None) -> dict[str, str]:
    """Push what one shard run wrote (``shards``: manifest / sidecar records with ``samples`` and
    ``bytes``); returns the grouping key. Raises ``MetricsError`` naming an unreachable gateway."""
    registry = CollectorRegistry()
    values = {
        "spade_shard_samples": ("Samples written.", sum(s["samples"] for s in shards)),
        "spade_shard_files": ("Shard files written.", sum(1 for s in shards if s["samples"])),
        "spade_shard_bytes": ("Bytes of the shard files written.", sum(s["bytes"] for s in shards)),
        "spade_shard_skipped_samples": ("Bad samples skipped (--skip-bad).", skipped),
        "spade_shard_seconds": ("Duration of the shard run.", seconds),
        "spade_shard_last_success_timestamp_seconds": ("Unix time the shard run finished.", time.time()),
    }
    for name, (doc, value) in values.items():
        Gauge(name, doc, registry=registry).set(value)
    grouping = {"dataset": dataset, "split": split}
    if shard_slice is not None:
        grouping["slice"] = shard_slice.replace("/", "-of-")
    push_job_metrics(gateway, PUSH_JOB, registry, grouping)
    return grouping
