"""``spade-eval``: FID / KID / mIoU / pixel accuracy of checkpoints (``eval.metrics``; docs/EVALUATION.md).

    spade-eval once  --checkpoint CKPT | --run-dir R [--config C | --preset P] [--out result.json] [eval.num_images=500 ...]
    spade-eval watch --run-dir R [--config C | --preset P] [--policy every|newest|every_k] [--every-k K] [KEY=VALUE ...]
    spade-eval compare SOURCE [SOURCE ...]   (run directories, metrics.jsonl files, JSON results)

CKPT is a checkpoint step directory (``R/checkpoints/step-XXXXXXXXX``) or a single-file generator
(``spade-export`` / ``eval/best_generator.pt``); ``once --run-dir R`` scores R's newest committed
checkpoint. With ``metrics.pushgateway=HOST:PORT`` set, ``once``
pushes its result to that Pushgateway (group ``job="spade-eval"``, ``run``, ``job_id``; run = the run
directory the checkpoint lies in, or ``metrics.run_name``), since it ends before any scrape. ``watch`` reads ``R/config.yaml`` unless ``--config``
/ ``--preset`` is given, waiting for it to appear (the watcher may start before the trainer). Under ``torchrun`` / ``srun`` with several processes, generation and feature extraction are
split across the ranks (gloo on CPU, NCCL on CUDA). ``compare`` prints the scores as a table and marks
scores computed under different protocols (the ``protocol_hash`` of each metric) instead of mixing them.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch.distributed as dist

from spade_dist.cli.common import (
    add_config_options,
    add_model_source,
    add_overrides,
    add_subcommand,
    add_subparsers,
    fail,
    make_parser,
    model_source,
)
from spade_dist.config import ConfigError
from spade_dist.eval.commands import run_compare, run_once, run_watch


def build_parser() -> argparse.ArgumentParser:
    ap = make_parser("spade-eval", __doc__)
    sub = add_subparsers(ap)
    common = argparse.ArgumentParser(add_help=False)
    add_config_options(common, "evaluation config (default: the run's config.yaml / the checkpoint's own)")
    add_overrides(common, "eval.num_images=500")
    common.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: eval.device)")
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bars (also off when stderr is no terminal, and on ranks > 0)")
    common.add_argument("--inception-weights", help="Inception weights file (default: eval.inception_weights / "
                                                    "$SPADE_INCEPTION_WEIGHTS)")
    once = add_subcommand(sub, "once", parents=[common], help="evaluate one checkpoint and print JSON")
    add_model_source(once, checkpoint_help="a checkpoint step directory or a generator file to score",
                     run_help="a training run directory: score its newest committed checkpoint")
    once.add_argument("--out", help="also write the JSON result to this file")
    watch = add_subcommand(sub, "watch", parents=[common], help="follow a run's checkpoints until it is done")
    watch.add_argument("--run-dir", required=True, help="the training run whose checkpoints to follow")
    watch.add_argument("--policy", choices=["every", "newest", "every_k"], help="default: eval.policy")
    watch.add_argument("--every-k", type=int, help="default: eval.every_k")
    watch.add_argument("--poll-seconds", type=float, help="default: eval.poll_seconds")
    watch.add_argument("--parent-pid", type=int, help="stop when this process (the trainer) is gone")
    watch.add_argument("--wait-config-seconds", type=float, default=600.0,
                       help="how long to wait for the run's config.yaml to appear")
    compare = add_subcommand(sub, "compare", help="print scores of runs / results as one table, by protocol")
    compare.add_argument("sources", nargs="+", metavar="SOURCE",
                         help="a run directory, a metrics.jsonl file or a JSON result (once --out, best.json)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from spade_dist.eval.evaluate import CheckpointUnavailable
    from spade_dist.eval.reference_stats import ReferenceStatsError
    from spade_dist.eval.watcher import WatcherBusy
    from spade_dist.monitoring import MetricsError

    command = {"once": run_once, "watch": run_watch, "compare": run_compare}[args.command]
    try:
        if args.command == "once":
            args.checkpoint = model_source("spade-eval", args)
        return command(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointUnavailable, ReferenceStatsError, WatcherBusy,
            MetricsError) as exc:
        return fail("spade-eval", exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
