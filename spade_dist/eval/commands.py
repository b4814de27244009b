"""The ``spade-eval`` commands as library functions: ``once`` (score one checkpoint), ``watch``
(follow a run's checkpoints) and ``compare`` (a table of scores), plus the process setup they share.
``spade_dist.cli.eval`` parses the arguments (see its help for each one) and calls :func:`run_once` /
:func:`run_watch` / :func:`run_compare`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from spade_dist.cli.common import config_source, overrides
from spade_dist.config import Config, ConfigError, config_from_dict, load_config, parse_override
from spade_dist.distributed import resolve_device
from spade_dist.files import write_atomic
from spade_dist.progress import progress_wanted
from spade_dist.run_dir import RunDir

if TYPE_CHECKING:
    from spade_dist.eval.evaluate import EvalResult


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


def init_distributed(device: str) -> tuple[int, int, str]:
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
            raise ConfigError(f"{path} did not appear within {seconds:.0f}s; pass --config or --preset")
        time.sleep(1.0)


def run_once(args: argparse.Namespace) -> int:
    from spade_dist.eval.evaluate import Evaluator, load_generator
    from spade_dist.eval.launch import check_eval_inputs

    if config_source(args):
        cfg = _with_overrides(load_config(config_source(args)), args)
        check_eval_inputs(cfg)  # fail fast, before reading the checkpoint
        generator = None
    else:
        generator, cfg = load_generator(args.checkpoint, "cpu")
        cfg = _with_overrides(cfg, args)
    _set_threads(cfg)
    rank, _, device = init_distributed(cfg.eval.device)
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
            write_atomic(args.out, text + "\n")
        if cfg.metrics.pushgateway:
            _push_result(cfg, Path(args.checkpoint), result)
    return 0


def _push_result(cfg: Config, checkpoint: Path, result: "EvalResult") -> None:
    """Push one ``once`` result to ``metrics.pushgateway`` (the job ends before Prometheus could scrape it)."""
    from spade_dist.checkpoint.layout import step_of
    from spade_dist.eval.scores import metric_value
    from spade_dist.monitoring.exporter import EvalMetrics

    # R/checkpoints/step-N and R/eval/best_generator.pt belong to run R; any other file to its folder.
    run_dir = checkpoint.parent.parent if checkpoint.parent.name in ("checkpoints", "eval") else checkpoint.parent
    step = step_of(checkpoint)
    step = step if step is not None else -1
    record = result.to_record()
    metrics = EvalMetrics(dataclasses.replace(cfg.metrics, enabled=True), run_dir)
    values = {m: metric_value(record, m) for m in result.metrics}
    metrics.record(step, record, {m: v for m, v in values.items() if v is not None}, step)
    print(f"spade-eval: pushed to {cfg.metrics.pushgateway} (job spade-eval, run {metrics.run}, "
          f"job_id {metrics.job_id})", file=sys.stderr)


def run_watch(args: argparse.Namespace) -> int:
    from spade_dist.eval.evaluate import Evaluator
    from spade_dist.eval.watcher import EvalWatcher
    from spade_dist.monitoring.exporter import EvalMetrics

    run_dir = Path(args.run_dir)
    config_path = config_source(args) or RunDir(run_dir).config
    if not config_source(args):
        _wait_for(Path(config_path), args.wait_config_seconds)
    cfg = _with_overrides(load_config(config_path), args)
    _set_threads(cfg)
    rank, _, device = init_distributed(cfg.eval.device)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda _: None)
    # Fails here, at start, without Inception weights or with a segmenter that does not fit its class map.
    evaluator = Evaluator(cfg, device=device, log=log, progress=progress_wanted(not args.no_progress, rank))
    metrics = None
    if rank == 0 and cfg.metrics.enabled:
        metrics = EvalMetrics(cfg.metrics, run_dir)
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


def run_compare(args: argparse.Namespace) -> int:
    from spade_dist.eval.compare import format_table, read_scores

    rows = [row for source in args.sources for row in read_scores(source)]
    print("\n".join(format_table(rows)))
    return 0
