"""CheckpointManager: when to save, asynchronous staging + writing, commit, retention, resume.

The training loop hands over an ``app_state`` dict. Its values may be

- objects with ``state_dict()`` / ``load_state_dict()`` whose state is the same on every rank
  (the TrainState: models, EMA, optimizers, schedulers, scalers, step, epoch);
- a :class:`GatheredState` around a per-rank object whose local states must be merged into one
  global state (the data loader position: each rank knows only what it delivered);
- plain picklable values (may contain tensors), written back into ``app_state`` on restore.

Collectives: control decisions (stop flag, time trigger, position gathering, resume choice) run in
the training thread on a private gloo group; the background writer runs DCP on a second private
gloo group. Two groups, because two threads issuing collectives on one group could interleave
differently on different ranks and deadlock; gloo groups also keep this working on NCCL jobs.

Ownership and lineage (docs/CHECKPOINTING.md): the manager's rank 0 holds the run directory's owner
lock (:class:`spade_dist.run_dir.RunLock`) from construction to :meth:`close`. Every checkpoint's marker
records the *lineage* it belongs to: a fresh start begins a new lineage, a resume continues the one of
the checkpoint it loaded. Retention only prunes the current lineage's checkpoints older than the one
just committed; a fresh start into a directory that holds an earlier run refuses (when it has
checkpoints) unless ``checkpoint.existing`` says to archive or delete that run, as a whole.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's per-rank failures

from spade_dist.checkpoint import layout
from spade_dist.checkpoint.rng import capture_rng_state, restore_rng_state, rng_key, seed_derived_rng
from spade_dist.checkpoint.store import (
    CheckpointReadError,
    StepReader,
    build_flat_state,
    write_flat_state,
)
from spade_dist.config import CheckpointConfig
from spade_dist.exit_codes import EXIT_INTERRUPTED
from spade_dist.files import environment_problem, free_bytes, os_error_of
from spade_dist.run_dir import RunDir, RunDirBusy, RunLock

log = logging.getLogger("spade_dist.checkpoint")
# A second SIGINT sooner than this after the first is the same Ctrl-C, forwarded by a launcher
# (spade-train's own launcher, spade_dist/launcher.py, counts a second Ctrl-C the same way).
SAME_CTRL_C_S = 1.0

META_KEY = "__meta__"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written because of the environment (disk full, read-only or
    unwritable run directory); the message names the directory, the cause and the space needed."""


class GatheredState:
    """A per-rank stateful object whose rank-local states are merged when saving.

    On save every rank's ``obj.state_dict()`` is all-gathered and ``merge(list_of_local_states)``
    (ordered by rank) gives the global state that is stored. On restore every rank gets the global
    state through ``obj.load_state_dict(global_state)``, whatever the new world size.
    """

    def __init__(self, obj: Any, merge: Callable[[list[Any]], Any]) -> None:
        self.obj = obj
        self.merge = merge


@dataclass
class RestoreResult:
    step: int
    step_dir: Path
    saved_world_size: int
    skipped: list[str] = field(default_factory=list)


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


class CheckpointManager:
    """Saves and restores the training state of one run directory (see docs/CHECKPOINTING.md)."""

    def __init__(
        self,
        run_dir: Union[str, Path],
        cfg: CheckpointConfig,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        config_yaml: str = "",
        seed: int = 0,
        generator_paths: Optional[dict[str, list[str]]] = None,
        world_size_locked: Optional[str] = None,
        install_signal_handlers: bool = True,
        verify_sha256_on_resume: bool = True,
        on_commit: Optional[Callable[[int, Path, float], None]] = None,
        timeout: Optional[timedelta] = None,
        lock: bool = True,
    ) -> None:
        """
        rank / world_size: default to the process group's (or 0 / 1 without one).
        config_yaml: the resolved config, stored as ``config.yaml`` in every step directory.
        seed: base seed for deriving RNG streams of ranks that have no saved state.
        generator_paths: where the generators sit in ``app_state``, e.g.
            ``{"ema": ["train", "G_ema"], "raw": ["train", "G"]}``; stored in the marker so that
            :func:`load_generator_from_checkpoint` can find them without knowing the trainer.
        world_size_locked: set when the state cannot be resharded (e.g. DeepSpeed ZeRO optimizer
            partitions); the text is stored and resuming on another world size fails naming it.
        timeout: of the private gloo groups' collectives (the trainer passes
            ``train.collective_timeout_s``, so a lost peer fails them as quickly as the world
            group's); None = torch's default.
        lock: take the run directory's owner lock on rank 0 (raises :class:`RunDirBusy` on every rank
            when another job owns it). Off only for readers that never write checkpoints.
        """
        self.run_dir = Path(run_dir)
        self.run = RunDir(self.run_dir)
        self.cfg = cfg
        self.distributed = _dist_active()
        self.rank = rank if rank is not None else (dist.get_rank() if self.distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if self.distributed else 1)
        self.config_yaml = config_yaml
        self.seed = seed
        self.generator_paths = generator_paths or {"ema": ["train", "G_ema"], "raw": ["train", "G"]}
        self.world_size_locked = world_size_locked
        self.verify_sha256_on_resume = verify_sha256_on_resume
        # Called on every rank once a save is committed: (step, step_dir, seconds the write took).
        # The trainer feeds it to its metrics (spade_checkpoint_*); for async saves it runs in the
        # writer thread.
        self.on_commit = on_commit
        self.ckpt_dir = self.run.checkpoints
        # Private groups (collective creation: every rank constructs the manager at the same point).
        self._ctrl_pg = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        self._io_pg = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        # The lineage new checkpoints belong to: set by restore() (or by the first save without one).
        self.lineage: Optional[str] = None
        self._lock: Optional[RunLock] = None
        if lock:
            self._take_lock()
        self._thread: Optional[threading.Thread] = None
        self._thread_error: Optional[BaseException] = None
        self._last_save_time = time.monotonic()
        self._last_saved_step: Optional[int] = None  # also the step a restore read
        # The step whose checkpoint this manager committed last, or the one restore() loaded: the final
        # save (maybe_save(last_step=True)) does not write that step again.
        self._written_step: Optional[int] = None
        self._stop_signal: Optional[str] = None
        self.stop_file = Path(cfg.stop_file) if cfg.stop_file else self.run.stop
        self._stop_file_checked = float("-inf")
        self._old_handlers: dict[int, Any] = {}
        self._first_interrupt = 0.0  # monotonic time of the first Ctrl-C
        self._step_dir_made = False  # the save in progress created its step directory
        self._staging_buffers: dict[str, torch.Tensor] = {}  # reused CPU copies for async saves
        self.last_stall_s = 0.0  # time the training thread spent in the last save() call
        if install_signal_handlers:
            self._install_handlers()

    # ------------------------------------------------------------------ ownership
    def _take_lock(self) -> None:
        """Collective: rank 0 takes the owner lock; every rank raises RunDirBusy if it could not.
        Only rank 0 holds it (on multi-node jobs the head node's): the other ranks cannot outlive it
        usefully, since they die with their launcher and block in the next collective without it."""
        busy: Optional[str] = None
        if self.rank == 0:
            lock = RunLock(self.run)
            try:
                lock.acquire()
                self._lock = lock
            except RunDirBusy as exc:
                busy = str(exc)
        busy = self._broadcast(busy)
        if busy is not None:
            raise RunDirBusy(busy)

    # ------------------------------------------------------------------ signals / stop flag
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("CheckpointManager: signal handlers can only be installed from the main thread")
        for name in self.cfg.signals:
            signum = getattr(signal, name, None)
            if not isinstance(signum, signal.Signals):
                raise ValueError(f"checkpoint.signals: unknown signal name {name!r}")
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        # Ctrl-C takes the same save-then-exit path; a second one aborts at once (_on_interrupt).
        self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag: the loop reaches a step boundary, all ranks agree, then it saves.
        self._stop_signal = signal.Signals(signum).name

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        """SIGINT (Ctrl-C, which a terminal sends to every rank): the first one stops like a
        preemption signal (checkpoint, REQUEUE, the requeue exit code); a second one exits at once
        with :data:`EXIT_INTERRUPTED`, leaving the last committed checkpoint (an uncommitted one in
        flight is ignored by resume and replaced by the next save of its step). One line each, on
        stderr, written directly (a signal handler must not take the logging or print locks). A
        SIGINT within a second of the first is the same Ctrl-C, forwarded by a launcher
        (torchrun's agent re-sends it to its workers)."""
        now = time.monotonic()
        if self._stop_signal is None:
            self._stop_signal = "SIGINT"
            self._first_interrupt = now
            if self.rank == 0:
                os.write(2, b"spade-train: Ctrl-C: saving a checkpoint after this step, then exiting "
                            b"(Ctrl-C again to abort without it)\n")
            return
        if now - self._first_interrupt < SAME_CTRL_C_S:  # the launcher forwarding the same Ctrl-C
            return
        os.write(2, f"spade-train: rank {self.rank}: aborted by a second Ctrl-C, without a checkpoint; a resume "
                    "continues from the last committed one\n".encode())
        os._exit(EXIT_INTERRUPTED)

    def request_stop(self, reason: str = "requested") -> None:
        """Same effect as receiving a preemption signal (for schedulers that call in-process)."""
        self._stop_signal = reason

    def should_stop(self) -> bool:
        """Collective (call on every rank at the same step): True on all ranks if any rank got a
        preemption signal."""
        local = self._stop_signal is not None or self._stop_file_present()
        if not self.distributed:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._ctrl_pg)
        if flag.item() and not local:
            self._stop_signal = "peer-rank-signal"
        return bool(flag.item())

    def _stop_file_present(self) -> bool:
        """The stop file (``checkpoint.stop_file``, default ``<run_dir>/STOP``) acts like a signal.

        Batch scripts create it on preemption because launchers (accelerate, torchrun, deepspeed, srun)
        do not forward every signal to every worker on every node. Checked at most once a second so a
        shared filesystem is not hammered with a stat per step.
        """
        now = time.monotonic()
        if now - self._stop_file_checked < 1.0:
            return False
        self._stop_file_checked = now
        if self.stop_file.exists():
            self._stop_signal = f"stop-file:{self.stop_file}"
            return True
        return False

    @property
    def stop_reason(self) -> Optional[str]:
        return self._stop_signal

    @property
    def requeue_exit_code(self) -> int:
        return self.cfg.requeue_exit_code

    def request_requeue(self, step: int) -> None:
        """Collective. After the stop checkpoint of ``step`` is committed (call :meth:`wait` first):
        rank 0 writes the run's REQUEUE marker while the other ranks wait for it. Batch scripts
        requeue on the marker, not on an exit code, because launchers translate exit codes
        (``accelerate launch`` turns 75 into 1)."""
        if self.rank == 0:
            self.run.request_requeue(step, self.stop_reason or "requested", self.requeue_exit_code)
        if self.distributed:
            # No rank may exit before the marker is on disk: the first process to exit can make its
            # launcher (and ``srun --kill-on-bad-exit``) end the whole step, rank 0 included.
            dist.barrier(group=self._ctrl_pg)

    # ------------------------------------------------------------------ triggers
    def _time_due(self) -> bool:
        if self.cfg.every_minutes <= 0:
            return False
        # Rank 0's clock decides; others follow, so every rank saves at the same step.
        due_here = self.rank == 0 and (time.monotonic() - self._last_save_time) >= self.cfg.every_minutes * 60.0
        if not self.distributed:
            return due_here
        flag = torch.tensor([int(due_here)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._ctrl_pg)
        return bool(flag.item())

    def maybe_save(self, step: int, app_state: dict[str, Any], last_step: bool = False) -> bool:
        """Collective. Periodic save (asynchronous when ``checkpoint.async_save``) if ``step`` is a
        multiple of ``every_steps`` or ``every_minutes`` elapsed since the last save.

        ``last_step``: the end of this (re)start (finished or stopping): a blocking save unless this
        run already saved ``step`` or resumed from it (nothing trained since), then wait until any
        asynchronous save of it is committed.
        """
        if last_step:
            if self._written_step != step:
                self.save(step, app_state, blocking=True)
            self.wait()
            return True
        by_steps = self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0
        by_time = self._time_due()
        if not (by_steps or by_time) or step == self._last_saved_step:
            return False
        self.save(step, app_state, blocking=not self.cfg.async_save)
        return True

    # ------------------------------------------------------------------ saving
    def _gather(self, local: Any) -> list[Any]:
        if not self.distributed:
            return [local]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, local, group=self._ctrl_pg)
        return out

    def _stage(self, step: int, app_state: dict[str, Any], clone: bool) -> dict[str, Any]:
        trees: dict[str, Any] = {}
        for name, value in app_state.items():
            if isinstance(value, GatheredState):
                trees[name] = value.merge(self._gather(value.obj.state_dict()))
            elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
                trees[name] = value.state_dict()
            else:
                trees[name] = value
        if self.world_size_locked:
            # Rank-partitioned state (ZeRO optimizer shards) shares key names across ranks; DCP
            # would keep one rank's copy. Store every rank's trees under its own name instead.
            trees = {self._stored_name(name, self.rank): tree for name, tree in trees.items()}
        meta = {"step": step, "world_size": self.world_size, "seed": self.seed,
                "names": sorted(app_state)}
        objects = {META_KEY: meta, rng_key(self.rank): capture_rng_state()}
        return build_flat_state(trees, objects, clone=clone, buffers=self._staging_buffers)

    def save(self, step: int, app_state: dict[str, Any], blocking: bool = True) -> Path:
        """Collective. Save ``app_state`` as ``checkpoints/step-XXXXXXXXX``.

        Waits for a previous asynchronous save first (at most one in flight). ``blocking=False``
        returns once the state is staged in CPU memory; the write and commit go on in a thread.
        """
        start = time.perf_counter()
        self.wait()
        flat = self._stage(step, app_state, clone=not blocking)
        self._last_save_time = time.monotonic()
        self._last_saved_step = step
        self._written_step = step
        if self.lineage is None:
            self.lineage = uuid.uuid4().hex
        step_dir = self.ckpt_dir / layout.step_dir_name(step)
        if blocking:
            self._write(step, step_dir, flat)
        else:
            self._thread = threading.Thread(target=self._write_in_thread, args=(step, step_dir, flat),
                                            name=f"checkpoint-writer-{step}", daemon=True)
            self._thread.start()
        self.last_stall_s = time.perf_counter() - start
        return step_dir

    def _write_in_thread(self, step: int, step_dir: Path, flat: dict[str, Any]) -> None:
        try:
            self._write(step, step_dir, flat)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._thread_error = exc

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._io_pg)

    def _write(self, step: int, step_dir: Path, flat: dict[str, Any]) -> None:
        """Collective: write, commit and prune one checkpoint. Two failures of the environment are
        handled here rather than raised as they come: the step directory deleted underneath (a
        warning; training goes on, the next save proceeds) and a full / read-only file system (the
        partial directory is removed, every rank raises :class:`CheckpointWriteError`)."""
        self._step_dir_made = False  # set once every rank knows the directory exists
        try:
            self._write_and_commit(step, step_dir, flat)
        except (Exception, CheckpointException) as exc:  # classified below; re-raised unless the directory vanished
            needed = sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else len(v)
                         for v in flat.values() if isinstance(v, (torch.Tensor, bytes)))
            cause: BaseException = exc
            if os_error_of(exc) is None and 0 <= free_bytes(self.ckpt_dir) < needed:
                # torch's zip writer reports a short write as "unexpected pos A vs B", without the errno
                cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.ckpt_dir))
            problem = environment_problem(cause, f"checkpoint of step {step} in {self.run.root}")
            if problem:
                if self.rank == 0:  # a partial step would be archived (and kept) by the next start
                    shutil.rmtree(step_dir, ignore_errors=True)
                raise CheckpointWriteError(f"{problem}; it needs about {needed} bytes; the previous committed "
                                           "checkpoint is intact, resume continues from it") from exc
            if self._step_dir_made and not step_dir.exists():
                log.warning("checkpoint of step %d: %s was deleted while it was written; skipped, the next "
                            "save proceeds", step, step_dir)
                return
            raise

    def _write_and_commit(self, step: int, step_dir: Path, flat: dict[str, Any]) -> None:
        started = time.perf_counter()
        if self.rank == 0:
            if step_dir.is_symlink():  # never write (or delete) through a link out of the run directory
                log.warning("removing the symlink %s (to %s) that stood where this checkpoint goes",
                            step_dir, os.readlink(step_dir))
                step_dir.unlink()
            elif step_dir.exists():  # a torn earlier attempt at the same step (e.g. before a crash)
                (step_dir / layout.MARKER_NAME).unlink(missing_ok=True)
                shutil.rmtree(step_dir)
            step_dir.mkdir(parents=True)
        self._barrier()
        self._step_dir_made = True
        write_flat_state(flat, step_dir, self._io_pg)
        commit_error: Optional[BaseException] = None
        if self.rank == 0:
            try:
                (step_dir / layout.CONFIG_NAME).write_text(self.config_yaml)
                extra = {"generator_paths": self.generator_paths, "world_size_locked": self.world_size_locked,
                         "lineage": self.lineage}
                layout.write_marker(step_dir, step, self.world_size, extra)
                removed = layout.prune(self.ckpt_dir, self.cfg.keep_last, self.cfg.keep_every,
                                       lineage=self.lineage, committed_step=step)
                log.info("checkpoint %s committed in %.2fs%s", step_dir, time.perf_counter() - started,
                         f"; pruned {[p.name for p in removed]}" if removed else "")
            except BaseException as exc:  # noqa: BLE001 - raised after the barrier, so no rank hangs in it
                commit_error = exc
        # Nobody leaves before the marker exists: a rank exiting early (e.g. with the requeue code)
        # could make the launcher kill rank 0 mid-commit. Every rank learns whether the commit failed.
        commit_failed = not self._all_ok(commit_error is None, self._io_pg)  # on the writer thread's group
        if commit_error is not None:
            raise commit_error
        if commit_failed:
            raise CheckpointWriteError(f"checkpoint of step {step}: rank 0 could not commit {step_dir} (its log says why)")
        if self.on_commit is not None:
            self.on_commit(step, step_dir, time.perf_counter() - started)

    def wait(self) -> None:
        """Block until the in-flight asynchronous save (if any) is committed; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._thread_error is not None:
            err, self._thread_error = self._thread_error, None
            if isinstance(err, CheckpointWriteError):
                raise err
            raise RuntimeError(f"asynchronous checkpoint save failed: {err}") from err

    def close(self) -> None:
        """Finish the in-flight save, put back the previous signal handlers, release the owner lock."""
        try:
            self.wait()
        finally:
            for signum, handler in self._old_handlers.items():
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signum, handler)
            self._old_handlers.clear()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # ------------------------------------------------------------------ resuming
    def _broadcast(self, payload: Any) -> Any:
        if not self.distributed:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=0, group=self._ctrl_pg)
        return box[0]

    def _all_ok(self, ok: bool, group: Optional[Any] = None) -> bool:
        """Collective on ``group`` (default: the control group): True when every rank is ok."""
        if not self.distributed:
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group or self._ctrl_pg)
        return bool(flag.item())

    def _choose(self, candidates: list[Path], explicit: bool, skipped: list[str]) -> tuple[Optional[Path], Optional[str]]:
        """Rank 0: the newest candidate that validates; (None, error) for an invalid explicit path."""
        for step_dir in candidates:
            if str(step_dir) in skipped:
                continue
            try:
                layout.validate_step_dir(step_dir, check_sha256=self.verify_sha256_on_resume)
                return step_dir, None
            except layout.InvalidCheckpoint as exc:
                if explicit:
                    return None, str(exc)
                log.warning("skipping checkpoint %s: %s", step_dir, exc)
                skipped.append(str(step_dir))
        return None, None

    def restore(self, app_state: dict[str, Any], resume: Optional[str] = None) -> Optional[RestoreResult]:
        """Collective. Load the checkpoint chosen by ``resume`` (auto | none | PATH; default
        ``checkpoint.resume``) into ``app_state``. Returns None when starting fresh.

        Auto: the newest committed checkpoint; ones without a marker, with a file whose size /
        sha256 differs from the marker, or that fail to load, are skipped with a warning naming
        them, and the previous one is tried.
        """
        resume = resume if resume is not None else self.cfg.resume
        explicit_step_dir = resume not in ("auto", "none") and layout.step_of(Path(resume)) is not None
        skipped: list[str] = []
        while True:
            decision: tuple[Optional[str], Optional[str]] = (None, None)
            if self.rank == 0:
                try:
                    candidates, explicit = layout.resolve_resume_target(resume, self.run_dir)
                    chosen, error = self._choose(candidates, explicit, skipped)
                    decision = (str(chosen) if chosen else None, error)
                except layout.InvalidCheckpoint as exc:
                    decision = (None, str(exc))
            (chosen_str, error), skipped = self._broadcast((decision, skipped))
            if error:
                raise layout.InvalidCheckpoint(error)
            if chosen_str is None:
                if resume not in ("none", "auto"):
                    raise layout.InvalidCheckpoint(f"checkpoint.resume={resume}: no valid checkpoint (skipped: {skipped})")
                self._start_fresh(resume, skipped)
                log.info("no checkpoint to resume from in %s; starting fresh (lineage %s)", self.ckpt_dir, self.lineage)
                return None
            step_dir = Path(chosen_str)
            loaded: Optional[tuple[dict, dict]] = None
            problem = ""
            try:
                loaded = self._read(step_dir, app_state)
            except CheckpointReadError as exc:
                problem = str(exc)
            if not self._all_ok(loaded is not None):
                if self.rank == 0:
                    log.warning("skipping checkpoint %s: load failed on some rank%s", step_dir,
                                f": {problem}" if problem else "")
                skipped.append(str(step_dir))
                if explicit_step_dir:
                    raise layout.InvalidCheckpoint(f"{step_dir}: cannot be loaded: {problem or 'failed on another rank'}")
                continue
            assert loaded is not None
            trees, objects = loaded
            if self.rank == 0:
                self._archive_own(skipped, "invalid")
                # An explicit rewind (--resume .../step-X of this run): the later checkpoints are a
                # future this run abandons; left in place they would outrank the new ones for export.
                chosen_step = layout.step_of(step_dir)
                self._archive_own([str(p) for p in layout.list_step_dirs(self.ckpt_dir)
                                   if layout.step_of(p) > chosen_step], "superseded")
            return self._apply(step_dir, app_state, trees, objects, skipped)

    def _archive_own(self, step_dirs: list[str], reason: str) -> list[Path]:
        """Rank 0: move this run's ``step_dirs`` to ``archive/``. Used for checkpoints a resume had to
        skip: they stay for inspection, but no longer shadow the lineage that continues (an exporter
        would otherwise see a newer step than DONE's; retention would count them)."""
        own = [Path(p) for p in step_dirs if Path(p).parent.resolve() == self.ckpt_dir.resolve() and Path(p).exists()]
        if not own:
            return []
        slot = self.run.archive_slot(reason)
        moved = []
        for path in own:
            moved.append(Path(shutil.move(str(path), str(slot / path.name))))
        removed = self.run.prune_archive(self.cfg.keep_archives)
        log.warning("moved %d checkpoint(s) this run cannot use to %s: %s%s", len(moved), slot, [p.name for p in moved],
                    f"; deleted older archive(s) {[p.name for p, _ in removed]}" if removed else "")
        return moved

    def _start_fresh(self, resume: str, skipped: list[str]) -> None:
        """Collective. A new lineage; an earlier run left in the run directory is dealt with first
        (``checkpoint.existing``), as a whole: its checkpoints, logs, samples, TensorBoard events, FID
        results and report, so that no retention, exporter or report ever mixes two runs."""
        error: Optional[str] = None
        lineage = uuid.uuid4().hex
        if self.rank == 0:
            self._archive_own(skipped, "invalid")
            leftovers = layout.list_step_dirs(self.ckpt_dir)
            previous = self.run.previous_run()
            policy = self.cfg.existing
            what = ", ".join(p.name for p in previous)
            if leftovers and policy == "refuse":
                error = (f"{self.run_dir} holds another run ({len(leftovers)} checkpoint(s), newest {leftovers[-1].name}; "
                         f"{what}) and checkpoint.resume={resume} starts a new one; set checkpoint.existing=archive "
                         f"(move that run to {self.run.archive}/) or checkpoint.existing=delete, resume with "
                         "--resume auto, or use another train.run_dir")
            elif previous and policy == "delete":
                for path in leftovers:  # the marker first: a reader never trusts a half-deleted step
                    (path / layout.MARKER_NAME).unlink(missing_ok=True)
                for path in previous:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                log.warning("deleted the earlier run in %s (%s; checkpoint.existing=delete)", self.run_dir, what)
            elif previous:
                archived = self.run.archive_run(previous, self.cfg.keep_archives)
                log.warning("moved the earlier run in %s (%s) to %s", self.run_dir, what,
                            archived.describe(self.cfg.keep_archives))
        error, lineage = self._broadcast((error, lineage))
        if error is not None:
            raise layout.ExistingCheckpointsError(error)
        self.lineage = lineage

    @staticmethod
    def _stored_name(name: str, rank: Optional[int]) -> str:
        return name if rank is None else f"{name}__rank{rank}"

    def _read(self, step_dir: Path, app_state: dict[str, Any]) -> tuple[dict, dict]:
        marker = layout.read_marker(step_dir)
        locked, saved_ws = marker.get("world_size_locked"), marker.get("world_size")
        if locked and saved_ws != self.world_size:
            raise layout.CheckpointIncompatibleError(
                f"{step_dir}: saved with world size {saved_ws}, resuming with {self.world_size}, but this "
                f"checkpoint cannot be resharded: {locked}. Resume on {saved_ws} ranks, or pick an older "
                "checkpoint / a configuration without partitioned state (e.g. train.zero_stage=0)")
        reader = StepReader(step_dir)
        available = set(reader.tree_names())
        stored = {name: self._stored_name(name, self.rank if locked else None) for name in app_state}
        missing = sorted(n for n, s in stored.items() if s not in available)
        if missing:
            raise layout.CheckpointIncompatibleError(
                f"{step_dir}: checkpoint has no state named {missing} (it has {sorted(available)}); "
                "the run's configuration differs from the one that wrote it")
        by_stored = reader.read_trees(sorted(stored.values()))
        trees = {name: by_stored[s] for name, s in stored.items()}
        objects = reader.read_objects([META_KEY, rng_key(self.rank)])
        if META_KEY not in objects:
            raise CheckpointReadError(f"{step_dir}: no {META_KEY} entry")
        return trees, objects

    def _apply(self, step_dir: Path, app_state: dict[str, Any], trees: dict, objects: dict,
               skipped: list[str]) -> RestoreResult:
        meta = objects[META_KEY]
        step, saved_ws = int(meta["step"]), int(meta["world_size"])
        for name, value in app_state.items():
            if isinstance(value, GatheredState):
                value.obj.load_state_dict(trees[name])
            elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
                value.load_state_dict(trees[name])
            else:
                app_state[name] = trees[name]
        rng = objects.get(rng_key(self.rank))
        if rng is not None:
            restore_rng_state(rng, self.seed, step, self.rank)
        else:
            derived = seed_derived_rng(self.seed, step, self.rank)
            log.info("rank %d has no saved RNG state in %s (saved by %d ranks); derived seed %d",
                     self.rank, step_dir, saved_ws, derived)
        self._last_saved_step = step
        self._written_step = step  # committed already: a restart that trains nothing re-commits nothing
        self._last_save_time = time.monotonic()
        # Continue the loaded checkpoint's lineage (one written before lineages existed starts one).
        self.lineage = self._broadcast(layout.lineage_of(step_dir) or uuid.uuid4().hex)
        log.info("resumed from %s (step %d, saved by %d ranks, now %d)", step_dir, step, saved_ws, self.world_size)
        return RestoreResult(step=step, step_dir=step_dir, saved_world_size=saved_ws, skipped=skipped)
