"""Start the evaluation watcher from the trainer (``eval.mode: subprocess``), without blocking it.

The trainer's rank 0 calls :func:`start_eval_watcher` once the run directory (with ``config.yaml``)
exists. The watcher is a separate Python process (``python -m spade_dist.cli.eval watch``) with its own
CPU thread budget (``eval.cpu_threads``) and device (``eval.device``), so its Inception forward passes
never share the trainer's threads or CUDA stream. Its output goes to ``<run_dir>/eval/watcher.log``.

Stopping: nothing to do in the normal case - the watcher exits by itself after the run's ``DONE``
marker once every checkpoint is scored, and it also exits when the trainer process (passed as
``--parent-pid``) disappears. :func:`stop_eval_watcher` waits for that and terminates it only after a
timeout (e.g. when the trainer aborts and must not leave a child behind).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

from spade_dist.config import SEGMENTATION_METRICS, Config
from spade_dist.eval.class_map import load_class_map
from spade_dist.eval.inception import resolve_inception_weights
from spade_dist.eval.segmenter import segmenter_format
from spade_dist.run_dir import RunDir

WATCHER_LOG = "watcher.log"


def check_eval_inputs(cfg: Config) -> None:
    """The files an evaluation of ``eval.metrics`` needs, checked before anything runs: the Inception
    weights (fid / kid), the segmenter path and its class map (miou / pixel_accuracy). Raises the
    one-line error naming the file and key. (Whether the segmenter's output classes fit the map needs
    the model: the evaluator checks that at its start, before generating any image.)"""
    if "fid" in cfg.eval.metrics or "kid" in cfg.eval.metrics:
        resolve_inception_weights(cfg.eval.inception_weights, cfg.eval.allow_download)
    if any(m in SEGMENTATION_METRICS for m in cfg.eval.metrics):
        segmenter_format(Path(cfg.eval.segmenter.path).expanduser())
        load_class_map(cfg.eval.segmenter.class_map, cfg.data)


def watcher_command(cfg: Config, run_dir: Union[str, Path], config_path: Optional[Union[str, Path]] = None,
                    parent_pid: Optional[int] = None) -> list[str]:
    """The argv of the watcher process (also what ``slurm/eval_fid.sh`` runs through ``spade-eval``)."""
    run_dir = Path(run_dir)
    cmd = [sys.executable, "-m", "spade_dist.cli.eval", "watch", "--run-dir", str(run_dir),
           "--policy", cfg.eval.policy, "--every-k", str(cfg.eval.every_k), "--device", cfg.eval.device]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


def start_eval_watcher(cfg: Config, run_dir: Union[str, Path], config_path: Optional[Union[str, Path]] = None,
                       parent_pid: Optional[int] = None, extra_env: Optional[dict] = None) -> subprocess.Popen:
    """Spawn the watcher for ``run_dir``; returns at once. Raises at once if an input of the evaluation is
    missing or wrong (:func:`check_eval_inputs`).

    ``config_path`` defaults to ``<run_dir>/config.yaml`` (the resolved config the trainer wrote);
    ``parent_pid`` defaults to this process, so the watcher ends if the trainer dies.
    """
    # Fail in the trainer, at start, rather than in a background process nobody watches.
    check_eval_inputs(cfg)
    run_dir = Path(run_dir)
    config_path = Path(config_path) if config_path is not None else RunDir(run_dir).config
    if not config_path.is_file():
        raise FileNotFoundError(f"start_eval_watcher: {config_path} does not exist; write the run's resolved config "
                                "before starting the watcher")
    threads = str(max(1, cfg.eval.cpu_threads))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "SPADE_EVAL_CPU_THREADS": threads})
    # The watcher is not part of the trainer's process group: drop the rendezvous variables so a
    # library that reads them cannot make it join (and hang) the training job.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK"):
        env.pop(key, None)
    if cfg.eval.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # Make the package importable even when it is not installed (a source checkout).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra_env or {})
    eval_dir = RunDir(run_dir).eval
    eval_dir.mkdir(parents=True, exist_ok=True)
    log = open(eval_dir / WATCHER_LOG, "ab")
    try:
        return subprocess.Popen(
            watcher_command(cfg, run_dir, config_path, parent_pid if parent_pid is not None else os.getpid()),
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own descriptor


def stop_eval_watcher(proc: subprocess.Popen, timeout: float = 0.0) -> Optional[int]:
    """Wait up to ``timeout`` seconds for the watcher to finish by itself, then terminate it.

    Returns its exit code. ``timeout=0`` terminates at once (aborting trainer).
    """
    try:
        return proc.wait(timeout=timeout) if timeout > 0 else _terminate(proc)
    except subprocess.TimeoutExpired:
        return _terminate(proc)


def _terminate(proc: subprocess.Popen) -> int:
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
