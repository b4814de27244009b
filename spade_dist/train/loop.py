"""The training loop: data -> step -> log / samples / checkpoint / metrics / eval hooks.

Reads top to bottom in :func:`train`. Every rank runs the same code; what a rank does beyond the
step (write files, print, start the evaluator) follows from ``rank == 0``. Collectives happen at the
same points on every rank: the step itself, ``ckpt.maybe_save`` / ``ckpt.should_stop`` after each
step, the health monitor's checks on their schedules (and a health rewind's restore), and the final save.

Host synchronisation: loss values stay device tensors and are read only on logging steps (the health
monitor reads its signals there too); the stop-flag all-reduce of the checkpoint manager is one tiny
gloo collective per step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from spade_dist.config import Config
from spade_dist.distributed import batch_geometry, collective_timeout, elastic_job_id
from spade_dist.exit_codes import EXIT_UNHEALTHY
from spade_dist.files import write_json_atomic
from spade_dist.logs import PROGRESS_LOGGER
from spade_dist.models.compat import GeneratorInit
from spade_dist.models.fast.choice import SpeedPathChoice
from spade_dist.models.sync_bn import attach_syncbn_group
from spade_dist.run_dir import RunDir
from spade_dist.train.backends import BACKENDS, TrainBackend
from spade_dist.train.faults import FaultInjector
from spade_dist.train.health import HealthEvent, HealthMonitor
from spade_dist.train.samples import SampleWriter
from spade_dist.train.state import TrainState, build_train_state
from spade_dist.train.step import LossSet, StepResult, autocast_context, prepare_batch, train_step
from spade_dist.train.trackers import ExperimentTrackers

if TYPE_CHECKING:
    from spade_dist.checkpoint import CheckpointManager

# How long a finished run waits for its evaluation watcher to score the remaining checkpoints.
EVAL_DRAIN_SECONDS = 1800.0

# Progress lines (``[spade-train] ...`` once the entry point called spade_dist.logs.configure_logging,
# which also keeps them to rank 0).
log = logging.getLogger(PROGRESS_LOGGER)


@dataclass
class TrainResult:
    """What a finished (or preempted) call of :func:`train` reports."""

    step: int
    epoch: int
    run_dir: Path
    stopped_early: bool  # preemption signal: checkpoint written, exit with the requeue code
    exit_code: int
    nonfinite_skips: int
    health_stop: Optional[HealthEvent] = None  # the health signal that stopped the run (train.health)


def progress_text(step: int, max_steps: int, seconds_per_step: float) -> str:
    """``step/total (pct%) ETA h:mm:ss``, the ETA at the last logging interval's pace."""
    from tqdm import tqdm  # its interval formatting

    pct = 100.0 * step / max_steps if max_steps > 0 else 100.0
    remaining = max(0, max_steps - step) * seconds_per_step
    return f"{step}/{max_steps} ({pct:.0f}%) ETA {tqdm.format_interval(remaining)}"


class ProgressMeter:
    """Accumulates wall time split into data wait / compute and formats the progress line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.data_s = 0.0
        self.images = 0
        self.steps = 0

    def line(self, state: TrainState, result: StepResult, world: int, max_steps: int) -> tuple[str, dict[str, float]]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        losses = {k: float(v) for k, v in result.losses.items()}  # the host sync of a logging step
        lr_G, lr_D = state.lrs()
        terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        text = (
            f"step {state.step} epoch {state.epoch} | {progress_text(state.step, max_steps, elapsed / max(self.steps, 1))} | "
            f"{self.images * world / elapsed:.1f} img/s | {terms} | "
            f"lr G {lr_G:.2e} D {lr_D:.2e} | data wait {100.0 * self.data_s / elapsed:.0f}% | "
            f"nonfinite skips {state.nonfinite_skips}"
        )
        return text, losses


class StepLog:
    """The logging hook of the loop: owns its schedule (every ``train.log_every`` steps and the last
    one), the interval meter, the counters it reports as deltas (non-finite skips, corrupt samples)
    and the gradient-norm tracker it arms one step ahead (the backends zero gradients after stepping).
    """

    def __init__(self, cfg: Config, backend: TrainBackend, state: TrainState, loader: Any, metrics: Any,
                 trackers: ExperimentTrackers, max_steps: int) -> None:
        from spade_dist.train.grad_norm import GradNormTracker

        self.cfg, self.state, self.loader, self.metrics, self.trackers = cfg, state, loader, metrics, trackers
        self.world, self.device, self.max_steps = backend.info.world_size, backend.device, max_steps
        self.meter = ProgressMeter()
        self._skips_logged = 0
        self._corrupt_logged = 0
        self.latest_grad_norms: dict[str, float] = {}
        # Not with a partitioned optimizer (ZeRO 1/2): it holds only this rank's gradient share.
        self.grad_norms = (None if backend.partitioned_optimizer
                           else GradNormTracker({"G": state.opt_G, "D": state.opt_D}))

    def due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.max_steps

    def before_step(self, step: int) -> None:
        """Arm the gradient-norm capture when the coming ``step`` is a logging step."""
        if self.grad_norms is not None and self.due(step):
            self.grad_norms.arm()

    def maybe_log(self, step: int, result: StepResult, micro: list[Any]) -> None:
        """Count the step; on a logging step print the line and report metrics, trackers, counters."""
        from spade_dist.monitoring.exporter import device_memory_bytes

        meter, state = self.meter, self.state
        meter.images += sum(m.real.shape[0] for m in micro)
        meter.steps += 1
        if not self.due(step):
            return
        text, loss_values = meter.line(state, result, self.world, self.max_steps)
        log.info(text)
        elapsed = time.perf_counter() - meter.started
        lr_G, lr_D = state.lrs()
        norms = self.grad_norms.collect() if self.grad_norms is not None else {}
        self.latest_grad_norms = norms  # the health monitor judges them with this step
        self.metrics.record_step(step, state.epoch, images=meter.images, data_seconds=meter.data_s,
                                 compute_seconds=max(0.0, elapsed - meter.data_s), losses=loss_values,
                                 lrs={"G": lr_G, "D": lr_D}, steps=meter.steps, grad_norms=norms)
        self.trackers.log_scalars({
            **{f"loss/{k}": v for k, v in loss_values.items()}, "lr/G": lr_G, "lr/D": lr_D,
            **{f"grad_norm/{k}": v for k, v in norms.items()},
            "images_per_sec": meter.images * self.world / max(elapsed, 1e-9),
            "data_wait_share": meter.data_s / max(elapsed, 1e-9),
        }, step)
        self.metrics.record_device_memory(device_memory_bytes(self.device))
        skips, corrupt = state.nonfinite_skips, self.loader.corrupt_samples
        self.metrics.record_nonfinite_skip(skips - self._skips_logged)
        self.metrics.record_corrupt(corrupt - self._corrupt_logged)
        self._skips_logged, self._corrupt_logged = skips, corrupt
        meter.reset()


def setup_backend(cfg: Config) -> TrainBackend:
    """Process group first (Accelerate or DeepSpeed), so SyncBN groups can be made before models."""
    return BACKENDS[cfg.train.backend].setup(cfg)


def write_run_files(run: RunDir, cfg: Config) -> None:
    run.samples.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg.to_yaml())  # atomic: an FID watcher may read it at any moment
    run.clear_start_markers()  # a resumed run is neither done nor asking for a requeue yet


def record_init_generator(run: RunDir, init: GeneratorInit) -> None:
    """A fine-tuning run's starting point (path, format, sha256, encoder), in the log and the run dir."""
    write_json_atomic(run.init_generator, init.to_dict(), sort_keys=True)
    log.info(f"generator initialised from {init.path} ({init.format} format, sha256 {init.sha256}); "
             f"encoder {init.encoder or 'fresh'}; discriminator and optimizers fresh")


def micro_batches(loader: Any, grad_accum: int, meter: ProgressMeter) -> Iterator[list[dict[str, Any]]]:
    """Group the loader's batches by ``grad_accum``.

    A trailing partial group is one (smaller) update of its own, not dropped: the loader counts
    its samples as delivered, and after a resume on another world size the batches left of an
    epoch rarely divide by the accumulation, so dropping would lose samples of the epoch. Every
    rank gets the same number of batches, so every rank has the same groups.
    """
    group: list[dict[str, Any]] = []
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            if group:
                yield group
            return
        meter.data_s += time.perf_counter() - t0
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []


def updates(batches: int, grad_accum: int) -> int:
    """Optimizer steps over ``batches`` loader batches (:func:`micro_batches`' groups)."""
    return -(-batches // grad_accum)


class KeyAuditLog:
    """``train.log_keys``: this rank's sample keys per step, appended (survives requeues).

    Each record also names the (re)start that wrote it: ``resumed_from`` (the checkpoint step it
    resumed from, 0 for a fresh start) and ``world_size``. Steps after the checkpoint the next
    (re)start resumed from were never committed; an audit drops them (docs/ELASTIC.md). Samples the
    loader accounted for without training them since the previous record (``retired``: corrupt, or
    dropped as left over by the epoch's full batches) and keys that filled a batch a second time
    (``repeats``) are recorded when there are any: trained keys minus repeats plus retired ones are
    every sample of a completed epoch exactly once.
    """

    def __init__(self, run: RunDir, rank: int, resumed_from: int, world_size: int) -> None:
        path = run.key_log(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")
        self._start = {"resumed_from": resumed_from, "world_size": world_size}

    def write(self, step: int, epoch: int, keys: list[str], retired: list[dict[str, str]],
              repeats: list[str]) -> None:
        record: dict[str, Any] = {"step": step, "epoch": epoch, "keys": keys, **self._start}
        if retired:
            record["retired"] = retired
        if repeats:
            record["repeats"] = repeats
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def resumed(self, step: int) -> None:
        """A health rewind went back to the checkpoint of ``step``: the records from now on say so."""
        self._start["resumed_from"] = step

    def close(self) -> None:
        self._file.close()


def last_step(cfg: Config, state: TrainState, loader: Any, steps_per_epoch: int, grad_accum: int) -> int:
    """The step this (re)start trains to: ``train.max_steps``, else the end of the last epoch.

    In epochs (``optim.niter + optim.niter_decay``), the end is counted from where the run stands
    with this launch's steps per epoch: a run resumed on another world size (different steps per
    epoch) still ends after exactly its configured number of epochs.
    """
    if cfg.train.max_steps:
        return cfg.train.max_steps
    epochs = cfg.optim.niter + cfg.optim.niter_decay
    epoch = loader.pending_epoch()
    if epoch >= epochs:
        return state.step
    return state.step + updates(len(loader), grad_accum) + (epochs - epoch - 1) * steps_per_epoch


def train(cfg: Config, resume: Optional[str] = None) -> TrainResult:
    """Run (or continue) the training job described by ``cfg``. Call on every rank."""
    from spade_dist.checkpoint import CheckpointManager

    if cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # --- 1. processes, devices, batch geometry --------------------------------------------------
    backend = setup_backend(cfg)
    if cfg.train.cpu_threads > 0:
        # Again: Accelerate's multi-CPU setup resets the thread count (to more threads per process
        # than asked for, which oversubscribes a machine shared by several ranks).
        torch.set_num_threads(cfg.train.cpu_threads)
    info = backend.info
    # The world size is this launch's (an elastic restart may bring another one): the batch geometry
    # follows it by train.global_batch_size / train.elastic_batch.
    per_rank, grad_accum = batch_geometry(cfg.data.batch_size, cfg.train.grad_accum, info.world_size,
                                          cfg.train.global_batch_size, cfg.train.elastic_batch)
    # The accumulation stays a local value: with train.elastic_batch=grad_accum the config keeps
    # train.grad_accum=1 (validated), so the resolved config.yaml stays loadable.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=per_rank))
    run_dir = Path(cfg.train.run_dir)
    run = RunDir(run_dir)

    # --- 2. the run directory's owner lock, first: a second trainer refuses within seconds -------
    ckpt = CheckpointManager(
        run_dir, cfg.checkpoint, rank=info.rank, world_size=info.world_size, config_yaml=cfg.to_yaml(),
        seed=cfg.train.seed, generator_paths={"ema": ["train", "ema", "model"], "raw": ["train", "generator"]},
        world_size_locked=(f"deepspeed ZeRO stage {cfg.train.zero_stage} optimizer partitions"
                           if backend.partitioned_optimizer else None),
        timeout=collective_timeout(cfg.train.collective_timeout_s),
    )
    try:
        return _train_owned(cfg, backend, ckpt, run, per_rank, grad_accum, resume)
    finally:
        ckpt.close()  # idempotent; releases the lock on every exit path


class Hooks:
    """Everything the loop does around a step besides the step and the checkpoint: the log line
    with its metrics and trackers, sample grids, the speed-path choice on the first batch, the key
    audit, the health monitor (and its test-only fault injection) and the FID watcher. Each part keeps
    its own schedule; :meth:`close` ends them all."""

    def __init__(self, cfg: Config, backend: TrainBackend, state: TrainState, run: RunDir, loader: Any,
                 ckpt: "CheckpointManager", max_steps: int, losses: LossSet, syncbn_ranks: int) -> None:
        from spade_dist.eval.launch import start_eval_watcher
        from spade_dist.monitoring.exporter import TrainingMetrics

        info = backend.info
        self.run, self.device, self.max_steps, self.loader = run, backend.device, max_steps, loader
        self.trackers = ExperimentTrackers(cfg, run.root, info.is_main)  # before anything that needs closing
        for name, log_dir in self.trackers.log_dirs.items():
            log.info(f"{name} log dir: {log_dir}   (view: tensorboard --logdir {log_dir})")
        self.metrics = TrainingMetrics(cfg.metrics, run.root, rank=info.rank, local_rank=info.local_rank,
                                       world_size=info.world_size, restarts=state.restarts,
                                       lineage=ckpt.lineage or "", resumed_from=state.step)
        self.metrics.start()
        ckpt.on_commit = self.metrics.record_checkpoint_commit
        self.step_log = StepLog(cfg, backend, state, loader, self.metrics, self.trackers, max_steps)
        self.samples = SampleWriter(run.root, cfg, enabled=info.is_main)
        self.speed_paths = SpeedPathChoice(cfg.speed, [state.generator, state.ema.model], run.speed_paths, info.is_main,
                                           lambda: autocast_context(cfg.train.mixed_precision, backend.device),
                                           deterministic=cfg.train.deterministic)
        self.cfg = cfg
        self.key_log = KeyAuditLog(run, info.rank, state.step, info.world_size) if cfg.train.log_keys else None
        self.health = HealthMonitor(cfg, state, run, self.metrics, backend.device, info.rank, info.world_size, max_steps,
                                    vgg=losses.vgg.vgg if losses.vgg is not None else None, syncbn_ranks=syncbn_ranks)
        self.faults = FaultInjector(cfg.train.health.debug_fault, cfg.train.health.debug_fault_step, state, info.rank)
        # eval.mode=subprocess: the FID watcher follows the checkpoints in its own process (eval/launch.py).
        self.evaluator = start_eval_watcher(cfg, run.root) if info.is_main and cfg.eval.mode == "subprocess" else None

    def before_step(self, group: list[dict[str, Any]], micro: list[Any], step: int) -> None:
        self.samples.offer(group[0])
        self.speed_paths.once(micro[0].semantics)
        self.step_log.before_step(step + 1)
        self.faults.before_step(step)

    def after_step(self, state: TrainState, group: list[dict[str, Any]], micro: list[Any],
                   result: StepResult) -> Optional[HealthEvent]:
        """The hooks of a finished step; returns the health event whose policy acts (rewind / stop), if one fired."""
        retired, repeats = self.loader.take_audit()  # taken every step: the loader keeps nothing for long
        if self.key_log is not None:
            self.key_log.write(state.step, state.epoch, [k for b in group for k in b["key"]], retired, repeats)
        self.step_log.maybe_log(state.step, result, micro)
        grid = self.samples.maybe_write(state.step, state.step == self.max_steps, state.ema_generator, self.device)
        self.trackers.log_sample_grid(grid, state.step)
        norms = self.step_log.latest_grad_norms if self.step_log.due(state.step) else {}
        return self.health.after_step(state.step, result, micro[0].semantics, norms)

    def rewind(self, event: HealthEvent, ckpt: "CheckpointManager", app_state: dict[str, Any]) -> None:
        """Health policy rewind (collective): restore the last healthy checkpoint, as a resume does (the
        later checkpoints move to archive/), scale the learning rates by train.health.rewind_lr_factor_*,
        and go on. The key audit's records name the rewind's checkpoint as the one they resumed from."""
        ckpt.wait()
        restored = ckpt.restore(app_state, event.last_healthy_checkpoint)
        assert restored is not None  # an explicit step directory: restored or raised
        state, hc = self.health.state, self.cfg.train.health
        state.sched_G.base_lr *= hc.rewind_lr_factor_G
        state.sched_D.base_lr *= hc.rewind_lr_factor_D
        state.set_epoch(state.epoch)  # applies the scaled rates
        self.health.after_rewind(event)
        self.faults.spend()
        if self.key_log is not None:
            self.key_log.resumed(restored.step)
        lr_G, lr_D = state.lrs()
        log.info(f"rewound to {restored.step_dir} (step {state.step}); lr G {lr_G:.2e} D {lr_D:.2e}; "
                 f"rewind {len(self.health.rewinds)} of at most {hc.max_rewinds} per {hc.rewind_window} steps")

    def close(self, stopped_early: bool) -> None:
        from spade_dist.eval.launch import stop_eval_watcher

        self.metrics.close()
        self.trackers.close()
        if self.key_log is not None:
            self.key_log.close()
        if self.evaluator is not None:
            # Finished: let the watcher score the last checkpoints (it exits after DONE). Preempted or
            # failed: stop it now; a requeued job starts its own.
            finished = not stopped_early and self.run.done.exists()
            stop_eval_watcher(self.evaluator, timeout=EVAL_DRAIN_SECONDS if finished else 0.0)


def _train_owned(cfg: Config, backend: TrainBackend, ckpt: "CheckpointManager", run: RunDir, per_rank: int,
                 grad_accum: int, resume: Optional[str]) -> TrainResult:
    """:func:`train` once this job owns the run directory: setup, then the loop step -> EMA -> hooks."""
    from spade_dist.checkpoint import GatheredState
    from spade_dist.data import build_train_loader, merge_positions
    from spade_dist.data.sources import check_label_layout
    from spade_dist.losses import build_vgg_loss

    info, device = backend.info, backend.device

    # --- 3. data (fails early on a missing dataset, before models are built) ---------------------
    loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size)
    # The generator's input channels come from the config: shards written for another label layout
    # would otherwise fail at the first step (or train on misread ids).
    check_label_layout(loader.shard_set, cfg.data.label_nc, cfg.data.contain_dontcare_label, cfg.data.no_instance)
    steps_per_epoch = updates(len(loader), grad_accum)

    # --- 4. models, optimizers, losses (same seed on every rank -> same initial weights) ---------
    torch.manual_seed(cfg.train.seed)
    state = build_train_state(cfg, device, fused_adam=backend.fused_adam)
    syncbn_ranks = attach_syncbn_group(state.generator_side, cfg.train.syncbn_group, info)
    if cfg.speed.compile:
        state.compile(cfg.speed.compile_mode)
    backend.wrap_state(state, per_rank)
    vgg = build_vgg_loss(cfg.loss)
    losses = LossSet.from_config(cfg, vgg.to(device) if vgg is not None else None)
    torch.manual_seed(cfg.train.seed + 1000 * info.rank)  # per-rank noise (VAE z) from here on

    # --- 5. run directory, resume, hooks ---------------------------------------------------------
    app_state: dict[str, Any] = {"train": state, "data": GatheredState(loader, merge_positions)}
    restored = ckpt.restore(app_state, resume)  # may refuse (checkpoint.existing): before any file is written
    if info.is_main:
        write_run_files(run, cfg)
    if restored is not None:
        state.restarts += 1
        log.info(f"resumed from {restored.step_dir} (step {state.step}, epoch {state.epoch})")
    elif state.init_from is not None and info.is_main:
        record_init_generator(run, state.init_from)
    max_steps = last_step(cfg, state, loader, steps_per_epoch, grad_accum)
    if max_steps < state.step:
        if info.is_main:
            log.warning(f"warning: train.max_steps={cfg.train.max_steps} is below the step this run resumed from "
                        f"({state.step}): nothing to train; the run ends at step {state.step} and commits no new "
                        "checkpoint (raise train.max_steps to train on)")
        max_steps = state.step
    if info.is_main and ckpt.stop_file.exists():
        log.warning(f"warning: {ckpt.stop_file} exists (left by an earlier stop?): this run will checkpoint and stop "
                    f"after its first step with exit {ckpt.requeue_exit_code}; remove it (spade-run prepare "
                    f"--run-dir {run.root}) to train on")
    hooks = Hooks(cfg, backend, state, run, loader, ckpt, max_steps, losses, syncbn_ranks)
    job = elastic_job_id()
    log.info(f"{backend.name} on {info.world_size} x {device} | global batch "
             f"{per_rank * info.world_size * grad_accum} ({per_rank} per rank x {grad_accum} accumulation) | "
             f"SyncBN over {syncbn_ranks} rank(s) | {steps_per_epoch} steps/epoch | to step {max_steps} | "
             f"restarts {state.restarts}{f' | elastic job {job}' if job else ''} | run dir {run.root}")

    # --- 6. the loop: step -> EMA -> hooks (each hook keeps its own schedule) ----------------------
    stopped_early = False
    unhealthy: Optional[HealthEvent] = None
    loss_hook = hooks.faults.loss_hook if hooks.faults.active else None
    try:
        while state.step < max_steps and not stopped_early and unhealthy is None:
            event: Optional[HealthEvent] = None
            for group in micro_batches(loader, grad_accum, hooks.step_log.meter):
                if loader.epoch != state.epoch:
                    # Resumed from a checkpoint taken after the last batch of an epoch: the loader
                    # moved on to the next epoch by itself; the lr schedule follows it.
                    state.set_epoch(loader.epoch)
                micro = [prepare_batch(b, cfg, device) for b in group]
                hooks.before_step(group, micro, state.step)
                result = train_step(backend, losses, micro, state.step, cfg, loss_hook=loss_hook)
                state.nonfinite_skips_t += result.skipped_G + result.skipped_D
                state.step += 1
                state.ema.update(state.generator, state.step)
                event = hooks.after_step(state, group, micro, result)
                if event is not None:
                    break  # no checkpoint of an unhealthy state
                ckpt.maybe_save(state.step, app_state)
                stopped_early = ckpt.should_stop()
                if stopped_early or state.step >= max_steps:
                    break
            else:
                state.set_epoch(state.epoch + 1)  # the epoch was consumed completely
                loader.set_epoch(state.epoch)
            if event is not None and event.action == "rewind":
                hooks.rewind(event, ckpt, app_state)  # the loader continues from the restored position
            elif event is not None:
                unhealthy = event

        # --- 7. the end: final save, DONE / REQUEUE (a health stop: the verdict, nothing saved) --------
        hooks.health.write_verdict(state.step)
        if unhealthy is not None:
            if info.is_main:
                log.error(f"stopped: {unhealthy.line()}; resume from it with --resume PATH after a fix "
                          f"(docs/HEALTH.md); exit {EXIT_UNHEALTHY}")
            result = TrainResult(step=state.step, epoch=state.epoch, run_dir=run.root, stopped_early=False,
                                 exit_code=EXIT_UNHEALTHY, nonfinite_skips=state.nonfinite_skips, health_stop=unhealthy)
        else:
            ckpt.maybe_save(state.step, app_state, last_step=True)  # committed before DONE
            if stopped_early:
                log.info(f"stopped by {ckpt.stop_reason} at step {state.step}; checkpoint saved; "
                         f"exit {ckpt.requeue_exit_code} (requeue)")
                ckpt.request_requeue(state.step)  # collective: every rank waits for the marker
            elif info.is_main:
                run.mark_done(state.step)
                log.info(f"done at step {state.step}; samples: {run.samples / 'index.html'}; "
                         f"checkpoints: {run.checkpoints}")
            result = TrainResult(step=state.step, epoch=state.epoch, run_dir=run.root, stopped_early=stopped_early,
                                 exit_code=ckpt.requeue_exit_code if stopped_early else 0,
                                 nonfinite_skips=state.nonfinite_skips)
    finally:
        ckpt.close()
        hooks.close(stopped_early)
    if result.exit_code != 0 and info.world_size > 1:
        # A launcher (torchrun's agent, accelerate, spade-train --nproc-per-node) kills the other workers
        # as soon as one exits non-zero: without this barrier the first rank to leave would cut the others'
        # clean-up short (rank 0's last TensorBoard / metrics flush, the eval watcher's stop). Every rank
        # reaches it: a requeue and a health stop are decided collectively.
        torch.distributed.barrier()
    return result
