"""Prometheus metrics of a training run and of the evaluator: the per-rank exporter.

Every training process owns one :class:`TrainingMetrics`. It keeps its metrics in its *own*
``CollectorRegistry`` (never the process-global default one, so two exporters in one process — tests,
an evaluator beside a trainer — cannot collide) and serves them from a background HTTP thread on
``metrics.port_base + local_rank`` (``port_base: 0`` = a free port chosen by the OS).

Discovery (:mod:`spade_dist.monitoring.discovery`): rank 0 writes a Prometheus ``file_sd`` file listing
every rank's ``host:port`` (ranks exchange their bound ports with ``all_gather_object``) and removes it
at :meth:`TrainingMetrics.close`; the labels on the targets give the ``up`` series of every rank.

The evaluator publishes its scores (FID, KID, mIoU, pixel accuracy) through :class:`EvalMetrics` (its own server + its own file_sd file,
or the Pushgateway for one-off jobs, :mod:`spade_dist.monitoring.pushgateway`).

The trainer passes plain Python numbers: nothing here touches a tensor, so recording never forces a
device synchronisation. Rank 0 also appends one JSON line per :meth:`TrainingMetrics.record_step` to
the training log (:mod:`spade_dist.monitoring.train_log`) — also with ``metrics.enabled: false``.
"""
from __future__ import annotations

import errno
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from spade_dist.config import MetricsConfig
from spade_dist.eval.scores import METRICS, metric_value
from spade_dist.files import tree_bytes, write_json_atomic
from spade_dist.monitoring import MetricsError
from spade_dist.monitoring.discovery import (
    DiscoveryFile,
    advertised_host,
    resolve_run_labels,
    resolve_sd_dir,
    sd_file_name,
)
from spade_dist.monitoring.pushgateway import delete_job_metrics, push_job_metrics
from spade_dist.monitoring.train_log import TrainingLog

# Label names carried by every training sample; the dashboard and the alert rules group by them.
TRAIN_LABELS = ("run", "job_id", "rank", "node")
# Evaluation results belong to a run, not to a rank.
EVAL_LABELS = ("run", "job_id")

# Step-time buckets (seconds): tiny CPU test steps (ms) up to slow multi-node GPU steps (~30 s).
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)


def _start_server(registry: CollectorRegistry, port: int, bind: str, who: str, config_key: str):
    """Start the HTTP thread; a taken port becomes a :class:`MetricsError` naming port and config key."""
    if not 0 <= port <= 65535:
        raise MetricsError(f"{who}: port {port} out of range 0..65535 (from {config_key})")
    try:
        server, thread = start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsError(
                f"{who}: port {port} on {bind} is already in use (set by {config_key}; "
                f"choose a free range or 0 for OS-chosen ports)"
            ) from exc
        raise MetricsError(f"{who}: cannot listen on {bind}:{port} ({config_key}): {exc}") from exc
    return server, thread


def _stop_server(server: Any) -> None:
    server.shutdown()
    server.server_close()


def device_memory_bytes(device: Any) -> int:
    """Memory this process holds on ``device``: CUDA's allocator counter (a host-side number, no
    synchronisation), or the resident set size of the process on CPU."""
    import torch  # local: keeps the exporter light for short jobs

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------
# Training exporter
# --------------------------------------------------------------------------------------------


class TrainingMetrics:
    """Per-rank training metrics. Construct on every rank. With ``metrics.enabled: false`` nothing is
    served or counted, but rank 0 still writes the JSONL training log.

    ``record_step`` covers the ``steps`` optimizer steps since the previous call (default 1):
    ``images`` is the number of images *this rank* processed in them, ``data_seconds`` /
    ``compute_seconds`` the time spent waiting for data / computing. Loss values, learning rates and
    gradient norms are the latest Python floats (call ``.item()`` only on logging steps).
    """

    def __init__(self, cfg: MetricsConfig, run_dir: Union[str, Path], rank: int = 0, local_rank: int = 0,
                 world_size: int = 1, node: Optional[str] = None, process_group: Any = None,
                 restarts: int = 0, lineage: str = "", resumed_from: int = 0) -> None:
        """``lineage`` / ``resumed_from``: the checkpoint lineage and the step this (re)start resumed from,
        recorded in the training log (:mod:`spade_dist.monitoring.train_log`)."""
        self.cfg = cfg
        self.restarts = restarts
        self.lineage, self.resumed_from = lineage, resumed_from
        self.enabled = cfg.enabled
        self.run_dir = Path(run_dir)
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.node = node or socket.gethostname()
        self.process_group = process_group
        self.run, self.job_id = resolve_run_labels(cfg, run_dir)
        self.sd_dir = resolve_sd_dir(cfg, run_dir)
        self.sd_path = self.sd_dir / sd_file_name(self.run, self.job_id)
        self._discovery = DiscoveryFile(self.sd_path)
        self.port: Optional[int] = None
        self._server: Any = None
        self._log: Optional[TrainingLog] = None
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"run": self.run, "job_id": self.job_id, "rank": str(rank), "node": self.node}
        self._build_metrics()

    # -- metric definitions ------------------------------------------------------------------
    def _build_metrics(self) -> None:
        reg, names = self.registry, list(TRAIN_LABELS)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, names + list(extra), registry=reg)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=reg)

        self._step = gauge("spade_step", "Last optimizer step completed.")
        self._epoch = gauge("spade_epoch", "Current epoch.")
        self._samples = counter("spade_samples", "Images processed by this rank.")
        self._throughput = gauge("spade_images_per_second", "Images per second of this rank over the last interval.")
        self._step_seconds = Histogram(
            "spade_step_seconds", "Time per optimizer step, split into waiting for data and computing.",
            names + ["phase"], buckets=STEP_SECONDS_BUCKETS, registry=reg)
        self._loss = gauge("spade_loss", "Latest value of each loss term.", ("term",))
        self._lr = gauge("spade_learning_rate", "Current learning rate per network.", ("net",))
        self._grad_norm = gauge("spade_grad_norm", "Latest total gradient L2 norm per network.", ("net",))
        self._nonfinite = counter("spade_nonfinite_steps_skipped", "Optimizer steps skipped for a non-finite loss or gradient.")
        self._corrupt = counter("spade_corrupt_samples_skipped", "Corrupt samples skipped by the loader.")
        self._memory = gauge("spade_device_memory_bytes", "Device memory allocated by this rank.")
        self._ckpt_seconds = gauge("spade_checkpoint_save_seconds", "Duration of the last checkpoint save.")
        self._ckpt_bytes = gauge("spade_checkpoint_bytes", "Size of the last committed checkpoint (all ranks' files).")
        self._ckpt_last = gauge("spade_checkpoint_last_success_timestamp_seconds",
                                "Unix time of the last successful checkpoint save (0 = none yet).")
        self._ckpt_saves = Counter("spade_checkpoint_saves", "Checkpoint saves by result.",
                                   names + ["result"], registry=reg)
        self._health = gauge("spade_health_signal", "Latest value of each run-health signal (docs/HEALTH.md): "
                             "nonfinite_streak, saturated_steps, diverged_steps, spike_score per term, diversity, drifted_ranks.",
                             ("signal", "term"))
        self._health_events = Counter("spade_health_events", "Run-health signals that fired, by signal and action.",
                                      names + ["signal", "action"], registry=reg)
        self._heartbeat = gauge("spade_heartbeat_timestamp_seconds", "Unix time the training loop last reported.")
        self._start_time = gauge("spade_start_time_seconds", "Unix time this training process started.")
        self._world = gauge("spade_world_size", "Number of ranks of the job (this (re)start's; elastic jobs change it).")
        self._restarts = gauge("spade_run_restarts",
                               "Times the run resumed from its own checkpoints (requeues, torchrun restarts, "
                               "elastic membership changes).")

        lab = self._labels
        # Create every label-less child now so each series exists (value 0) from the first scrape:
        # rate()/increase() and the alert rules then have data even before the first event.
        for metric in (self._step, self._epoch, self._samples, self._throughput, self._nonfinite, self._corrupt,
                       self._memory, self._ckpt_seconds, self._ckpt_bytes, self._ckpt_last, self._heartbeat,
                       self._start_time, self._world, self._restarts):
            metric.labels(**lab)
        for phase in ("data", "compute"):
            self._step_seconds.labels(**lab, phase=phase)
        for result in ("success", "failure"):
            self._ckpt_saves.labels(**lab, result=result)
        from spade_dist.train.health import SIGNALS  # lazy: the exporter loads without the training stack

        for signal in SIGNALS:
            for action in ("warn", "rewind", "stop"):
                self._health_events.labels(**lab, signal=signal, action=action)
        now = time.time()
        self._start_time.labels(**lab).set(now)
        self._heartbeat.labels(**lab).set(now)
        self._world.labels(**lab).set(self.world_size)
        self._restarts.labels(**lab).set(self.restarts)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving; rank 0 writes the file_sd target file listing every rank.

        Collective when a process group is initialised (all ranks must call it). A rank that cannot
        listen makes *every* rank raise the same :class:`MetricsError` (rather than leaving the
        others waiting in the exchange forever). Rank 0 opens the training log, enabled or not.
        """
        if self.rank == 0 and self._log is None:
            self._log = TrainingLog(self.run_dir, self.lineage, self.resumed_from)
        if not self.enabled or self._server is not None:
            return
        port = self.cfg.port_base + self.local_rank if self.cfg.port_base else 0
        who = f"metrics exporter of rank {self.rank} (local rank {self.local_rank})"
        mine: dict[str, Any] = {"labels": dict(self._labels)}
        try:
            self._server, _ = _start_server(self.registry, port, self.cfg.bind, who, "metrics.port_base")
            self.port = self._server.server_port
            mine["target"] = f"{advertised_host(self.cfg.bind, self.node)}:{self.port}"
        except MetricsError as exc:
            mine["error"] = str(exc)
        everyone = self._gather(mine)
        errors = [t["error"] for t in everyone if "error" in t]
        if errors:
            self.close()
            raise MetricsError("; ".join(errors))
        if self.rank == 0:
            self._discovery.write([{"targets": [t["target"]], "labels": t["labels"]} for t in everyone])

    def _gather(self, mine: dict) -> list[dict]:
        import torch.distributed as dist  # local: keeps the exporter light for short jobs

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            out: list[Any] = [None] * dist.get_world_size(self.process_group)
            dist.all_gather_object(out, mine, group=self.process_group)
            return sorted(out, key=lambda t: int(t["labels"]["rank"]))
        return [mine]

    def close(self) -> None:
        """Stop the server, close the log, and (rank 0) remove the discovery file. Idempotent."""
        self._discovery.remove()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._server is not None:
            _stop_server(self._server)
            self._server = None

    def __enter__(self) -> "TrainingMetrics":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- recording ---------------------------------------------------------------------------------
    def _beat(self) -> None:
        self._heartbeat.labels(**self._labels).set(time.time())

    def record_step(self, step: int, epoch: int, images: int, data_seconds: float, compute_seconds: float,
                    losses: Optional[Mapping[str, float]] = None, lrs: Optional[Mapping[str, float]] = None,
                    grad_norms: Optional[Mapping[str, float]] = None, steps: int = 1) -> None:
        """Record ``steps`` optimizer steps ending at ``step`` (see the class docstring)."""
        if steps < 1:
            raise MetricsError(f"record_step: steps must be >= 1, got {steps}")
        total = data_seconds + compute_seconds
        per_rank_rate = images / total if total > 0 else 0.0
        if self.enabled:
            self._export_step(step, epoch, images, data_seconds, compute_seconds, per_rank_rate, steps,
                              losses, lrs, grad_norms)
        if self._log is not None:
            # Every rank runs the same per-rank batch (a requirement of SyncBN), so rank 0's rate
            # times the world size is the job's throughput.
            self._log.write_step(step, epoch, per_rank_rate * self.world_size,
                                 data_seconds / total if total > 0 else 0.0, losses, lrs, grad_norms)

    def _export_step(self, step: int, epoch: int, images: int, data_seconds: float, compute_seconds: float,
                     per_rank_rate: float, steps: int, losses: Optional[Mapping[str, float]],
                     lrs: Optional[Mapping[str, float]], grad_norms: Optional[Mapping[str, float]]) -> None:
        lab = self._labels
        self._step.labels(**lab).set(step)
        self._epoch.labels(**lab).set(epoch)
        self._samples.labels(**lab).inc(images)
        self._throughput.labels(**lab).set(per_rank_rate)
        # Only interval sums are known: each step of the interval is observed at the interval mean.
        for phase, seconds in (("data", data_seconds), ("compute", compute_seconds)):
            child = self._step_seconds.labels(**lab, phase=phase)
            for _ in range(steps):
                child.observe(seconds / steps)
        for term, value in (losses or {}).items():
            self._loss.labels(**lab, term=term).set(value)
        for net, value in (lrs or {}).items():
            self._lr.labels(**lab, net=net).set(value)
        for net, value in (grad_norms or {}).items():
            self._grad_norm.labels(**lab, net=net).set(value)
        self._beat()
        self._discovery.refresh()

    def record_nonfinite_skip(self, n: int = 1) -> None:
        """Count ``n`` optimizer steps that were skipped because a loss or gradient was not finite."""
        if self.enabled:
            self._nonfinite.labels(**self._labels).inc(n)
            self._beat()

    def record_corrupt(self, n: int = 1) -> None:
        """Count ``n`` corrupt samples the loader skipped."""
        if self.enabled and n:
            self._corrupt.labels(**self._labels).inc(n)

    def record_device_memory(self, num_bytes: int) -> None:
        """Device memory in use (e.g. ``torch.cuda.memory_allocated()``; RSS on CPU)."""
        if self.enabled:
            self._memory.labels(**self._labels).set(num_bytes)

    def record_checkpoint(self, seconds: float, bytes: int, success: bool = True) -> None:  # noqa: A002 - API name
        """One checkpoint save finished (or failed) after ``seconds``; ``bytes`` = its total size."""
        if not self.enabled:
            return
        lab = self._labels
        self._ckpt_saves.labels(**lab, result="success" if success else "failure").inc()
        if success:
            self._ckpt_seconds.labels(**lab).set(seconds)
            self._ckpt_bytes.labels(**lab).set(bytes)
            self._ckpt_last.labels(**lab).set(time.time())
        self._beat()

    def record_health_signal(self, signal: str, term: str, value: float) -> None:
        """The latest value of one health signal (``term``: the loss term of a spike ratio, else "")."""
        if self.enabled:
            self._health.labels(**self._labels, signal=signal, term=term).set(value)

    def record_health_event(self, signal: str, action: str) -> None:
        """A health signal fired; ``action`` is what its policy did (warn / rewind / stop)."""
        if self.enabled:
            self._health_events.labels(**self._labels, signal=signal, action=action).inc()

    def record_checkpoint_commit(self, step: int, step_dir: Union[str, Path], seconds: float) -> None:
        """``CheckpointManager(on_commit=...)`` hook: a committed step directory, measured on disk."""
        if self.enabled:
            self.record_checkpoint(seconds=seconds, bytes=tree_bytes(step_dir), success=True)


# --------------------------------------------------------------------------------------------
# Evaluation results
# --------------------------------------------------------------------------------------------


class EvalMetrics:
    """The evaluator's scores of a run (``spade-eval watch`` / ``once``), one gauge per value.

    ``spade_eval_<metric>`` for each metric of ``eval.metrics`` (``fid``, ``kid`` = the KID mean,
    ``miou``, ``pixel_accuracy``), ``spade_eval_kid_std``, ``spade_eval_real_<metric>`` for the real
    images' segmentation row, ``spade_eval_best_<metric>`` (the best so far under the current
    protocol, as the watcher tracks it), ``spade_eval_best_step`` (the checkpoint of eval/best.json),
    ``spade_eval_step``, ``spade_eval_seconds`` and ``spade_eval_last_timestamp_seconds``. Metrics
    that are not computed get no series.

    Mode follows the config: with ``metrics.pushgateway`` set, every :meth:`record` pushes the group
    ``job="spade-eval", run, job_id`` (for one-off jobs that exit before a scrape); otherwise
    :meth:`start` serves on a free port and writes its own file_sd file ``<run>-<job_id>-eval.json``
    beside the trainer's, so the same Prometheus job discovers it.
    """

    PUSH_JOB = "spade-eval"

    def __init__(self, cfg: MetricsConfig, run_dir: Union[str, Path], node: Optional[str] = None) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.node = node or socket.gethostname()
        self.run, self.job_id = resolve_run_labels(cfg, run_dir)
        self.sd_path = resolve_sd_dir(cfg, run_dir) / sd_file_name(self.run, self.job_id, "eval")
        self.push_mode = bool(cfg.pushgateway)
        self.port: Optional[int] = None
        self._server: Any = None
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"run": self.run, "job_id": self.job_id}
        names = list(EVAL_LABELS)
        reg = self.registry
        self._value = {m: Gauge(f"spade_eval_{m}", f"{info.label} of the last evaluated checkpoint.", names, registry=reg)
                       for m, info in METRICS.items()}
        self._best = {m: Gauge(f"spade_eval_best_{m}", f"Best {info.label} of the run so far (current protocol).",
                               names, registry=reg) for m, info in METRICS.items()}
        self._real = {m: Gauge(f"spade_eval_real_{m}", f"{METRICS[m].label} of the segmenter on the real images.",
                               names, registry=reg) for m in ("miou", "pixel_accuracy")}
        self._kid_std = Gauge("spade_eval_kid_std", "KID standard deviation over subsets.", names, registry=reg)
        self._best_step = Gauge("spade_eval_best_step", "Training step of the best checkpoint (eval/best.json).",
                                names, registry=reg)
        self._step = Gauge("spade_eval_step", "Training step of the last evaluated checkpoint.", names, registry=reg)
        self._seconds = Gauge("spade_eval_seconds", "Duration of the last evaluation.", names, registry=reg)
        self._last = Gauge("spade_eval_last_timestamp_seconds", "Unix time of the last finished evaluation.", names, registry=reg)

    def start(self) -> None:
        """Serve mode: start the server and write the evaluator's discovery file."""
        if not self.enabled or self.push_mode or self._server is not None:
            return
        self._server, _ = _start_server(self.registry, 0, self.cfg.bind, "evaluator metrics exporter", "metrics.bind")
        self.port = self._server.server_port
        target = f"{advertised_host(self.cfg.bind, self.node)}:{self.port}"
        write_json_atomic(self.sd_path, [{"targets": [target], "labels": {**self._labels, "role": "eval"}}], sort_keys=True)

    def record(self, step: int, record: Mapping[str, Any], best: Mapping[str, float], best_step: int) -> None:
        """Publish one evaluation: ``record`` is its metrics.jsonl line (or ``spade-eval once`` result),
        ``best`` the best value per metric so far and ``best_step`` the step of eval/best.json."""
        if not self.enabled:
            return
        lab = self._labels
        real = record.get("real") if isinstance(record.get("real"), dict) else {}
        for metric in METRICS:
            value = metric_value(record, metric)
            if value is not None:
                self._value[metric].labels(**lab).set(value)
            if metric in best:
                self._best[metric].labels(**lab).set(best[metric])
            if metric in self._real and metric_value(real, metric) is not None:
                self._real[metric].labels(**lab).set(metric_value(real, metric))
        if metric_value(record, "kid") is not None:
            self._kid_std.labels(**lab).set(float(record["kid_std"]))
        self._best_step.labels(**lab).set(best_step)
        self._step.labels(**lab).set(step)
        self._seconds.labels(**lab).set(float(record.get("seconds", 0.0)))
        self._last.labels(**lab).set(time.time())
        if self.push_mode:
            push_job_metrics(self.cfg.pushgateway, self.PUSH_JOB, self.registry, self._labels)

    def close(self, delete_pushed: bool = False) -> None:
        """Stop serving and remove the discovery file; optionally delete the pushed group."""
        if self._server is not None:
            _stop_server(self._server)
            self._server = None
            self.sd_path.unlink(missing_ok=True)
        if delete_pushed and self.enabled and self.push_mode:
            delete_job_metrics(self.cfg.pushgateway, self.PUSH_JOB, self._labels)
