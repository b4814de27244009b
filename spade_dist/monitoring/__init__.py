"""Monitoring: the per-rank Prometheus exporter (``exporter``), file_sd discovery (``discovery``), the
JSONL training log (``train_log``), Pushgateway helpers (``pushgateway``), the Grafana dashboard
generator, the run report and the local Prometheus / Pushgateway services."""


class MetricsError(RuntimeError):
    """The exporter cannot do what the configuration asks (port taken, bad value, ...)."""
