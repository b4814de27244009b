"""``spade-eval``: FID / KID of checkpoints (see docs/EVALUATION.md).

    spade-eval once  --checkpoint CKPT [--config C] [--out result.json] [eval.num_images=500 ...]
    spade-eval watch --run-dir R [--config C] [--policy every|newest|every_k] [--every-k K] [KEY=VALUE ...]

CKPT is a checkpoint step directory (``R/checkpoints/step-XXXXXXXXX``) or a single-file generator
(``spade-export`` / ``eval/best_generator.pt``). With ``metrics.pushgateway=HOST:PORT`` set, ``once``
pushes its result to that Pushgateway (group ``job="spade-eval"``, ``run``, ``job_id``; run = the run
directory the checkpoint lies in, or ``metrics.run_name``), since it ends before any scrape. ``watch`` reads ``R/config.yaml`` unless ``--config``
is given. Under ``torchrun`` / ``srun`` with several processes, generation and feature extraction are
split across the ranks (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist

from spade_dist.cli.common import add_overrides, add_subcommand, add_subparsers, fail, make_parser, overrides
from spade_dist.config import Config, ConfigError, config_from_dict, load_config, parse_override
from spade_dist.distributed import resolve_device
from spade_dist.run_dir import RunDir
from spade_dist.progress import progress_wanted

if TYPE_CHECKING:
    from spade_dist.eval.evaluate import EvalResult


def build_parser() -> argparse.ArgumentParser:
    ap = make_parser("spade-eval", __doc__)
    sub = add_subparsers(ap)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default: the run's config.yaml / the checkpoint's own)")
    add_overrides(common, "eval.num_images=500")
    common.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: eval.device)")
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bars (also off when stderr is no terminal, and on ranks > 0)")
    common.add_argument("--inception-weights", help="Inception weights file (default: eval.inception_weights / "
                                                    "$SPADE_INCEPTION_WEIGHTS)")
    once = add_subcommand(sub, "once", parents=[common], help="evaluate one checkpoint and print JSON")
    once.add_argument("--checkpoint", required=True)
    once.add_argument("--out", help="also write the JSON result to this file")
    watch = add_subcommand(sub, "watch", parents=[common], help="follow a run's checkpoints until it is done")
    watch.add_argument("--run-dir", required=True)
    watch.add_argument("--policy", choices=["every", "newest", "every_k"], help="default: eval.policy")
    watch.add_argument("--every-k", type=int, help="default: eval.every_k")
    watch.add_argument("--poll-seconds", type=float, help="default: eval.poll_seconds")
    watch.add_argument("--parent-pid", type=int, help="stop when this process (the trainer) is gone")
    watch.add_argument("--wait-config-seconds", type=float, default=600.0,
                       help="how long to wait for the run's config.yaml to appear")
    return ap


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    texts = overrides(args)
    if args.inception_weights:
        texts.append(f"eval.inception_weights={args.inception_weights}")
    if args.device:
        texts.append(f"eval.device={args.device}")
    merged = cfg.to_dict()
    for text in texts:
        merged = _merge(merged, parse_override(text))
    return config_from_dict(merged, source="<spade-eval overrides>")


def _init_distributed(device: str) -> tuple[int, int, str]:
    """Join the launcher's process group when there is one; returns (rank, world, this rank's device)."""
    device = str(resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")), key="eval.device"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # NCCL collectives use the current device
    return rank, world, device


def _set_threads(cfg: Config) -> None:
    threads = int(os.environ.get("SPADE_EVAL_CPU_THREADS", "0") or cfg.eval.cpu_threads)
    if threads > 0:
        torch.set_num_threads(threads)


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.time() + seconds
    while not path.is_file():
        if time.time() > deadline:
            raise ConfigError(f"{path} did not appear within {seconds:.0f}s; pass --config")
        time.sleep(1.0)


def cmd_once(args: argparse.Namespace) -> int:
    from spade_dist.eval.evaluate import Evaluator, load_generator
    from spade_dist.eval.inception import resolve_inception_weights

    if args.config:
        cfg = _with_overrides(load_config(args.config), args)
        resolve_inception_weights(cfg.eval.inception_weights, cfg.eval.allow_download)  # fail fast
        generator = None
    else:
        generator, cfg = load_generator(args.checkpoint, "cpu")
        cfg = _with_overrides(cfg, args)
    _set_threads(cfg)
    rank, _, device = _init_distributed(cfg.eval.device)
    evaluator = Evaluator(cfg, device=device, log=(print if rank == 0 else (lambda _: None)),
                          progress=progress_wanted(not args.no_progress, rank))
    if generator is None:
        result = evaluator.evaluate_checkpoint(args.checkpoint)
    else:
        result = evaluator.evaluate(generator.to(evaluator.device).eval(), extra={"checkpoint": str(args.checkpoint)})
    if rank == 0:
        text = json.dumps(result.to_record(), sort_keys=True)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        if cfg.metrics.pushgateway:
            _push_result(cfg, Path(args.checkpoint), result)
    return 0


def _push_result(cfg: Config, checkpoint: Path, result: "EvalResult") -> None:
    """Push one ``once`` result to ``metrics.pushgateway`` (the job ends before Prometheus could scrape it)."""
    from spade_dist.checkpoint.layout import step_of
    from spade_dist.metrics import EvalMetrics

    # R/checkpoints/step-N and R/eval/best_generator.pt belong to run R; any other file to its folder.
    run_dir = checkpoint.parent.parent if checkpoint.parent.name in ("checkpoints", "eval") else checkpoint.parent
    step = step_of(checkpoint)
    metrics = EvalMetrics(dataclasses.replace(cfg.metrics, enabled=True), run_dir)
    metrics.record(step if step is not None else -1, result.fid, result.kid_mean, result.kid_std, result.seconds)
    print(f"spade-eval: pushed to {cfg.metrics.pushgateway} (job spade-eval, run {metrics.run}, "
          f"job_id {metrics.job_id})", file=sys.stderr)


def cmd_watch(args: argparse.Namespace) -> int:
    from spade_dist.eval.evaluate import Evaluator
    from spade_dist.eval.watcher import METRICS_NAME, EvalWatcher, best_record, read_records
    from spade_dist.metrics import EvalMetrics

    run_dir = Path(args.run_dir)
    config_path = Path(args.config) if args.config else RunDir(run_dir).config
    if not args.config:
        _wait_for(config_path, args.wait_config_seconds)
    cfg = _with_overrides(load_config(config_path), args)
    _set_threads(cfg)
    rank, _, device = _init_distributed(cfg.eval.device)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda _: None)
    # Fails here, at start, without Inception weights.
    evaluator = Evaluator(cfg, device=device, log=log, progress=progress_wanted(not args.no_progress, rank))
    metrics = None
    if rank == 0 and cfg.metrics.enabled:
        best = best_record(read_records(RunDir(run_dir).eval / METRICS_NAME))
        metrics = EvalMetrics(cfg.metrics, run_dir, best_fid=best["fid"] if best else None)
        metrics.start()
    watcher = EvalWatcher(
        run_dir, evaluator, policy=args.policy or cfg.eval.policy,
        every_k=args.every_k if args.every_k is not None else cfg.eval.every_k,
        poll_seconds=args.poll_seconds if args.poll_seconds is not None else cfg.eval.poll_seconds,
        parent_pid=args.parent_pid, metrics=metrics, log=log,
    )
    try:
        records = watcher.run()
    finally:
        if metrics is not None:
            metrics.close()
    log(f"[eval] run finished; {sum(r.get('status') == 'ok' for r in records)} checkpoints scored, "
        f"{sum(r.get('status') == 'skipped' for r in records)} skipped")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from spade_dist.eval.evaluate import CheckpointUnavailable
    from spade_dist.eval.reference_stats import ReferenceStatsError
    from spade_dist.eval.watcher import WatcherBusy
    from spade_dist.metrics import MetricsError

    try:
        return cmd_once(args) if args.command == "once" else cmd_watch(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointUnavailable, ReferenceStatsError, WatcherBusy,
            MetricsError) as exc:
        return fail("spade-eval", exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
