"""Run health: notice divergence, discriminator saturation, generator collapse and cross-rank drift.

Signals (``train.health``, docs/HEALTH.md):

- ``nonfinite``: a streak of consecutive steps whose G or D update was skipped (non-finite loss or
  gradient).
- ``spike``: a loss term's median over one logging interval far above the running median of its
  recent per-step values (a robust band: median + ``spike_mads`` x 1.4826 x MAD).
- ``grad_norm``: the total gradient norm of G or D on a logging step above ``grad_norm_ratio`` x the
  median of its recent logging steps (one value per interval, heavy-tailed: a ratio, not a band).
- ``saturation``: the discriminator wins: D loss (D_Fake + D_real) below ``saturation_d_loss`` for
  ``d_loss_steps`` consecutive steps (hinge: every real logit > 1 and every fake one < -1).
- ``divergence``: D loss above ``divergence_d_loss`` for ``d_loss_steps`` consecutive steps (an absurd
  learning rate diverges from the first steps, before a spike band has a history to compare with).
- ``collapse``: the EMA generator's output diversity on a fixed label batch (mean pairwise L1
  distance of VGG features, or of pixels without the VGG loss) below ``collapse_ratio`` x the highest
  diversity of the run.
- ``drift``: a checksum of the replicated state differs between ranks.

Host synchronisation: every step only appends device tensors (loss terms, skip flags); on logging
steps they are stacked, averaged over ranks in one all-reduce and read once, which is the logging
step's existing sync point. Collapse and drift have their own schedules (``collapse_every``,
``consistency_every``) with one small collective each. Every rank reaches the same decision from the
same reduced numbers, so a stop leaves the loop on all ranks at the same step.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from spade_dist.checkpoint.layout import checkpoints_dir, is_committed, list_step_dirs, step_of
from spade_dist.config import Config
from spade_dist.files import write_json_atomic
from spade_dist.logs import PROGRESS_LOGGER
from spade_dist.run_dir import RunDir
from spade_dist.train.step import StepResult, judges_images_independently

log = logging.getLogger(PROGRESS_LOGGER)

SIGNALS = ("nonfinite", "spike", "grad_norm", "saturation", "divergence", "collapse", "drift")
GRAD_NORM_PREFIX = "grad_norm_"
D_TERMS = ("D_Fake", "D_real")
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x this = its standard deviation
SPIKE_MIN_HISTORY = 8  # per-step values a band needs before it judges
COLLAPSE_LABELS = 4  # fixed label maps of the collapse check


@dataclass
class HealthEvent:
    """One signal firing: what, when, the numbers behind it and the policy that acted."""

    step: int
    signal: str
    action: str  # warn | rewind | stop
    detail: str
    last_healthy_checkpoint: Optional[str]
    time: float

    def line(self) -> str:
        where = self.last_healthy_checkpoint or "none (no committed checkpoint before it)"
        return f"health: {self.signal} at step {self.step}: {self.detail}; last healthy checkpoint: {where}"


def robust_band(history: list[float]) -> tuple[float, float]:
    """(median, robust standard deviation = 1.4826 x MAD) of ``history``. The deviation is floored
    at 1e-3 of the median's size, so a flat history does not make every wiggle a spike."""
    t = torch.tensor(history, dtype=torch.float64)
    median = float(t.median())
    mad = float((t - median).abs().median())
    return median, max(MAD_TO_SIGMA * mad, 1e-3 * abs(median), 1e-8)


def state_checksum(modules: list[nn.Module], with_buffers: list[bool]) -> torch.Tensor:
    """Per tensor of each module's parameters (and, where asked, floating-point buffers): its sum and
    its L2 norm, accumulated in float64. Equal replicas give bit-identical values on every rank; a
    change of any value changes them (a permutation within one tensor does not)."""
    stats = []
    for module, buffers in zip(modules, with_buffers):
        tensors = [p.detach() for p in module.parameters()]
        if buffers:
            tensors += [b.detach() for b in module.buffers() if b.is_floating_point()]
        for t in tensors:
            stats += [t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)]
    return torch.stack(stats).cpu() if stats else torch.zeros(1, dtype=torch.float64)


def differing_ranks(checksums: list[torch.Tensor]) -> list[int]:
    """Ranks whose checksum differs from the most common one (ties: rank 0's)."""
    keys = [tuple(c.tolist()) for c in checksums]
    counts = {k: keys.count(k) for k in keys}
    best = max(counts.values())
    majority = keys[0] if counts[keys[0]] == best else next(k for k in keys if counts[k] == best)
    return [r for r, k in enumerate(keys) if k != majority]


def last_healthy_checkpoint(run_dir: Path, clean_step: int) -> Optional[Path]:
    """The newest committed checkpoint at or before ``clean_step`` (the last step checked clean)."""
    for step_dir in reversed(list_step_dirs(checkpoints_dir(run_dir))):
        step = step_of(step_dir)
        if step is not None and step <= clean_step and is_committed(step_dir):
            return step_dir
    return None


class HealthMonitor:
    """Observes every step (device tensors only), judges on its schedules, records and acts.

    ``after_step`` returns the event that stops the run (policy ``stop``), else None. The state
    record ``state.health`` (saved in every checkpoint) keeps the last clean step per signal and the
    highest output diversity, so a resumed run judges against the same history.
    """

    def __init__(self, cfg: Config, state: Any, run: RunDir, metrics: Any, device: torch.device,
                 rank: int, world_size: int, max_steps: int, vgg: Optional[nn.Module],
                 syncbn_ranks: int) -> None:
        self.cfg, self.health = cfg, cfg.train.health
        self.state, self.run, self.metrics, self.device = state, run, metrics, device
        self.rank, self.world, self.max_steps = rank, world_size, max_steps
        self.enabled = self.health.enabled
        health = self.health
        # What each signal's policy does (warn / rewind / stop), by signal name.
        self.actions = {"nonfinite": health.on_nonfinite, "spike": health.on_spike, "grad_norm": health.on_grad_norm,
                        "saturation": health.on_saturation, "divergence": health.on_divergence,
                        "collapse": health.on_collapse, "drift": health.on_drift}
        self.vgg = vgg
        self.is_main = rank == 0
        self.collapse_every = self.health.collapse_every or cfg.train.sample_every
        # Replicated buffers: BN running statistics are equal on every rank only when SyncBN spans
        # the world; D's are equal when D has no batch statistics of its own (spectral-norm vectors).
        generator_buffers = syncbn_ranks == world_size
        self._checked = [state.generator_side, state.discriminator, state.ema.model]
        self._buffers = [generator_buffers, judges_images_independently(state.discriminator), generator_buffers]
        self._pending: list[dict[str, torch.Tensor]] = []
        self._history: dict[str, deque] = {}
        self._nonfinite_run = 0
        self._saturated_run = 0
        self._diverged_run = 0
        self.judge_d_loss = cfg.loss.gan_mode != "w"  # a Wasserstein D loss has no healthy range
        self._active: set[str] = set()
        self._fixed_labels: Optional[torch.Tensor] = None
        record = state.health
        record.setdefault("clean_at", {s: state.step for s in SIGNALS})
        record.setdefault("diversity_max", 0.0)
        record.setdefault("events", 0)
        self.rewinds: list[int] = list(record.get("rewinds", []))  # steps at which the run rewound
        self.events_seen = int(record["events"])
        self._values: dict[str, Any] = {}
        self.verdict: Optional[HealthEvent] = None

    # -- every step ---------------------------------------------------------------------------
    def after_step(self, step: int, result: StepResult, semantics: torch.Tensor,
                   grad_norms: Optional[dict[str, float]] = None) -> Optional[HealthEvent]:
        """Observe the step; on the signals' schedules judge, record and return the event that acts
        (rewind / stop), else None. ``grad_norms``: the logging step's total gradient norms per network."""
        if not self.enabled:
            return None
        self.observe(result, semantics, grad_norms)
        fired: list[HealthEvent] = []
        self._values = {}
        if step % self.cfg.train.log_every == 0 or step == self.max_steps:
            fired += self.judge_interval(step)
        if step % self.collapse_every == 0 or step == self.max_steps:
            fired += self._judge_collapse(step)
        if self.health.consistency_every and (step % self.health.consistency_every == 0 or step == self.max_steps):
            fired += self._judge_drift(step)
        if self._values and self.is_main:
            self._append(self.run.health_signals, {"step": step, **self._values})
        acting = None
        for event in fired:
            self._record(event)
            if event.action == "stop" and self.verdict is None:
                self.verdict = event
            elif event.action == "rewind" and acting is None:
                acting = event
        return self.verdict or acting

    def after_rewind(self, event: HealthEvent) -> None:
        """The run went back to ``event.last_healthy_checkpoint`` (its state, health record included,
        restored): forget the abandoned steps' observations, keep the count of rewinds."""
        self.rewinds.append(event.step)
        self.state.health["rewinds"] = list(self.rewinds)
        self.state.health["events"] = self.events_seen
        self._pending, self._history, self._active = [], {}, set()
        self._nonfinite_run = self._saturated_run = self._diverged_run = 0

    def observe(self, result: StepResult, semantics: torch.Tensor, grad_norms: Optional[dict[str, float]] = None) -> None:
        """A step's device tensors kept for the next judgement (no host sync); the first label maps
        this rank trains on (up to :data:`COLLAPSE_LABELS`) become the fixed labels of the collapse check."""
        held = self._fixed_labels
        if held is None or held.shape[0] < COLLAPSE_LABELS:
            more = semantics[:COLLAPSE_LABELS].detach().clone()
            self._fixed_labels = more if held is None else torch.cat([held, more])[:COLLAPSE_LABELS]
        values = {k: v.detach().float() for k, v in result.losses.items()}
        values["__skipped"] = torch.maximum(result.skipped_G, result.skipped_D).float()
        for net, norm in (grad_norms or {}).items():  # host floats already (read on the logging step)
            values[f"{GRAD_NORM_PREFIX}{net}"] = torch.tensor(norm, dtype=torch.float32, device=self.device)
        self._pending.append(values)

    # -- logging steps: non-finite streak, spikes, saturation ---------------------------------
    def judge_interval(self, step: int) -> list[HealthEvent]:
        """Judge the steps observed since the last logging step (ending at ``step``)."""
        names = sorted({k for row in self._pending for k in row})
        nan = torch.full((), float("nan"), device=self.device)
        matrix = torch.stack([torch.stack([row.get(k, nan) for k in names]) for row in self._pending])
        if self.world > 1:
            dist.all_reduce(matrix)  # one collective per logging step; every rank judges the same numbers
            matrix = matrix / self.world
        rows = matrix.double().cpu()  # the logging step's host sync
        first = step - len(self._pending) + 1
        self._pending = []
        column = {k: rows[:, i] for i, k in enumerate(names)}
        fired = []
        # Non-finite streak (a skip on any rank skips on all: the reduced flag is 0 or 1).
        for i, skipped in enumerate(column["__skipped"].tolist()):
            self._nonfinite_run = self._nonfinite_run + 1 if skipped > 0 else 0
            if self._nonfinite_run >= self.health.nonfinite_streak:
                fired += self._fire("nonfinite", first + i, f"{self._nonfinite_run} consecutive steps skipped as non-finite")
        if self._nonfinite_run < self.health.nonfinite_streak:
            self._clear("nonfinite", step)
        # The D loss out of its healthy range: saturation below, divergence above.
        if self.judge_d_loss and all(k in column for k in D_TERMS):
            d_loss = column[D_TERMS[0]] + column[D_TERMS[1]]
            health = self.health
            for i, value in enumerate(d_loss.tolist()):
                self._saturated_run = self._saturated_run + 1 if value < health.saturation_d_loss else 0
                self._diverged_run = self._diverged_run + 1 if not value <= health.divergence_d_loss else 0
                if self._saturated_run >= health.d_loss_steps:
                    fired += self._fire("saturation", first + i,
                                        f"D loss {value:.4g} < {health.saturation_d_loss} for {self._saturated_run} steps")
                if self._diverged_run >= health.d_loss_steps:
                    fired += self._fire("divergence", first + i,
                                        f"D loss {value:.4g} > {health.divergence_d_loss} for {self._diverged_run} steps")
            if self._saturated_run < health.d_loss_steps:
                self._clear("saturation", step)
            if self._diverged_run < health.d_loss_steps:
                self._clear("divergence", step)
            self._values["min_d_loss"] = round(float(d_loss.min()), 5)
            self._values["max_d_loss"] = round(float(d_loss.max()), 5)
        # Loss spikes against each term's running band.
        fired += self._judge_grad_norms(step, {k: v for k, v in column.items() if k.startswith(GRAD_NORM_PREFIX)})
        spiking = []
        for name in names:
            if name.startswith("__") or name.startswith(GRAD_NORM_PREFIX):
                continue
            values = [v for v in column[name].tolist() if math.isfinite(v)]
            history = self._history.setdefault(name, deque(maxlen=self.health.spike_window))
            if values and len(history) >= SPIKE_MIN_HISTORY:
                median, scale = robust_band(list(history))
                now = float(torch.tensor(values).median())
                score = (now - median) / scale  # robust deviations above the running median
                if score > self.health.spike_mads:
                    spiking.append(f"{name} {now:.4g} is {score:.3g} robust deviations above its running median "
                                   f"{median:.4g} (train.health.spike_mads {self.health.spike_mads})")
                self._values.setdefault("spike_score", {})[name] = round(score, 3)
                if self.metrics is not None:
                    self.metrics.record_health_signal("spike_score", name, score)
            history.extend(values)
        if spiking:
            fired += self._fire("spike", step, "; ".join(spiking))
        else:
            self._clear("spike", step)
        self._values.update(nonfinite_streak=self._nonfinite_run, saturated_steps=self._saturated_run,
                            diverged_steps=self._diverged_run)
        if self.metrics is not None:
            self.metrics.record_health_signal("nonfinite_streak", "", float(self._nonfinite_run))
            self.metrics.record_health_signal("saturated_steps", "", float(self._saturated_run))
            self.metrics.record_health_signal("diverged_steps", "", float(self._diverged_run))
        return fired

    def _judge_grad_norms(self, step: int, columns: dict[str, torch.Tensor]) -> list[HealthEvent]:
        exploding = []
        for name, column in columns.items():
            values = [v for v in column.tolist() if math.isfinite(v)]
            history = self._history.setdefault(name, deque(maxlen=self.health.spike_window))
            if values and len(history) >= SPIKE_MIN_HISTORY:
                median = float(torch.tensor(list(history), dtype=torch.float64).median())
                ratio = values[-1] / median if median > 0 else 1.0
                self._values.setdefault("grad_norm_ratio", {})[name] = round(ratio, 3)
                if self.metrics is not None:
                    self.metrics.record_health_signal("grad_norm_ratio", name, ratio)
                if ratio > self.health.grad_norm_ratio:
                    exploding.append(f"{name} {values[-1]:.4g} is {ratio:.3g} x its running median {median:.4g} "
                                     f"(train.health.grad_norm_ratio {self.health.grad_norm_ratio})")
            history.extend(values)
        if exploding:
            return self._fire("grad_norm", step, "; ".join(exploding))
        self._clear("grad_norm", step)
        return []

    # -- collapse: EMA generator diversity on a fixed label batch ---------------------------------
    @torch.no_grad()
    def output_diversity(self, generator: nn.Module) -> float:
        """Mean pairwise L1 distance between the features of the EMA generator's outputs for the
        fixed label maps; with a VAE generator two style draws each (without, a second draw would be
        the same image)."""
        assert self._fixed_labels is not None
        labels = self._fixed_labels
        draws = 2 if self.cfg.model.use_vae else 1
        was_training = generator.training
        generator.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training RNG streams stay untouched
            torch.manual_seed(self.cfg.train.seed)
            fakes = torch.cat([generator(labels) for _ in range(draws)]).float()
        generator.train(was_training)
        features = self.vgg(fakes)[-1] if self.vgg is not None else fakes
        flat = features.flatten(1)
        distances = torch.cdist(flat, flat, p=1) / flat.shape[1]
        n = flat.shape[0]
        return float(distances.sum() / (n * (n - 1)))

    def _judge_collapse(self, step: int) -> list[HealthEvent]:
        if self._fixed_labels is None or (self._fixed_labels.shape[0] < 2 and not self.cfg.model.use_vae):
            return []  # one label map, one image: no pair to compare yet (same on every rank: same batch size)
        diversity = torch.tensor([self.output_diversity(self.state.ema_generator)], dtype=torch.float64)
        if self.world > 1:
            diversity = diversity.to(self.device)
            dist.all_reduce(diversity)
            diversity = diversity.cpu() / self.world
        value = float(diversity)
        record = self.state.health
        self._values["diversity"] = value
        if self.metrics is not None:
            self.metrics.record_health_signal("diversity", "", value)
        limit = self.health.collapse_ratio * record["diversity_max"]
        if not math.isfinite(value) or value < limit:
            return self._fire("collapse", step, f"EMA generator output diversity {value:.4g} < {limit:.4g} "
                                                f"({self.health.collapse_ratio} x the run's highest, {record['diversity_max']:.4g})")
        record["diversity_max"] = max(record["diversity_max"], value)
        self._clear("collapse", step)
        return []

    # -- drift: replicated state equal on every rank ---------------------------------------------
    def replica_checksum(self) -> torch.Tensor:
        """This rank's checksum of the state every rank holds the same (G side, D, EMA generator)."""
        return state_checksum(self._checked, self._buffers)

    def _judge_drift(self, step: int) -> list[HealthEvent]:
        if self.world == 1:
            self._clear("drift", step)
            return []
        mine = self.replica_checksum().to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        ranks = differing_ranks([g.cpu() for g in gathered])
        self._values["drifted_ranks"] = ranks
        if self.metrics is not None:
            self.metrics.record_health_signal("drifted_ranks", "", float(len(ranks)))
        if ranks:
            return self._fire("drift", step, f"parameters / buffers of rank(s) {', '.join(map(str, ranks))} differ "
                                             "from the other ranks' (a hardware or communication fault)")
        self._clear("drift", step)
        return []

    # -- events ------------------------------------------------------------------------------
    def _fire(self, signal: str, step: int, detail: str) -> list[HealthEvent]:
        """An event when ``signal`` starts firing (once per episode: it re-arms after a clean check)."""
        if signal in self._active:
            return []
        self._active.add(signal)
        action = self.actions[signal]
        clean = int(self.state.health["clean_at"].get(signal, 0))
        healthy = last_healthy_checkpoint(self.run.root, clean)
        if action == "rewind":
            recent = [s for s in self.rewinds if step - s < self.health.rewind_window]
            if healthy is None:
                action, detail = "stop", f"{detail}; no healthy checkpoint to rewind to"
            elif len(recent) >= self.health.max_rewinds:
                action, detail = "stop", (f"{detail}; already {len(recent)} rewind(s) within {self.health.rewind_window} "
                                          "steps (train.health.max_rewinds)")
        return [HealthEvent(step=step, signal=signal, action=action, detail=detail,
                            last_healthy_checkpoint=str(healthy) if healthy is not None else None, time=time.time())]

    def _clear(self, signal: str, step: int) -> None:
        self._active.discard(signal)
        self.state.health["clean_at"][signal] = step

    def _record(self, event: HealthEvent) -> None:
        self.events_seen += 1
        self.state.health["events"] = self.events_seen
        if self.metrics is not None:
            self.metrics.record_health_event(event.signal, event.action)
        if not self.is_main:
            return
        if event.action == "warn":
            log.warning(event.line())
        elif event.action == "rewind":
            log.warning(f"{event.line()}; rewinding to it")
        self._append(self.run.health_events, asdict(event))

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_verdict(self, step: int) -> None:
        """Rank 0, at the end of the run: ``health/verdict.json`` (``spade-run health`` prints it)."""
        if not self.is_main or not self.enabled:
            return
        if self.verdict is not None:
            payload = {"status": "stopped", "step": self.verdict.step, "signal": self.verdict.signal,
                       "line": self.verdict.line(), "last_healthy_checkpoint": self.verdict.last_healthy_checkpoint}
        else:
            payload = {"status": "healthy", "step": step, "events": self.events_seen, "rewinds": len(self.rewinds),
                       "line": f"health: no stopping signal up to step {step} "
                               f"({self.events_seen} warning / rewind event(s) in {self.run.health_events})"}
        write_json_atomic(self.run.health_verdict, payload, sort_keys=True)

