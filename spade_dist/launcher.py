"""``spade-train --nproc-per-node N``: N training processes on this machine that behave like one.

``accelerate launch`` and ``torchrun`` run torch's elastic agent as the launcher. The agent takes a
terminal's Ctrl-C itself (its workers run in their own sessions, so the terminal's SIGINT reaches only
the agent), forwards it, then prints its own ``SignalException`` traceback and exits 1; a worker's
meaningful exit code (2 bad input, 74 environment, 75 requeue, 76 unhealthy) becomes 1 and a
``ChildFailedError`` report. Neither is the project's code to change. Here ``spade-train`` itself is
the launcher: it runs the same agent in-process (:func:`torch.distributed.launcher.api.elastic_launch`,
a standalone c10d rendezvous on 127.0.0.1, no restarts) with ``python -m spade_dist.cli.train`` as the
workers, and adds what a single process already does:

- **Signals.** The launcher keeps SIGINT and SIGTERM (the agent handles only SIGHUP and SIGQUIT).
  The first one is forwarded to every worker, which agree on a step, commit a checkpoint, write the
  run's ``REQUEUE`` marker and exit with ``checkpoint.requeue_exit_code``; the launcher keeps
  waiting for them however long the save takes (no shutdown timeout cuts a save short). A second
  Ctrl-C, at least :data:`SAME_CTRL_C_S` after the first, kills the workers at once (exit 130, the
  last committed checkpoint stays); a repeated SIGTERM is ignored, the stop is under way. A signal
  while no worker runs (starting or ending) makes the agent stop whatever it started.
- **Exit codes.** The launcher exits with the first failing worker's own code, checked against the
  run's markers (:func:`spade_dist.run_dir.launch_verdict`), and prints one line saying what
  happened: the committed step and how to continue, or where the failing rank's message is. Once
  one worker has exited, the agent sends the others SIGTERM and kills them after 30 s (torch's fixed
  timeout); after a stop the others have passed the REQUEUE barrier by then, so nothing committed
  is at stake. The agent's own shutdown timeout (``LaunchConfig.shutdown_timeout``) applies only to
  SIGHUP / SIGQUIT and to a signal while no worker runs, never to a save.
- **Quiet.** The agent's own log records (every start, signal and failure) are dropped: the terminal
  shows the workers' lines and the launcher's one line.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterator, Optional, Sequence

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from spade_dist.checkpoint.manager import SAME_CTRL_C_S
from spade_dist.config import Config
from spade_dist.exit_codes import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE
from spade_dist.run_dir import RunDir, launch_verdict
from spade_dist.workers import child_pids

TRAIN_MODULE = "spade_dist.cli.train"
# The agent's own log records: dropped while it runs (the launcher's one line replaces them).
AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
# What the agent still handles itself: it forwards these to the workers and stops (nothing is saved).
AGENT_SIGNALS = "SIGHUP,SIGQUIT"
# Where a failing rank's own line or traceback is, by its exit code (docs/FORMATS.md, "Exit codes").
WORKER_FAILURES = {
    EXIT_USAGE: "bad input; its error line above says what to fix",
    EXIT_ENVIRONMENT: "the machine failed it (disk full, read-only directory, ...); its error line above names "
                      "the path; committed checkpoints are intact",
    EXIT_FAILURE: "its traceback is above (that rank's stderr)",
    EXIT_INTERRUPTED: "interrupted before training started; nothing was saved",
}


@dataclass(frozen=True)
class LaunchOutcome:
    """How the launch ended: the exit code and the launcher's one line ("" when the run finished)."""

    exit_code: int
    line: str
    error: bool


class StopRelay:
    """The launcher's SIGINT / SIGTERM handler while its workers run (see the module docstring). A
    signal handler here only sends signals; what happened is reported after the workers are gone."""

    def __init__(self) -> None:
        self.first: Optional[signal.Signals] = None
        self._first_at = 0.0
        self.aborted = False  # a second Ctrl-C killed the workers
        self._previous: dict[signal.Signals, Any] = {}

    @contextmanager
    def installed(self) -> Iterator["StopRelay"]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        sig, now = signal.Signals(signum), time.monotonic()
        if self.aborted:  # the workers are being reaped after a second Ctrl-C: do not wait for that either
            os._exit(EXIT_INTERRUPTED)
        if self.first is None:
            self.first, self._first_at = sig, now
            workers = child_pids(os.getpid())
            if not workers:  # starting or ending: the agent stops what it started, then re-raises to launch()
                raise SignalException(f"{sig.name} while no worker runs", sigval=sig)
            for pid in workers:
                _send(pid, sig)
            return
        if sig == signal.SIGINT and now - self._first_at >= SAME_CTRL_C_S:
            workers = child_pids(os.getpid())
            self.aborted = bool(workers)
            for pid in workers:
                _kill_session(pid)


def _send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it has just exited
        pass


def _kill_session(pid: int) -> None:
    """SIGKILL a worker and the processes it started (its data-loader workers): the agent makes every
    worker the leader of its own session and process group."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def quiet_agent() -> Iterator[None]:
    """Drop the agent's log records while it runs (its loggers set their own level, so the level of a
    parent logger would not silence them; a handler-less, non-propagating parent does)."""
    saved = []
    for name in AGENT_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.handlers[:]))
        logger.propagate, logger.handlers = False, [logging.NullHandler()]
    try:
        yield
    finally:
        for logger, propagate, handlers in saved:
            logger.propagate, logger.handlers = propagate, handlers


def process_count_problem(cfg: Config, nproc_per_node: int) -> str:
    """Why this machine cannot run ``nproc_per_node`` training processes of ``cfg``, or "" when it can.
    One process per GPU (two NCCL ranks cannot share one), or per CPU core for gloo ranks on the CPU
    (each process is a whole trainer: a typo such as 80 for 8 would otherwise start 80 of them)."""
    import torch

    device = cfg.train.device
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu:
        available, what = (torch.cuda.device_count() if torch.cuda.is_available() else 0), "visible GPUs"
    else:
        available, what = len(os.sched_getaffinity(0)), "CPU cores"
    if nproc_per_node <= available:
        return ""
    return (f"this machine has {available} {what} for train.device {device}: start at most {available} processes "
            "(one each); more ranks need more machines (docs/ELASTIC.md, docs/SLURM.md)")


def _run_workers(config: LaunchConfig, entrypoint: "str | Callable[..., Any]", *args: str) -> Optional[tuple[int, int]]:
    """Run the agent until its workers end: the first failing worker (global rank, exit code; -N killed
    by signal N), or None when every worker exited 0. A SignalException of the agent passes through."""
    try:
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        return rank, failure.exitcode
    return None


def launch(cfg: Config, nproc_per_node: int, train_args: Sequence[str]) -> LaunchOutcome:
    """Run ``python -m spade_dist.cli.train TRAIN_ARGS`` in ``nproc_per_node`` processes on this
    machine (``cfg``: the config those arguments resolve to) and say how it ended."""
    relay = StopRelay()
    failed: Optional[tuple[int, int]] = None  # the first failing worker: (global rank, exit code; -N: killed by N)
    with tempfile.TemporaryDirectory(prefix="spade-launch-") as agent_dir, quiet_agent(), relay.installed():
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=uuid.uuid4().hex,
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
            logs_specs=DefaultLogsSpecs(log_dir=agent_dir), signals_to_handle=AGENT_SIGNALS)
        try:
            failed = _run_workers(config, sys.executable, "-u", "-m", TRAIN_MODULE, *train_args)
        except SignalException as exc:  # SIGHUP / SIGQUIT, or SIGINT / SIGTERM while no worker ran
            sig = signal.Signals(exc.sigval)
            return LaunchOutcome(128 + sig, f"stopped by {sig.name}: the workers were stopped without a new "
                                            "checkpoint; a resume continues from the last committed one", True)
    return launch_outcome(cfg, failed, relay)


def launch_outcome(cfg: Config, failed: Optional[tuple[int, int]], relay: StopRelay) -> LaunchOutcome:
    """The exit code and line of a launch that ended: ``failed`` is the first failing worker (global rank,
    exit code; -N killed by signal N) or None when every worker exited 0; ``relay`` what the launcher
    received. A worker's own failure code wins over the run's markers (they may be an earlier launch's)."""
    if relay.aborted:
        return LaunchOutcome(EXIT_INTERRUPTED, "aborted by a second Ctrl-C: the workers were stopped without a "
                                               "checkpoint; a resume continues from the last committed one", True)
    run, requeue_code = RunDir(cfg.train.run_dir), cfg.checkpoint.requeue_exit_code
    rank, rc = failed if failed is not None else (None, 0)
    if rc == -signal.SIGINT:  # Python's own exit for a Ctrl-C it did not catch: the worker was still starting
        rc = EXIT_INTERRUPTED
    if rc < 0:
        killer = signal.Signals(-rc)
        return LaunchOutcome(128 + killer, f"rank {rank} was killed by {killer.name}; a resume continues from the "
                                           "last committed checkpoint", True)
    if rc in WORKER_FAILURES:
        return LaunchOutcome(rc, f"rank {rank} failed with exit code {rc}: {WORKER_FAILURES[rc]}", True)
    verdict = launch_verdict(run, rc, relay.first is not None, requeue_code, rc_of="worker")
    if verdict.action == "finished":
        return LaunchOutcome(0, "", False)
    if verdict.action == "requeue":
        reason = str((run.requeue_request() or {}).get("reason", "a stop request"))
        cause = "Ctrl-C" if reason == signal.SIGINT.name else reason
        return LaunchOutcome(verdict.exit_code, f"stopped by {cause}: {verdict.message}; run the same command "
                                                "again (checkpoint.resume auto) to continue", False)
    return LaunchOutcome(verdict.exit_code, verdict.message if rank is None else f"rank {rank}: {verdict.message}", True)


def node_agent(argv: Sequence[str]) -> int:
    """``python -m spade_dist.launcher TORCHRUN_ARGS``: torchrun (the same arguments) for one node of a
    multi-node job (``slurm/train_gaugan.sh``), with this module's signal handling and exit codes.

    A scheduler stopping the job (``scancel``, ``scontrol requeue``, preemption) sends SIGTERM to
    every process of the step: torchrun's agent would take it itself, forward it, and end in its own
    ``SignalException`` traceback with exit 1. Here the agent keeps only SIGHUP / SIGQUIT; SIGINT and
    SIGTERM go through :class:`StopRelay` (forwarded to the workers, which checkpoint and exit with the
    requeue code; waited for however long the save takes), and the agent ends with one line and the
    first failing worker's own exit code (128+N for a worker killed by signal N). The batch script
    still decides on the run's markers (``spade-run verdict``)."""
    import dataclasses
    import socket

    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(list(argv))
    if args.master_port is None:  # as torchrun's own run(): only the static rendezvous reads it
        args.master_port = 29500
    config, entrypoint, entry_args = config_from_args(args)
    config = dataclasses.replace(config, signals_to_handle=AGENT_SIGNALS)
    relay = StopRelay()
    prefix = f"spade-train node agent on {socket.gethostname()}"
    with relay.installed():
        try:
            failed = _run_workers(config, entrypoint, *entry_args)
        except SignalException as exc:  # SIGHUP / SIGQUIT, or SIGINT / SIGTERM while no worker ran
            sig = signal.Signals(exc.sigval)
            print(f"{prefix}: stopped by {sig.name}: the workers were stopped without a new checkpoint",
                  file=sys.stderr, flush=True)
            return 128 + sig
        if failed is not None:
            rank, rc = failed
            stopped = f"stopped by {relay.first.name}, forwarded to the workers; " if relay.first else ""
            if rc < 0:
                killer = signal.Signals(-rc)
                print(f"{prefix}: {stopped}rank {rank} was killed by {killer.name}", file=sys.stderr, flush=True)
                return 128 + killer
            why = f": {WORKER_FAILURES[rc]}" if rc in WORKER_FAILURES else " (the run's markers say what it means)"
            print(f"{prefix}: {stopped}rank {rank} exited with code {rc}{why}", file=sys.stderr, flush=True)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(node_agent(sys.argv[1:]))
