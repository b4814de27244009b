"""Experiment trackers (``train.trackers``, e.g. ``[tensorboard]``) through Accelerate's tracker API.

Rank 0 only. Each logging step's scalars (loss terms, learning rates, gradient norms, throughput,
data-wait share) and every sample grid go to each tracker, so researchers get the curves they know
(TensorBoard: ``tensorboard --logdir RUN_DIR/tensorboard``) beside Prometheus and ``spade-report``.
Accelerate's trackers work without an ``Accelerator`` (they need its ``PartialState``, which joins the
process group the backend already set up), so this is the same for the DDP and the DeepSpeed backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

from spade_dist.config import Config, ConfigError
from spade_dist.run_dir import TENSORBOARD_DIRNAME

TRACKER_DIRS = {"tensorboard": TENSORBOARD_DIRNAME}  # tracker -> its folder under the run directory (run_dir.py)


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"train.max_steps": 300, ...}`` with the scalar types trackers accept."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class ExperimentTrackers:
    """The configured trackers of one run (none on ranks > 0 or with ``train.trackers: []``)."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool) -> None:
        self.trackers: list[Any] = []
        self.log_dirs: dict[str, Path] = {}
        if not is_main or not cfg.train.trackers:
            return
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        PartialState()  # Accelerate's logging needs it; under DDP the Accelerator already made it
        available = {str(t) for t in get_available_trackers()}
        for name in cfg.train.trackers:
            if name not in available:
                raise ConfigError(f"train.trackers: '{name}' is not installed in this environment "
                                  f"(pip install {name}) or drop it from train.trackers")
            log_dir = run_dir / TRACKER_DIRS[name]
            tracker = LOGGER_TYPE_TO_CLASS[name]("", log_dir)
            tracker.start()
            tracker.store_init_configuration(_flat(cfg.to_dict()))
            self.trackers.append(tracker)
            self.log_dirs[name] = log_dir

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(dict(values), step=step)

    def log_sample_grid(self, path: Optional[Path], step: int) -> None:
        """The sample grid PNG of ``step`` (label | EMA generator | real rows) as an image."""
        if path is None or not self.trackers:
            return
        with Image.open(path) as img:
            grid = np.asarray(img.convert("RGB"))
        for tracker in self.trackers:
            tracker.log_images({"samples": grid[None]}, step=step, dataformats="NHWC")

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
