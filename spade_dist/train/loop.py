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
import os
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from spade_dist.config import Config
from spade_dist.distributed import DistributedSetupError, attach_syncbn_group, per_rank_batch_size
from spade_dist.models.speed_paths import PLAN_FILE as SPEED_PLAN_FILE, choose_speed_paths
from spade_dist.train.backends import DDPBackend, DeepSpeedBackend, TrainBackend
from spade_dist.train.samples import SampleWriter
from spade_dist.train.state import TrainState, build_train_state
from spade_dist.train.step import LossSet, MicroBatch, StepResult, autocast_context, prepare_batch, train_step

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


class ProgressMeter:
    """Accumulates wall time split into data wait / compute and formats the progress line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.data_s = 0.0
        self.images = 0
        self.steps = 0

    def line(self, state: TrainState, result: StepResult, world: int) -> tuple[str, dict[str, float]]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        losses = {k: float(v) for k, v in result.losses.items()}  # the host sync of a logging step
        lr_G, lr_D = state.lrs()
        terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        text = (
            f"step {state.step} epoch {state.epoch} | {self.images * world / elapsed:.1f} img/s | {terms} | "
            f"lr G {lr_G:.2e} D {lr_D:.2e} | data wait {100.0 * self.data_s / elapsed:.0f}% | "
            f"nonfinite skips {state.nonfinite_skips}"
        )
        return text, losses


def setup_backend(cfg: Config) -> TrainBackend:
    """Process group first (Accelerate or DeepSpeed), so SyncBN groups can be made before models."""
    return DeepSpeedBackend.setup(cfg) if cfg.train.backend == "deepspeed" else DDPBackend.setup(cfg)


def write_run_files(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    # Atomic: an FID watcher job may start with the run and read config.yaml at any moment.
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, run_dir / "config.yaml")
    (run_dir / "DONE").unlink(missing_ok=True)  # a resumed run is not done until it finishes again


def micro_batches(loader: Any, grad_accum: int, meter: ProgressMeter) -> Iterator[list[dict[str, Any]]]:
    """Group the loader's batches by ``grad_accum``; a trailing partial group ends the epoch."""
    group: list[dict[str, Any]] = []
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        meter.data_s += time.perf_counter() - t0
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []


class KeyAuditLog:
    """``train.log_keys``: this rank's sample keys per step, appended (survives requeues)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        path = run_dir / "logs" / f"keys-rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def train(cfg: Config, resume: Optional[str] = None) -> TrainResult:
    """Run (or continue) the training job described by ``cfg``. Call on every rank."""
    from spade_dist.checkpoint import CheckpointManager, GatheredState
    from spade_dist.data import build_train_loader, merge_positions
    from spade_dist.eval.launch import start_eval_watcher, stop_eval_watcher
    from spade_dist.losses import VGGLoss
    from spade_dist.metrics import GradNormTracker, TrainingMetrics, device_memory_bytes

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
    info, device = backend.info, backend.device
    per_rank = per_rank_batch_size(cfg.data.batch_size, info.world_size, cfg.train.grad_accum, cfg.train.global_batch_size)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=per_rank))
    run_dir = Path(cfg.train.run_dir)

    # --- 2. data (fails early on a missing dataset, before models are built) ---------------------
    loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size)
    steps_per_epoch = len(loader) // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"data.shards={cfg.data.shards!r}: {len(loader)} batch(es) per rank, fewer than train.grad_accum "
            f"{cfg.train.grad_accum}: nothing to train on"
        )

    # --- 3. models, optimizers, losses (same seed on every rank -> same initial weights) ---------
    torch.manual_seed(cfg.train.seed)
    state = build_train_state(cfg, device, fused_adam=backend.name == "ddp")
    attach_syncbn_group(state.generator_side, cfg.train.syncbn_group, info)
    if cfg.train.compile:
        state.compile(cfg.train.compile_mode)
    if isinstance(backend, DeepSpeedBackend):
        backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, per_rank)
    else:
        backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, state.scaler_G, state.scaler_D)
    vgg = None if cfg.loss.no_vgg_loss else VGGLoss.from_file(cfg.loss.vgg_weights or None).to(device)
    losses = LossSet.from_config(cfg, vgg)
    torch.manual_seed(cfg.train.seed + 1000 * info.rank)  # per-rank noise (VAE z) from here on

    # --- 4. run directory, resume, hooks ---------------------------------------------------------
    if info.is_main:
        write_run_files(run_dir, cfg)
    ckpt = CheckpointManager(
        run_dir, cfg.checkpoint, rank=info.rank, world_size=info.world_size, config_yaml=cfg.to_yaml(),
        seed=cfg.train.seed, generator_paths={"ema": ["train", "ema", "model"], "raw": ["train", "generator"]},
        world_size_locked=(f"deepspeed ZeRO stage {cfg.train.zero_stage} optimizer partitions"
                           if backend.name == "deepspeed" and cfg.train.zero_stage > 0 else None),
    )
    app_state: dict[str, Any] = {"train": state, "data": GatheredState(loader, merge_positions)}
    restored = ckpt.restore(app_state, resume)
    if restored is not None and info.is_main:
        print(f"[spade-train] resumed from {restored.step_dir} (step {state.step}, epoch {state.epoch})", flush=True)
    metrics = TrainingMetrics(cfg.metrics, run_dir, rank=info.rank, local_rank=info.local_rank, world_size=info.world_size)
    metrics.start()
    ckpt.on_commit = metrics.record_checkpoint_commit
    # Gradient norms for the metrics, read before the backend zeroes the gradients (not under ZeRO
    # 1/2, where an optimizer holds only this rank's partition).
    grad_norms = GradNormTracker({"G": state.opt_G, "D": state.opt_D}) if metrics.enabled and not (
        backend.name == "deepspeed" and cfg.train.zero_stage > 0) else None
    samples = SampleWriter(run_dir, cfg)
    key_log = KeyAuditLog(run_dir, info.rank) if cfg.train.log_keys else None
    # eval.mode=subprocess: the FID watcher follows the checkpoints in its own process (eval/launch.py).
    evaluator = start_eval_watcher(cfg, run_dir) if info.is_main and cfg.eval.mode == "subprocess" else None
    max_steps = cfg.train.max_steps or (cfg.optim.niter + cfg.optim.niter_decay) * steps_per_epoch
    if info.is_main:
        print(f"[spade-train] {backend.name} on {info.world_size} x {device} | global batch "
              f"{per_rank * info.world_size * cfg.train.grad_accum} | {steps_per_epoch} steps/epoch | "
              f"to step {max_steps} | run dir {run_dir}", flush=True)

    # --- 5. the loop ------------------------------------------------------------------------------
    meter = ProgressMeter()
    stopped_early = False
    skips_logged = 0
    last_saved_step = -1
    corrupt_logged = 0
    speed_paths_chosen = False
    try:
        while state.step < max_steps and not stopped_early:
            for group in micro_batches(loader, cfg.train.grad_accum, meter):
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
                                                          run_dir, info.is_main, deterministic=cfg.train.deterministic)
                    speed_paths_chosen = True
                    if info.is_main:
                        print(f"[spade-train] speed paths on {device.type} ({source}): {plan.summary()} "
                              f"-> {run_dir / SPEED_PLAN_FILE}", flush=True)
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
                    text, loss_values = meter.line(state, result, info.world_size)
                    if info.is_main:
                        print(f"[spade-train] {text}", flush=True)
                    elapsed = time.perf_counter() - meter.started
                    lr_G, lr_D = state.lrs()
                    metrics.record_step(state.step, state.epoch, images=meter.images, data_seconds=meter.data_s,
                                        compute_seconds=max(0.0, elapsed - meter.data_s), losses=loss_values,
                                        lrs={"G": lr_G, "D": lr_D}, steps=meter.steps,
                                        grad_norms=grad_norms.collect() if grad_norms is not None else None)
                    metrics.record_device_memory(device_memory_bytes(device))
                    skips = state.nonfinite_skips
                    metrics.record_nonfinite_skip(skips - skips_logged)
                    metrics.record_corrupt(loader.corrupt_samples - corrupt_logged)
                    skips_logged, corrupt_logged = skips, loader.corrupt_samples
                    meter.reset()
                if info.is_main and (state.step % cfg.train.sample_every == 0 or state.step == max_steps):
                    samples.write(state.step, state.ema_generator, device)

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

        # --- 6. the end: final save, DONE ---------------------------------------------------------
        if last_saved_step != state.step:
            ckpt.save(state.step, app_state, blocking=True)
        ckpt.wait()  # an asynchronous save of this very step must be committed before DONE
        if stopped_early:
            if info.is_main:
                print(f"[spade-train] stopped by {ckpt.stop_reason} at step {state.step}; checkpoint saved; "
                      f"exit {ckpt.requeue_exit_code} (requeue)", flush=True)
        elif info.is_main:
            (run_dir / "DONE").write_text(json.dumps({"step": state.step, "time": time.time()}) + "\n")
            print(f"[spade-train] done at step {state.step}; samples: {run_dir / 'samples' / 'index.html'}; "
                  f"checkpoints: {run_dir / 'checkpoints'}", flush=True)
    finally:
        ckpt.close()
        metrics.close()
        if key_log is not None:
            key_log.close()
        if evaluator is not None:
            # Finished: let the watcher score the last checkpoints (it exits after DONE). Preempted or
            # failed: stop it now; a requeued job starts its own.
            finished = not stopped_early and (run_dir / "DONE").exists()
            stop_eval_watcher(evaluator, timeout=EVAL_DRAIN_SECONDS if finished else 0.0)
    return TrainResult(step=state.step, epoch=state.epoch, run_dir=run_dir, stopped_early=stopped_early,
                       exit_code=ckpt.requeue_exit_code if stopped_early else 0, nonfinite_skips=state.nonfinite_skips)
