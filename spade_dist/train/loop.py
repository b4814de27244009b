"""The training loop: data -> step -> log / samples / checkpoint / metrics / eval hooks.

Reads top to bottom in :func:`train`. Every rank runs the same code; what a rank does beyond the
step (write files, print, start the evaluator) follows from ``rank == 0``. Collectives happen at the
same points on every rank: the step itself, ``ckpt.maybe_save`` / ``ckpt.should_stop`` after each
step, and the final save.

Host synchronisation: loss values stay device tensors and are read only on logging steps; the
stop-flag all-reduce of the checkpoint manager is one tiny gloo collective per step.
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
from spade_dist.files import write_json_atomic
from spade_dist.distributed import batch_geometry, collective_timeout, elastic_job_id
from spade_dist.models.compat import GeneratorInit
from spade_dist.models.speed_paths import choose_speed_paths
from spade_dist.models.sync_bn import attach_syncbn_group
from spade_dist.run_dir import RunDir
from spade_dist.train.backends import DDPBackend, DeepSpeedBackend, TrainBackend
from spade_dist.train.samples import SampleWriter
from spade_dist.train.state import TrainState, build_train_state
from spade_dist.train.step import LossSet, StepResult, autocast_context, prepare_batch, train_step
from spade_dist.train.trackers import ExperimentTrackers

if TYPE_CHECKING:
    from spade_dist.checkpoint import CheckpointManager

log = logging.getLogger("spade_dist.train")

# How long a finished run waits for its evaluation watcher to score the remaining checkpoints.
EVAL_DRAIN_SECONDS = 1800.0


@dataclass
class TrainResult:
    """What a finished (or preempted) call of :func:`train` reports."""

    step: int
    epoch: int
    run_dir: Path
    stopped_early: bool  # preemption signal: checkpoint written, exit with the requeue code
    exit_code: int
    nonfinite_skips: int


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


def setup_backend(cfg: Config) -> TrainBackend:
    """Process group first (Accelerate or DeepSpeed), so SyncBN groups can be made before models."""
    return DeepSpeedBackend.setup(cfg) if cfg.train.backend == "deepspeed" else DDPBackend.setup(cfg)


def write_run_files(run: RunDir, cfg: Config) -> None:
    run.samples.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg.to_yaml())  # atomic: an FID watcher may read it at any moment
    run.clear_start_markers()  # a resumed run is neither done nor asking for a requeue yet


def record_init_generator(run: RunDir, init: GeneratorInit) -> None:
    """A fine-tuning run's starting point (path, format, sha256, encoder), in the log and the run dir."""
    write_json_atomic(run.init_generator, init.to_dict(), sort_keys=True)
    print(f"[spade-train] generator initialised from {init.path} ({init.format} format, sha256 {init.sha256}); "
          f"encoder {init.encoder or 'fresh'}; discriminator and optimizers fresh", flush=True)


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
    (re)start resumed from were never committed; an audit drops them (docs/ELASTIC.md).
    """

    def __init__(self, run: RunDir, rank: int, resumed_from: int, world_size: int) -> None:
        path = run.key_log(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")
        self._start = {"resumed_from": resumed_from, "world_size": world_size}

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "epoch": epoch, "keys": keys, **self._start}) + "\n")
        self._file.flush()

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
        # Again: Accelerate's multi-CPU setup resets the thread count (measured: 2 threads per process
        # instead of 1, 10-20x slower steps on a loaded 2-core machine).
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
                           if backend.name == "deepspeed" and cfg.train.zero_stage > 0 else None),
        timeout=collective_timeout(cfg.train.collective_timeout_s),
    )
    try:
        return _train_owned(cfg, backend, ckpt, run, per_rank, grad_accum, resume)
    finally:
        ckpt.close()  # idempotent; releases the lock on every exit path


def _train_owned(cfg: Config, backend: TrainBackend, ckpt: "CheckpointManager", run: RunDir, per_rank: int,
                 grad_accum: int, resume: Optional[str]) -> TrainResult:
    """:func:`train` once this job owns the run directory."""
    from spade_dist.checkpoint import GatheredState
    from spade_dist.data import build_train_loader, merge_positions
    from spade_dist.data.sources import check_label_layout
    from spade_dist.eval.launch import start_eval_watcher, stop_eval_watcher
    from spade_dist.losses import VGGLoss
    from spade_dist.monitoring.exporter import TrainingMetrics, device_memory_bytes
    from spade_dist.train.grad_norm import GradNormTracker

    info, device = backend.info, backend.device
    run_dir = run.root

    # --- 3. data (fails early on a missing dataset, before models are built) ---------------------
    loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size)
    # The generator's input channels come from the config: shards written for another label layout
    # would otherwise fail at the first step (or train on misread ids).
    check_label_layout(loader.shard_set, cfg.data.label_nc, cfg.data.contain_dontcare_label, cfg.data.no_instance)
    steps_per_epoch = updates(len(loader), grad_accum)

    # --- 4. models, optimizers, losses (same seed on every rank -> same initial weights) ---------
    torch.manual_seed(cfg.train.seed)
    state = build_train_state(cfg, device, fused_adam=backend.name == "ddp")
    syncbn_ranks = attach_syncbn_group(state.generator_side, cfg.train.syncbn_group, info)
    if cfg.train.compile:
        state.compile(cfg.train.compile_mode)
    if isinstance(backend, DeepSpeedBackend):
        backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, per_rank)
    else:
        backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, state.scaler_G, state.scaler_D)
    vgg = None if cfg.loss.no_vgg_loss else VGGLoss.from_file(cfg.loss.vgg_weights or None).to(device)
    losses = LossSet.from_config(cfg, vgg)
    torch.manual_seed(cfg.train.seed + 1000 * info.rank)  # per-rank noise (VAE z) from here on

    # --- 5. run directory, resume, hooks ---------------------------------------------------------
    app_state: dict[str, Any] = {"train": state, "data": GatheredState(loader, merge_positions)}
    restored = ckpt.restore(app_state, resume)  # may refuse (checkpoint.existing): before any file is written
    if info.is_main:
        write_run_files(run, cfg)
    if restored is not None:
        state.restarts += 1
        if info.is_main:
            print(f"[spade-train] resumed from {restored.step_dir} (step {state.step}, epoch {state.epoch})", flush=True)
    elif state.init_from is not None and info.is_main:
        record_init_generator(run, state.init_from)
    resumed_from = state.step
    trackers = ExperimentTrackers(cfg, run_dir, info.is_main)  # before anything that needs closing
    for name, log_dir in trackers.log_dirs.items():
        print(f"[spade-train] {name} log dir: {log_dir}   (view: tensorboard --logdir {log_dir})", flush=True)
    metrics = TrainingMetrics(cfg.metrics, run_dir, rank=info.rank, local_rank=info.local_rank, world_size=info.world_size,
                              restarts=state.restarts)
    metrics.start()
    ckpt.on_commit = metrics.record_checkpoint_commit
    # Gradient norms for the metrics and the training log, read before the backend zeroes the gradients
    # (not under ZeRO 1/2, where an optimizer holds only this rank's partition).
    grad_norms = GradNormTracker({"G": state.opt_G, "D": state.opt_D}) if not (
        backend.name == "deepspeed" and cfg.train.zero_stage > 0) else None
    samples = SampleWriter(run_dir, cfg)
    key_log = KeyAuditLog(run, info.rank, resumed_from, info.world_size) if cfg.train.log_keys else None
    # eval.mode=subprocess: the FID watcher follows the checkpoints in its own process (eval/launch.py).
    evaluator = start_eval_watcher(cfg, run_dir) if info.is_main and cfg.eval.mode == "subprocess" else None
    max_steps = last_step(cfg, state, loader, steps_per_epoch, grad_accum)
    if info.is_main:
        job = elastic_job_id()
        print(f"[spade-train] {backend.name} on {info.world_size} x {device} | global batch "
              f"{per_rank * info.world_size * grad_accum} ({per_rank} per rank x {grad_accum} accumulation) | "
              f"SyncBN over {syncbn_ranks} rank(s) | {steps_per_epoch} steps/epoch | to step {max_steps} | "
              f"restarts {state.restarts}{f' | elastic job {job}' if job else ''} | run dir {run_dir}", flush=True)

    # --- 6. the loop ------------------------------------------------------------------------------
    meter = ProgressMeter()
    stopped_early = False
    skips_logged = 0
    last_saved_step = -1
    corrupt_logged = 0
    speed_paths_chosen = False
    try:
        while state.step < max_steps and not stopped_early:
            for group in micro_batches(loader, grad_accum, meter):
                if loader.epoch != state.epoch:
                    # Resumed from a checkpoint taken after the last batch of an epoch: the loader
                    # moved on to the next epoch by itself; the lr schedule follows it.
                    state.set_epoch(loader.epoch)
                if info.is_main:
                    samples.offer(group[0])
                micro = [prepare_batch(b, cfg, device) for b in group]
                if not speed_paths_chosen:
                    # model.onehot_gather / region_modulation: per layer, by timing on this first real
                    # batch under the step's autocast (or as recorded by an earlier start of this
                    # run); same on every rank.
                    with autocast_context(cfg.train.mixed_precision, device):
                        plan, source = choose_speed_paths([state.generator, state.ema.model], micro[0].semantics,
                                                          cfg.model.onehot_gather, cfg.model.region_modulation,
                                                          run.speed_paths, info.is_main, deterministic=cfg.train.deterministic)
                    speed_paths_chosen = True
                    if info.is_main:
                        print(f"[spade-train] speed paths on {device.type} ({source}): {plan.summary()} "
                              f"-> {run.speed_paths}", flush=True)
                if grad_norms is not None and ((state.step + 1) % cfg.train.log_every == 0 or state.step + 1 == max_steps):
                    grad_norms.arm()
                result = train_step(backend, losses, micro, state.step, cfg)
                state.nonfinite_skips_t += result.skipped_G + result.skipped_D
                state.step += 1
                state.ema.update(state.generator, state.step)
                if key_log is not None:
                    key_log.write(state.step, state.epoch, [k for b in group for k in b["key"]])
                meter.images += sum(m.real.shape[0] for m in micro)
                meter.steps += 1

                if state.step % cfg.train.log_every == 0 or state.step == max_steps:
                    text, loss_values = meter.line(state, result, info.world_size, max_steps)
                    if info.is_main:
                        print(f"[spade-train] {text}", flush=True)
                    elapsed = time.perf_counter() - meter.started
                    lr_G, lr_D = state.lrs()
                    norms = grad_norms.collect() if grad_norms is not None else {}
                    metrics.record_step(state.step, state.epoch, images=meter.images, data_seconds=meter.data_s,
                                        compute_seconds=max(0.0, elapsed - meter.data_s), losses=loss_values,
                                        lrs={"G": lr_G, "D": lr_D}, steps=meter.steps, grad_norms=norms)
                    trackers.log_scalars({
                        **{f"loss/{k}": v for k, v in loss_values.items()}, "lr/G": lr_G, "lr/D": lr_D,
                        **{f"grad_norm/{k}": v for k, v in norms.items()},
                        "images_per_sec": meter.images * info.world_size / max(elapsed, 1e-9),
                        "data_wait_share": meter.data_s / max(elapsed, 1e-9),
                    }, state.step)
                    metrics.record_device_memory(device_memory_bytes(device))
                    skips = state.nonfinite_skips
                    metrics.record_nonfinite_skip(skips - skips_logged)
                    metrics.record_corrupt(loader.corrupt_samples - corrupt_logged)
                    skips_logged, corrupt_logged = skips, loader.corrupt_samples
                    meter.reset()
                if info.is_main and (state.step % cfg.train.sample_every == 0 or state.step == max_steps):
                    trackers.log_sample_grid(samples.write(state.step, state.ema_generator, device), state.step)

                if ckpt.maybe_save(state.step, app_state):
                    last_saved_step = state.step
                if ckpt.should_stop():
                    stopped_early = True
                    break
                if state.step >= max_steps:
                    break
            else:
                state.set_epoch(state.epoch + 1)  # the epoch was consumed completely
                loader.set_epoch(state.epoch)

        # --- 7. the end: final save, DONE / REQUEUE -----------------------------------------------
        if last_saved_step != state.step:
            ckpt.save(state.step, app_state, blocking=True)
        ckpt.wait()  # an asynchronous save of this very step must be committed before DONE
        if stopped_early:
            ckpt.request_requeue(state.step)
            if info.is_main:
                print(f"[spade-train] stopped by {ckpt.stop_reason} at step {state.step}; checkpoint saved; "
                      f"exit {ckpt.requeue_exit_code} (requeue)", flush=True)
        elif info.is_main:
            run.mark_done(state.step)
            print(f"[spade-train] done at step {state.step}; samples: {run.samples / 'index.html'}; "
                  f"checkpoints: {run.checkpoints}", flush=True)
    finally:
        ckpt.close()
        metrics.close()
        trackers.close()
        if key_log is not None:
            key_log.close()
        if evaluator is not None:
            # Finished: let the watcher score the last checkpoints (it exits after DONE). Preempted or
            # failed: stop it now; a requeued job starts its own.
            finished = not stopped_early and run.done.exists()
            stop_eval_watcher(evaluator, timeout=EVAL_DRAIN_SECONDS if finished else 0.0)
    return TrainResult(step=state.step, epoch=state.epoch, run_dir=run_dir, stopped_early=stopped_early,
                       exit_code=ckpt.requeue_exit_code if stopped_early else 0, nonfinite_skips=state.nonfinite_skips)
