"""Sample grids of the EMA generator and the ``samples/index.html`` gallery across steps (rank 0 only).

A fixed set of training inputs is kept from the first batches this rank sees, so every grid shows
the same label maps and the gallery shows progress. One grid row per input: colourised label |
EMA fake | real. The gallery is rebuilt from the PNG files present, so it survives resumes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from spade_dist.config import Config
from spade_dist.run_dir import RunDir
from spade_dist.train.step import prepare_batch
from spade_dist.visualize import GalleryRow, colorize_labels, save_grid, to_uint8_image, write_gallery

SAMPLE_NAME = re.compile(r"^step-(\d{9})\.png$")


def sample_path(samples_dir: Path, step: int) -> Path:
    return samples_dir / f"step-{step:09d}.png"


class SampleWriter:
    """Keeps ``num_images`` fixed inputs; :meth:`write` renders a grid and refreshes the gallery.

    Owns its schedule (:meth:`maybe_write`: every ``train.sample_every`` steps and the last one) and
    does nothing on a rank other than the main one (``enabled=False``).
    """

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool = True) -> None:
        self.dir = RunDir(run_dir).samples
        self.cfg = cfg
        self.enabled = enabled
        self.num_images = max(1, cfg.train.num_sample_images)
        self._kept: dict[str, Any] = {}

    @property
    def ready(self) -> bool:
        return bool(self._kept) and self._kept["image"].shape[0] >= self.num_images

    def offer(self, batch: dict[str, Any]) -> None:
        """Keep inputs from ``batch`` until ``num_images`` are held (CPU copies)."""
        if not self.enabled or self.ready:
            return
        for key in ("image", "label", "instance"):
            if key not in batch:
                continue
            piece = batch[key].detach().cpu()
            self._kept[key] = piece if key not in self._kept else torch.cat([self._kept[key], piece])
            self._kept[key] = self._kept[key][: self.num_images]

    def maybe_write(self, step: int, last_step: bool, ema_generator: nn.Module, device: torch.device) -> Optional[Path]:
        """The grid of ``step`` when it is due (every ``train.sample_every`` steps and the last one)."""
        if not self.enabled or not (step % self.cfg.train.sample_every == 0 or last_step):
            return None
        return self.write(step, ema_generator, device)

    @torch.no_grad()
    def write(self, step: int, ema_generator: nn.Module, device: torch.device) -> Optional[Path]:
        """Render the grid for ``step`` with the (eval-mode) EMA generator; returns the PNG path."""
        if not self._kept:
            return None
        mb = prepare_batch(self._kept, self.cfg, device)
        was_training = ema_generator.training
        ema_generator.eval()
        fake = ema_generator(mb.semantics)
        ema_generator.train(was_training)
        labels = colorize_labels(self._kept["label"], self.cfg.data.label_nc, self.cfg.data.dataset)
        fakes = to_uint8_image(fake.float())
        reals = self._kept["image"]
        rows = [[labels[i], fakes[i], reals[i]] for i in range(fakes.shape[0])]
        path = save_grid(rows, sample_path(self.dir, step))
        self.write_gallery()
        return path

    def write_gallery(self) -> Path:
        """index.html listing every grid in samples/, newest first."""
        steps = sorted((int(m.group(1)), p) for p in self.dir.glob("step-*.png") if (m := SAMPLE_NAME.match(p.name)))
        rows = [GalleryRow(caption=f"step {s}", images=[("label | EMA fake | real", p.name)]) for s, p in reversed(steps)]
        return write_gallery(
            self.dir / "index.html", f"{Path(self.dir).parent.name}: samples", rows,
            notes=[f"{len(rows)} grids; each row of a grid: colourised label | EMA generator | real image"],
        )
