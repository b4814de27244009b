"""Prometheus ``file_sd`` discovery: run labels, where discovery files live, and the file itself.

Rank 0 of a training job writes ``<sd_dir>/<run>-<job_id>.json`` listing every rank's ``host:port``
(the ranks exchange their bound ports first) and removes it when the job ends; an evaluator writes
its own ``<run>-<job_id>-eval.json`` beside it. Prometheus scrapes these targets with
``honor_labels: true`` so the labels the exporter puts on its samples are kept as they are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from spade_dist.config import MetricsConfig
from spade_dist.files import write_json_atomic
from spade_dist.monitoring import MetricsError
from spade_dist.run_dir import RunDir


def resolve_run_labels(cfg: MetricsConfig, run_dir: Union[str, Path]) -> tuple[str, str]:
    """Return ``(run, job_id)``: config values, else the run dir's name and the job's identity.

    The job identity is one value for every rank of the job: an elastic job's id
    (``$TORCHELASTIC_RUN_ID``, shared by all its agents, also when its nodes join as separate Slurm
    jobs each with its own ``$SLURM_JOB_ID``), else ``$SLURM_JOB_ID``, else "local".
    """
    run = cfg.run_name or Path(run_dir).resolve().name
    # TORCHELASTIC_RUN_ID read here, not through spade_dist.distributed.elastic_job_id: that module
    # imports torch, and the exporters stay importable without it (short evaluation jobs).
    job_id = cfg.job_id or os.environ.get("TORCHELASTIC_RUN_ID", "") or os.environ.get("SLURM_JOB_ID", "") or "local"
    for key, value in (("metrics.run_name", run), ("metrics.job_id", job_id)):
        # The values become file names and label values: keep them to a safe alphabet.
        if not value or any(c in value for c in "/\\\n\""):
            raise MetricsError(f"{key}: invalid value {value!r} (must be non-empty, without / \\ \" or newline)")
    return run, job_id


def resolve_sd_dir(cfg: MetricsConfig, run_dir: Union[str, Path]) -> Path:
    """``metrics.sd_dir``, or ``<run_dir>/metrics`` when empty."""
    return Path(cfg.sd_dir) if cfg.sd_dir else RunDir(run_dir).metrics


def sd_file_name(run: str, job_id: str, suffix: str = "") -> str:
    """One discovery file per job (and one per evaluator: ``suffix="eval"``)."""
    return f"{run}-{job_id}{'-' + suffix if suffix else ''}.json"


def advertised_host(bind: str, node: str) -> str:
    """The host Prometheus should scrape: the bind address, or the node name for a wildcard bind."""
    return node if bind in ("", "0.0.0.0", "::") else bind


class DiscoveryFile:
    """One file_sd file: written atomically, rewritten if someone removed it, removed at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._groups: list[dict[str, Any]] = []
        self.written = False

    def write(self, groups: list[dict[str, Any]]) -> None:
        self._groups = groups
        write_json_atomic(self.path, groups, sort_keys=True)
        self.written = True

    def refresh(self) -> None:
        """Rewrite the file when it vanished (someone cleaned the shared directory while the job lives)."""
        if self.written and not self.path.exists():
            write_json_atomic(self.path, self._groups, sort_keys=True)

    def remove(self) -> None:
        if self.written:
            self.path.unlink(missing_ok=True)
            self.written = False
