"""``spade-train``: the main training job.

    spade-train --config configs/quickstart.yaml [dotted.key=value ...] [--resume auto|PATH|none]
    spade-train --preset tiny data.shards=PATH/manifest.json      # a shipped preset (--config tiny too)
    spade-train --nproc-per-node 2 --config X ...                 # N processes on this machine

With --nproc-per-node N (N > 1) spade-train is its own launcher (spade_dist/launcher.py): Ctrl-C or
SIGTERM checkpoints on every rank and ends in one line, a second Ctrl-C aborts, and the exit code is
the workers' own. Other launchers (see docs/TRAINING.md):
    accelerate launch --config_file launch/accelerate_cpu_2proc.yaml -m spade_dist.cli.train --config X
    torchrun --nproc_per_node 2 -m spade_dist.cli.train --config X
    deepspeed --hostfile H --module spade_dist.cli.train --config X train.backend=deepspeed

Exit codes: 0 finished, 1 the training itself failed (an uncaught error, with its traceback),
2 bad configuration / launch / input, ``checkpoint.requeue_exit_code``
(75) stopped by a preemption signal, Ctrl-C or the STOP file after committing a checkpoint; 74 a
checkpoint could not be written (disk full, read-only run directory); 76 stopped by the run-health monitor
(train.health, docs/HEALTH.md: one line names the signal and the last healthy checkpoint); 130 a second
Ctrl-C (no checkpoint); the run's REQUEUE marker says so too (other launchers may translate the exit code:
accelerate launch and torchrun report 1).
See docs/CHECKPOINTING.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spade_dist.cli.common import (
    add_config_options,
    add_overrides,
    config_source,
    fail,
    fail_os,
    make_parser,
    overrides,
    positive_int,
)
from spade_dist.config import ConfigError, load_config
from spade_dist.exit_codes import EXIT_ENVIRONMENT, EXIT_INTERRUPTED
from spade_dist.files import environment_problem


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("spade-train", __doc__)
    add_config_options(parser, "the training config (may inherit from another)", required=True)
    parser.add_argument("--resume", default=None, help="auto | none | PATH (default: checkpoint.resume)")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nproc-per-node", type=positive_int, default=None, metavar="N",
                        help="start N training processes on this machine, spade-train being their launcher "
                             "(one line and the workers' exit code on Ctrl-C / failure)")
    add_overrides(parser, "train.max_steps=100")
    return parser


def worker_args(args: argparse.Namespace) -> list[str]:
    """The arguments of each worker that ``--nproc-per-node`` starts: these, without it."""
    source = ["--preset", args.preset] if args.preset else ["--config", args.config]
    resume = ["--resume", args.resume] if args.resume is not None else []
    return [*source, *resume, *overrides(args)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from spade_dist.logs import configure_logging, launch_rank
    from spade_dist.workers import die_with_parent, launched_by_a_launcher, launcher_variable

    if launched_by_a_launcher():
        die_with_parent()  # no orphan keeps training (and checkpointing) after its launcher is gone
    args = parse_args(argv)
    if args.nproc_per_node is not None and launcher_variable() is not None:
        return fail("spade-train", f"--nproc-per-node: already started by a launcher ({launcher_variable()} is set): "
                    "drop --nproc-per-node, or run spade-train without the other launcher")
    configure_logging(launch_rank())  # progress lines on rank 0; warnings from every rank
    try:
        return run(args)
    except KeyboardInterrupt:  # Ctrl-C while importing or starting, before the checkpoint manager took over SIGINT
        return fail("spade-train", "interrupted (Ctrl-C) before training started; nothing was saved", EXIT_INTERRUPTED)


def run(args: argparse.Namespace) -> int:
    """Train (or, with ``--nproc-per-node N``, launch N workers that train); the exit code."""
    from spade_dist.checkpoint import CheckpointIncompatibleError, CheckpointWriteError, InvalidCheckpoint
    from spade_dist.data import CorruptRateError, ShardSourceError
    from spade_dist.distributed import DistributedSetupError
    from spade_dist.launcher import launch, process_count_problem
    from spade_dist.logs import launch_rank
    from spade_dist.losses import MissingVGGWeightsError
    from spade_dist.monitoring import MetricsError
    from spade_dist.run_dir import RunDirBusy
    from spade_dist.train.loop import train

    try:
        cfg = load_config(config_source(args), overrides(args))
        if args.nproc_per_node is not None and args.nproc_per_node > 1:
            problem = process_count_problem(cfg, args.nproc_per_node)
            if problem:
                return fail("spade-train", f"--nproc-per-node {args.nproc_per_node}: {problem}")
            outcome = launch(cfg, args.nproc_per_node, worker_args(args))
            if outcome.error:
                return fail("spade-train", outcome.line, outcome.exit_code)
            if outcome.line:
                print(f"spade-train: {outcome.line}", file=sys.stderr, flush=True)
            return outcome.exit_code
        result = train(cfg, resume=args.resume)
    except (ConfigError, DistributedSetupError, ShardSourceError, MissingVGGWeightsError, FileNotFoundError,
            InvalidCheckpoint, CheckpointIncompatibleError, RunDirBusy, MetricsError,
            CorruptRateError) as exc:  # --resume PATH invalid / unusable
        return fail("spade-train", exc)
    except CheckpointWriteError as exc:  # disk full / read-only run directory while saving
        return fail("spade-train", exc, EXIT_ENVIRONMENT)
    except OSError as exc:  # the run directory itself: read-only, full, not writable
        if not environment_problem(exc):
            raise
        return fail_os("spade-train", exc)
    if result.health_stop is not None and launch_rank() == 0:  # every rank stopped; one line says why
        return fail("spade-train", f"stopped by the run-health monitor: {result.health_stop.line()}", result.exit_code)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
