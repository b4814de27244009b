"""``spade-data synth``: a procedural landscape dataset (label maps + rendered photos), the project's
own embedded default dataset for the quickstart, the benchmarks and tests.

Each label map is built from smooth random curves and blobs (horizon, mountains with snow caps,
clouds, a lake with a beach or a dirt path, trees and rocks), then rendered with a per-class base
colour, a mild per-class vertical shading and low-amplitude texture noise. Colours are far apart
and textures mild on purpose: a few CPU minutes of training at 32-64 px must be enough for a
generator to learn the class -> colour mapping, which makes "did it learn?" checks meaningful.

Determinism: image ``i`` of split ``s`` uses ``numpy.random.default_rng([seed, split_id, i])``, so
the same seed gives byte-identical PNG files and an image does not depend on ``count``. Images are
PNG (lossless: the class colours survive exactly, and encoding is deterministic).

Output (the ``custom`` layout; ``spade-data shard --layout custom --root DIR`` finds it unaided)::

    DIR/dataset.json                      label_nc, class names and colours, counts, seed, size
    DIR/train/images/train_000000.png     RGB photo
    DIR/train/labels/train_000000.png     8-bit label map, ids 0..label_nc-1 (no don't care)
    DIR/val/...                           same for the validation split
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from data_tools.layouts import SYNTH_DESCRIPTOR, DataToolsError
from spade_dist.files import write_json_atomic

# (name, base RGB colour, vertical shading strength, texture amplitude in 0..255 units)
CLASSES: tuple[tuple[str, tuple[int, int, int], float, float], ...] = (
    ("sky", (120, 170, 235), 0.30, 3.0),
    ("cloud", (200, 205, 215), 0.05, 5.0),
    ("mountain", (100, 85, 125), 0.15, 8.0),
    ("snow", (250, 250, 252), 0.00, 3.0),
    ("water", (30, 80, 160), -0.25, 6.0),
    ("sand", (225, 200, 140), 0.05, 6.0),
    ("grass", (90, 170, 60), 0.20, 9.0),
    ("tree", (30, 90, 40), 0.10, 10.0),
    ("rock", (130, 130, 130), 0.10, 10.0),
    ("dirt", (145, 95, 55), 0.10, 8.0),
)
CLASS_NAMES = tuple(c[0] for c in CLASSES)
LABEL_NC = len(CLASSES)
SKY, CLOUD, MOUNTAIN, SNOW, WATER, SAND, GRASS, TREE, ROCK, DIRT = range(LABEL_NC)
SPLIT_IDS = {"train": 0, "val": 1}
DATASET_NAME = "synthetic-landscapes"

_BASE = np.array([c[1] for c in CLASSES], dtype=np.float32)
_SHADING = np.array([c[2] for c in CLASSES], dtype=np.float32)
_TEXTURE = np.array([c[3] for c in CLASSES], dtype=np.float32)


def _curve(rng: np.random.Generator, x: np.ndarray, octaves: int = 4) -> np.ndarray:
    """Smooth random 1-D curve in about [-1, 1]: a few sines with 1/k amplitudes."""
    total = np.zeros_like(x)
    norm = 0.0
    for k in range(1, octaves + 1):
        freq = rng.uniform(0.5, 1.5) * k
        total += np.sin(2 * np.pi * freq * x + rng.uniform(0, 2 * np.pi)) / k
        norm += 1.0 / k
    return total / norm


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a coarse random grid bilinearly upsampled to size x size, values in ~[-1, 1]."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    pos = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i0 = pos.astype(np.int64)
    t = pos - i0
    rows = grid[i0] * (1 - t)[:, None] + grid[i0 + 1] * t[:, None]  # interpolate along y
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]  # then along x


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             wobble: np.ndarray) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0 + 0.35 * wobble


def make_label_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random landscape label map (uint8, size x size, ids 0..LABEL_NC-1)."""
    s = float(size)
    x = np.arange(size, dtype=np.float32) / size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    wobble = _smooth_noise(rng, size, 6)
    label = np.full((size, size), GRASS, dtype=np.uint8)

    horizon = s * rng.uniform(0.42, 0.6) + 0.03 * s * _curve(rng, x)
    sky_bottom = horizon.copy()
    if rng.random() < 0.8:  # mountains: peaky ridge = 1 - |curve|
        ridge = 1.0 - np.abs(_curve(rng, x, octaves=3))
        height = s * rng.uniform(0.1, 0.3) * (0.35 + 0.65 * ridge)
        top = horizon - height
        label[yy < horizon[None, :]] = MOUNTAIN
        if height.max() > 0.18 * s:  # only tall ranges get snow caps
            snow_line = horizon - 0.72 * height.max() + 0.02 * s * _curve(rng, x)
            label[(yy < snow_line[None, :]) & (yy >= top[None, :])] = SNOW
        sky_bottom = top
    sky = yy < sky_bottom[None, :]
    label[sky] = SKY
    for _ in range(rng.integers(1, 5)):  # clouds: wobbly flat ellipses, only in the sky
        cx, cy = rng.uniform(0, s), rng.uniform(0.05, 0.3) * s
        rx, ry = rng.uniform(0.08, 0.2) * s, rng.uniform(0.03, 0.07) * s
        label[_ellipse(xx, yy, cx, cy, rx, ry, wobble) & sky] = CLOUD

    ground = yy >= horizon[None, :]
    if rng.random() < 0.6:  # a lake, often with a beach
        water_bottom = horizon + s * rng.uniform(0.05, 0.18) + 0.03 * s * _curve(rng, x)
        label[ground & (yy < water_bottom[None, :])] = WATER
        if rng.random() < 0.7:
            sand_bottom = water_bottom + s * rng.uniform(0.03, 0.1) + 0.015 * s * _curve(rng, x)
            label[(yy >= water_bottom[None, :]) & (yy < sand_bottom[None, :])] = SAND
    elif rng.random() < 0.5:  # a dirt path widening towards the viewer
        depth = np.clip((yy - horizon[None, :]) / (s - horizon[None, :] + 1e-6), 0, 1)
        centre = s * rng.uniform(0.3, 0.7) + 0.1 * s * _curve(rng, x).mean() + depth * s * rng.uniform(-0.2, 0.2)
        label[ground & (np.abs(xx - centre) < (0.01 + 0.15 * depth) * s)] = DIRT

    for _ in range(rng.integers(0, 4)):  # rocks lie on grass or sand
        cy = rng.uniform(horizon.mean() + 0.05 * s, s)
        cx, r = rng.uniform(0, s), rng.uniform(0.02, 0.05) * s
        label[_ellipse(xx, yy, cx, cy, r * 1.3, r, wobble) & np.isin(label, (GRASS, SAND))] = ROCK
    for _ in range(rng.integers(1, 9)):  # trees stand on the ground, crowns may cover sky and mountains
        cx = rng.uniform(0, s)
        base = horizon[min(int(cx), size - 1)] + rng.uniform(0.0, 0.35) * s
        rx = rng.uniform(0.03, 0.08) * s
        ry = rx * rng.uniform(1.2, 2.0)
        crown = _ellipse(xx, yy, cx, base - ry, rx, ry, wobble) & (label != WATER)
        label[crown] = TREE
    return label


def render_photo(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """RGB uint8 photo for ``label``: base colour x vertical shading + mild texture."""
    size = label.shape[0]
    rows = (np.arange(size, dtype=np.float32) / size - 0.5)[:, None]
    shade = 1.0 + _SHADING[label] * rows  # e.g. the sky brightens towards the horizon
    texture = 0.7 * _smooth_noise(rng, size, max(2, size // 8)) + 0.3 * rng.standard_normal((size, size)).astype(np.float32)
    photo = _BASE[label] * shade[..., None] + (_TEXTURE[label] * texture)[..., None]
    return np.clip(np.rint(photo), 0, 255).astype(np.uint8)


def make_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(photo HxWx3 uint8, label HxW uint8) of one sample; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    label = make_label_map(rng, size)
    return render_photo(rng, label), label


PNG_COMPRESS_LEVEL = 3  # 2.5x faster than zlib's default 6 for ~3% larger files; output stays deterministic


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def generate_synthetic(out: Union[str, Path], count: int, seed: int = 0, size: int = 128,
                       val_count: int = 0) -> dict:
    """Write ``count`` train and ``val_count`` val samples under ``out``; returns the descriptor dict.

    Files of an earlier generation in the same folders that this one does not produce are removed,
    so the folder always matches ``dataset.json`` (written last, atomically).
    """
    if count < 1 or val_count < 0:
        raise DataToolsError(f"--count must be >= 1 and --val-count >= 0, got {count} / {val_count}")
    if size < 16:
        raise DataToolsError(f"--size must be >= 16 px, got {size}")
    out = Path(out)
    (out / SYNTH_DESCRIPTOR).unlink(missing_ok=True)  # folder is incomplete until the descriptor returns
    counts = {"train": count, "val": val_count}
    for split, n in counts.items():
        image_dir, label_dir = out / split / "images", out / split / "labels"
        wanted = {f"{split}_{i:06d}.png" for i in range(n)}
        for folder in (image_dir, label_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.png"):
                if stale.name not in wanted:
                    stale.unlink()
        for i in range(n):
            photo, label = make_sample(seed, split, i, size)
            _save_png(photo, image_dir / f"{split}_{i:06d}.png")
            _save_png(label, label_dir / f"{split}_{i:06d}.png")
    descriptor = {
        "name": DATASET_NAME, "layout": "custom", "label_nc": LABEL_NC, "contain_dontcare_label": False,
        "instance": False, "image_format": "png", "seed": seed, "size": size, "splits": counts,
        "image_dir": "{split}/images", "label_dir": "{split}/labels",
        "classes": [{"id": i, "name": name, "color": list(colour)} for i, (name, colour, _, _) in enumerate(CLASSES)],
    }
    write_json_atomic(out / SYNTH_DESCRIPTOR, descriptor)
    return descriptor
