"""Pushgateway helpers for short jobs (sharding, one-off evaluation) that end before a scrape."""
from __future__ import annotations

from typing import Mapping, Optional

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway

from spade_dist.monitoring import MetricsError


def push_job_metrics(gateway: str, job: str, registry: CollectorRegistry,
                     grouping: Optional[Mapping[str, str]] = None, timeout: float = 10.0) -> None:
    """Replace the Pushgateway group ``job`` (+ ``grouping``) with ``registry``'s metrics.

    For short jobs (sharding, one-off evaluation) that end before Prometheus could scrape them.
    ``gateway`` is ``host:port`` (``metrics.pushgateway``).
    """
    if not gateway:
        raise MetricsError("push_job_metrics: no gateway given (metrics.pushgateway is empty)")
    try:
        push_to_gateway(gateway, job=job, registry=registry, grouping_key=dict(grouping or {}), timeout=timeout)
    except OSError as exc:
        raise MetricsError(f"cannot push job {job!r} to Pushgateway {gateway} (metrics.pushgateway): {exc}") from exc


def delete_job_metrics(gateway: str, job: str, grouping: Optional[Mapping[str, str]] = None,
                       timeout: float = 10.0) -> None:
    """Delete the group a job pushed, so finished jobs don't linger on the Pushgateway forever."""
    if not gateway:
        raise MetricsError("delete_job_metrics: no gateway given (metrics.pushgateway is empty)")
    try:
        delete_from_gateway(gateway, job=job, grouping_key=dict(grouping or {}), timeout=timeout)
    except OSError as exc:
        raise MetricsError(f"cannot delete job {job!r} from Pushgateway {gateway} (metrics.pushgateway): {exc}") from exc
