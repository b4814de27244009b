"""The run directory: its layout, its markers and its owner lock, in one place.

    RUN_DIR/
      config.yaml     the resolved config (written atomically: the FID watcher may read it any time)
      DONE            {"step", "time"}: training finished at that step
      REQUEUE         {"step", "reason", "exit_code", "time"}: the run committed a checkpoint and
                      stopped because it was asked to (signal / STOP file); it wants to be restarted
      STOP            created by a batch script or a user: checkpoint and stop at the next step
      eval_job        the Slurm job id of the FID watcher that slurm/train_gaugan.sh submitted for this run
      lock            the owner lock (a POSIX record lock held by the owning job's rank 0)
      OWNER           {"host", "pid", "slurm_job_id", "elastic_run_id", "time"} of the lock holder
      checkpoints/    step-XXXXXXXXX/ directories (docs/CHECKPOINTING.md)
      archive/        earlier runs moved aside whole (checkpoint.existing=archive: <time>-previous-run/
                      with their checkpoints/, logs/, samples/, ...), and checkpoints that failed
                      validation on resume (<time>-invalid/) or a rewind abandoned (<time>-superseded/);
                      the newest checkpoint.keep_archives of them are kept
      logs/           train_metrics.jsonl, keys-rank{R}.jsonl
      samples/        step-*.png sample grids and their index.html gallery
      tensorboard/    train.trackers=[tensorboard] event files
      eval/           the FID watcher's state (docs/EVALUATION.md)
      metrics/        Prometheus file_sd target files (unless metrics.sd_dir is set)
      health/         signals.jsonl, events.jsonl, verdict.json of the run-health monitor (docs/HEALTH.md)
      report.html     spade-report's page

Shell scripts ask for these paths and the run's outcome with ``spade-run`` (``spade_dist.cli.run``)
instead of spelling them out.

The lock: one training job owns a run directory at a time. Its global rank 0 holds an exclusive
``fcntl`` record lock on ``lock`` for the whole run; record locks work across nodes on NFS (v3 NLM and
v4) and Lustre (mounted with ``flock``), are not inherited by forked children, and are released by
the kernel (or the NFS server, once the dead client's lease expires) on every way a process can end,
kill -9 included. A dead owner therefore needs no manual cleanup: its lock is gone and the next job
takes over, overwriting ``OWNER``. A live owner of *another* job makes a second trainer refuse within
seconds, naming the owner. A restart of the *same* job (Slurm requeue: same ``SLURM_JOB_ID``; torchrun's
elastic agent restarting workers: same ``TORCHELASTIC_RUN_ID``) waits for the previous holder to exit
instead, because the old and the new rank 0 may overlap for a moment.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from spade_dist.exit_codes import EXIT_UNHEALTHY
from spade_dist.files import human_bytes, tree_bytes, write_atomic

CONFIG_NAME = "config.yaml"
DONE_NAME = "DONE"
REQUEUE_NAME = "REQUEUE"
STOP_NAME = "STOP"
LOCK_NAME = "lock"
OWNER_NAME = "OWNER"
CHECKPOINTS_DIRNAME = "checkpoints"
ARCHIVE_DIRNAME = "archive"
LOGS_DIRNAME = "logs"
SAMPLES_DIRNAME = "samples"
EVAL_DIRNAME = "eval"
METRICS_DIRNAME = "metrics"
REPORT_NAME = "report.html"
TENSORBOARD_DIRNAME = "tensorboard"  # train.trackers=[tensorboard] (train/trackers.py)
TRAIN_METRICS_NAME = "train_metrics.jsonl"
EVAL_METRICS_NAME = "metrics.jsonl"  # one line per scored checkpoint, under eval/ (eval/watcher.py)
EVAL_BEST_NAME = "best.json"  # the best-FID line, under eval/
INIT_GENERATOR_NAME = "init_generator.json"  # a fine-tuning run's starting point (train.init_generator)
SPEED_PATHS_NAME = "speed_paths.json"  # the SPADE speed-path plan chosen at the first start (models/fast/choice.py)
DEEPSPEED_HOSTFILE_NAME = "deepspeed_hostfile"  # written by slurm/train_gaugan.sh from the allocation
HEALTH_DIRNAME = "health"
EVAL_JOB_NAME = "eval_job"  # slurm/train_gaugan.sh: the FID watcher job it submitted (submitted once per run)

# Names `spade-run path` answers for (the attribute of RunDir with the same name).
PATH_NAMES = ("config", "done", "requeue", "stop", "lock", "owner", "checkpoints", "archive", "logs",
              "samples", "tensorboard", "eval", "metrics", "report", "init_generator",
              "speed_paths", "deepspeed_hostfile", "health", "eval_job")
# What one run writes into its directory. A fresh run in a directory that holds these moves them aside
# together (checkpoint.existing), so that two runs never mix: not their checkpoints, not their logs,
# samples, TensorBoard events, FID results or report. Not listed: the owner lock and OWNER (the new
# run holds them), metrics/ (live discovery files), archive/ itself, and what a launcher puts there for
# the coming start (STOP, deepspeed_hostfile, eval_job: the watcher it submitted follows the new run).
RUN_OUTPUT_NAMES = ("checkpoints", "logs", "samples", "tensorboard", "eval", "report", "config", "done", "requeue",
                    "init_generator", "speed_paths", "health")


class RunDirBusy(RuntimeError):
    """Another live training job owns the run directory; the message names it and how to take over."""


class RunDirNotFound(ValueError):
    """A command that reads a run was given a path that is no run directory (a typo must not read as
    a fresh, resumable or empty run)."""


def _read_json(path: Path) -> Optional[dict]:
    """A marker's content, or None when it is absent or unreadable (a torn write by a dead process)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class RunDir:
    """Paths and markers of one run directory. Cheap to construct; touches the disk only on demand."""

    root: Path

    def __init__(self, root: Union[str, Path]) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---------------------------------------------------------------- paths
    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def done(self) -> Path:
        return self.root / DONE_NAME

    @property
    def requeue(self) -> Path:
        return self.root / REQUEUE_NAME

    @property
    def stop(self) -> Path:
        return self.root / STOP_NAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def owner(self) -> Path:
        return self.root / OWNER_NAME

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIRNAME

    @property
    def archive(self) -> Path:
        return self.root / ARCHIVE_DIRNAME

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIRNAME

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES_DIRNAME

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIRNAME

    @property
    def eval(self) -> Path:
        return self.root / EVAL_DIRNAME

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_DIRNAME

    @property
    def report(self) -> Path:
        return self.root / REPORT_NAME

    @property
    def train_metrics_log(self) -> Path:
        return self.logs / TRAIN_METRICS_NAME

    @property
    def eval_metrics_log(self) -> Path:
        return self.eval / EVAL_METRICS_NAME

    @property
    def eval_best(self) -> Path:
        return self.eval / EVAL_BEST_NAME

    @property
    def init_generator(self) -> Path:
        return self.root / INIT_GENERATOR_NAME

    @property
    def speed_paths(self) -> Path:
        return self.root / SPEED_PATHS_NAME

    @property
    def deepspeed_hostfile(self) -> Path:
        return self.root / DEEPSPEED_HOSTFILE_NAME

    @property
    def health(self) -> Path:
        return self.root / HEALTH_DIRNAME

    @property
    def health_events(self) -> Path:
        """One JSON line per health event (spade_dist/train/health.py, docs/HEALTH.md)."""
        return self.health / "events.jsonl"

    @property
    def health_signals(self) -> Path:
        """One JSON line per health check: the signals' values (what healthy looks like, for tuning)."""
        return self.health / "signals.jsonl"

    @property
    def health_verdict(self) -> Path:
        """The run's final health verdict (``spade-run health`` prints its line)."""
        return self.health / "verdict.json"

    @property
    def eval_job(self) -> Path:
        return self.root / EVAL_JOB_NAME

    def key_log(self, rank: int) -> Path:
        """``train.log_keys``: the sample keys rank ``rank`` trained on, one JSON line per step."""
        return self.logs / f"keys-rank{rank}.jsonl"

    def path(self, name: str) -> Path:
        """The path called ``name`` (one of :data:`PATH_NAMES`), for ``spade-run path``."""
        if name not in PATH_NAMES:
            raise KeyError(f"unknown run directory entry {name!r} (known: {', '.join(PATH_NAMES)})")
        return getattr(self, name)

    def archive_slot(self, reason: str) -> Path:
        """A fresh directory under ``archive/`` to move things into: ``<UTC time>-<reason>``."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        slot, n = self.archive / f"{stamp}-{reason}", 1
        while slot.exists():
            n += 1
            slot = self.archive / f"{stamp}-{reason}-{n}"
        slot.mkdir(parents=True)
        return slot

    def is_run(self) -> bool:
        """A directory a trainer has started in: it holds the run's lock or its checkpoints/ (a step
        directory has neither, though it has a config.yaml)."""
        return self.root.is_dir() and (self.lock.is_file() or self.checkpoints.is_dir())

    def require(self) -> "RunDir":
        """This run directory, or :class:`RunDirNotFound` naming the path and what was expected."""
        if not self.root.exists():
            raise RunDirNotFound(f"run directory not found: {self.root}")
        if not self.is_run():
            raise RunDirNotFound(f"{self.root} is not a run directory (no {LOCK_NAME} or {CHECKPOINTS_DIRNAME}/ "
                                 "of a spade-train run in it)")
        return self

    # ---------------------------------------------------------------- earlier runs
    def previous_run(self) -> list[Path]:
        """What an earlier run left here (:data:`RUN_OUTPUT_NAMES` that exist; an empty folder does not
        count), in that order."""
        found = []
        for name in RUN_OUTPUT_NAMES:
            path = self.path(name)
            if path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir())):
                found.append(path)
        return found

    def archive_run(self, entries: list[Path], keep: int) -> "Archived":
        """Move ``entries`` (from :meth:`previous_run`) into a new ``archive/<time>-previous-run/``, keeping
        their names, then keep only the newest ``keep`` archive folders."""
        slot = self.archive_slot("previous-run")
        for path in entries:
            os.replace(path, slot / path.name)  # same filesystem: a rename, never a copy
        return Archived(slot, tree_bytes(slot), self.prune_archive(keep))

    def prune_archive(self, keep: int) -> list[tuple[Path, int]]:
        """Delete all but the newest ``keep`` folders of ``archive/`` (their names start with the UTC
        time); returns the deleted ones with their sizes. A link is removed, never followed."""
        if not self.archive.is_dir():
            return []
        slots = sorted(p for p in self.archive.iterdir() if p.is_dir() or p.is_symlink())
        removed = []
        for slot in slots[: max(0, len(slots) - keep)]:
            size = tree_bytes(slot)
            if slot.is_symlink():
                slot.unlink()
            else:
                shutil.rmtree(slot)
            removed.append((slot, size))
        return removed

    # ---------------------------------------------------------------- markers
    def write_config(self, text: str) -> None:
        write_atomic(self.config, text)

    def mark_done(self, step: int) -> None:
        write_atomic(self.done, json.dumps({"step": step, "time": time.time()}) + "\n")

    def done_step(self) -> Optional[int]:
        """The step ``DONE`` records, or None when the run is not finished."""
        marker = _read_json(self.done)
        return int(marker["step"]) if marker and isinstance(marker.get("step"), int) else None

    def request_requeue(self, step: int, reason: str, exit_code: int) -> None:
        """Written by the checkpoint manager after the stop checkpoint is committed: the batch script
        requeues the job only when this exists, whatever exit code the launcher reports."""
        write_atomic(self.requeue, json.dumps({"step": step, "reason": reason, "exit_code": exit_code,
                                               "time": time.time()}) + "\n")

    def requeue_request(self) -> Optional[dict]:
        return _read_json(self.requeue)

    def clear_launch_markers(self) -> None:
        """Before a batch script starts the trainer: a STOP or REQUEUE left by an earlier job must not
        stop this one at once, or make a job that failed before training look like it asked for a requeue."""
        self.stop.unlink(missing_ok=True)
        self.requeue.unlink(missing_ok=True)

    def clear_start_markers(self) -> None:
        """A (re)started run is neither done nor asking for a requeue, and has no health verdict, until
        it says so again (the events of earlier launches stay in health/events.jsonl)."""
        self.done.unlink(missing_ok=True)
        self.requeue.unlink(missing_ok=True)
        self.health_verdict.unlink(missing_ok=True)

    def outcome(self) -> tuple[str, Optional[int]]:
        """("done", step) | ("requeue", step) | ("incomplete", None): what the last training job
        reported, for batch scripts."""
        step = self.done_step()
        if step is not None:
            return "done", step
        request = self.requeue_request()
        if request is not None and isinstance(request.get("step"), int):
            return "requeue", int(request["step"])
        return "incomplete", None

    def read_owner(self) -> Optional["Owner"]:
        record = _read_json(self.owner)
        if record is None:
            return None
        try:
            return Owner(**record)
        except TypeError:
            return None


@dataclass(frozen=True)
class Archived:
    """An earlier run moved to ``slot`` (``size`` bytes), and the older archives deleted to keep the
    retention (``removed``: path and size of each)."""

    slot: Path
    size: int
    removed: list[tuple[Path, int]]

    def describe(self, keep: int) -> str:
        text = f"{self.slot} ({human_bytes(self.size)})"
        if self.removed:
            names = ", ".join(f"{p.name} ({human_bytes(n)})" for p, n in self.removed)
            text += f"; deleted older archive(s) {names} (checkpoint.keep_archives={keep})"
        return text


@dataclass(frozen=True)
class Verdict:
    """What a batch script does after its training step ended: ``finished``, ``requeue`` or ``failed``,
    the exit code it ends with, and one line for its log."""

    action: str
    exit_code: int
    message: str


def launch_verdict(run: RunDir, rc: int, preempted: bool, requeue_exit_code: int, rc_of: str = "launcher") -> Verdict:
    """Decide from the run's markers, never from ``rc`` alone: launchers translate exit codes
    (``accelerate launch`` reports 1 for a worker's 75), and a launcher can exit 0 without the run
    having finished. Requeue only when the run itself asked for it (REQUEUE marker). ``rc_of``: whose
    exit code ``rc`` is, for the message (a batch script passes its launcher's, spade-train's own
    launcher its worker's)."""
    kind, step = run.outcome()
    if kind == "done" and rc == 0:
        return Verdict("finished", 0, f"training finished at step {step}")
    health = read_health_verdict(run)
    if kind != "done" and health is not None and health.get("status") == "stopped":
        return Verdict("failed", EXIT_UNHEALTHY, f"stopped by the run-health monitor: {health.get('line', '')}")
    if kind == "requeue":
        return Verdict("requeue", requeue_exit_code,
                       f"checkpoint of step {step} committed and the run asked for a requeue ({rc_of} exit code {rc})")
    why = "; a preemption signal was received, but the run committed no stop checkpoint: not requeueing" if preempted else ""
    if rc == 0:
        return Verdict("failed", 1, f"training failed: the launcher exited 0 but the run wrote neither DONE nor REQUEUE{why}")
    at = f" (DONE at step {step})" if kind == "done" else ""
    return Verdict("failed", rc, f"training failed with exit code {rc}{at}{why}")


def read_health_verdict(run: RunDir) -> Optional[dict]:
    """The run's ``health/verdict.json`` (written when a run ends, docs/HEALTH.md), or None when it has
    none or it cannot be read."""
    return _read_json(run.health_verdict)


@dataclass(frozen=True)
class Owner:
    """Who holds a run directory's lock."""

    host: str
    pid: int
    slurm_job_id: str
    elastic_run_id: str
    time: float

    @classmethod
    def current(cls) -> "Owner":
        return cls(host=socket.gethostname(), pid=os.getpid(), slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
                   elastic_run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""), time=time.time())

    def same_job(self, other: "Owner") -> bool:
        """A restart of one job: Slurm requeue (same job id) or torchrun's elastic agent restarting its
        workers (same run id; "none" is torchrun's default for unnamed runs, so it identifies nothing)."""
        if self.slurm_job_id and self.slurm_job_id == other.slurm_job_id:
            return True
        return bool(self.elastic_run_id) and self.elastic_run_id != "none" and self.elastic_run_id == other.elastic_run_id

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.time))
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host} pid {self.pid}{job} (since {since})"


class RunLock:
    """The owner lock of a run directory (see the module docstring). Use as a context manager or
    :meth:`acquire` / :meth:`release`; one instance per process, held by global rank 0 only."""

    def __init__(self, run_dir: RunDir, busy_wait_s: float = 3.0, same_job_wait_s: float = 120.0,
                 poll_s: float = 0.2) -> None:
        """busy_wait_s: how long a job retries a lock held by another job before refusing (covers
        the moment between a holder's lock and its OWNER write). same_job_wait_s: how long a restart of
        the same job waits for its previous incarnation to exit."""
        self.run_dir = run_dir
        self.busy_wait_s = busy_wait_s
        self.same_job_wait_s = same_job_wait_s
        self.poll_s = poll_s
        self._fd: Optional[int] = None
        self.owner: Optional[Owner] = None

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (BlockingIOError, PermissionError):
            return False

    def acquire(self) -> Owner:
        """Take the lock or raise :class:`RunDirBusy` naming the live owner."""
        if self._fd is not None:
            raise RuntimeError(f"{self.run_dir.lock}: already held by this process")
        me = Owner.current()
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        started = time.monotonic()
        while not self._try_lock(fd):
            holder = self.run_dir.read_owner()
            limit = self.same_job_wait_s if holder is not None and holder.same_job(me) else self.busy_wait_s
            if time.monotonic() - started >= limit:
                os.close(fd)
                who = holder.describe() if holder is not None else "a process that has not recorded itself yet"
                stop = (f"scancel {holder.slurm_job_id}" if holder is not None and holder.slurm_job_id
                        else f"kill {holder.pid} on {holder.host}" if holder is not None else "stop it")
                raise RunDirBusy(
                    f"run directory {self.run_dir.root} is owned by {who}; to take over, stop that job ({stop}): "
                    f"its lock ({self.run_dir.lock}) is released when its processes end; or use another train.run_dir")
            time.sleep(self.poll_s)
        self._fd = fd
        self.owner = me
        write_atomic(self.run_dir.owner, json.dumps(asdict(me), sort_keys=True) + "\n")
        return me

    def release(self) -> None:
        """Drop the lock (idempotent). OWNER goes first, so nobody reads a record of a released lock
        as the owner of a live one."""
        if self._fd is None:
            return
        if self.run_dir.read_owner() == self.owner:
            self.run_dir.owner.unlink(missing_ok=True)
        os.close(self._fd)  # closing the descriptor releases the record lock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
