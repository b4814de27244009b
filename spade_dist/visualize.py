"""Turning tensors into pictures people look at: label colours, uint8 images, PNG grids, HTML galleries.

Used by ``spade-generate`` and meant for the trainer's sample gallery and ``spade-report``. Everything
here runs on CPU copies and writes files; nothing feeds back into training.
"""
from __future__ import annotations

import html
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from spade_dist.files import write_atomic
from spade_dist.palettes import label_palette

GALLERY_IMAGE_PX = 256  # target display width of one gallery image (integer enlargement)


def colorize_labels(label: torch.Tensor, label_nc: int, dataset: str = "custom") -> torch.Tensor:
    """Integer ``N x 1 x H x W`` label map -> uint8 ``N x 3 x H x W`` colour image (CPU), in the
    dataset's palette (:func:`spade_dist.palettes.label_palette`).

    Ids outside ``0 .. label_nc-1`` (255 "don't care" in particular) are drawn black.
    """
    if label.dim() != 4 or label.size(1) != 1:
        raise ValueError(f"colorize_labels: expected N x 1 x H x W, got {tuple(label.shape)}")
    palette = label_palette(label_nc, dataset)
    ids = label.detach().to("cpu", torch.int64)[:, 0]
    valid = (ids >= 0) & (ids < label_nc)
    colors = palette[ids.clamp(0, label_nc - 1)]  # N x H x W x 3
    colors[~valid] = 0
    return colors.permute(0, 3, 1, 2).contiguous()


def to_uint8_image(x: torch.Tensor) -> torch.Tensor:
    """Float image(s) in [-1, 1] (``... x C x H x W``) -> uint8 on CPU, as the official ``tensor2im``:
    ``(x + 1) / 2 * 255``, clipped, then truncated (not rounded) so saved PNGs match the official ones."""
    if not x.is_floating_point():
        raise ValueError(f"to_uint8_image: expected a float tensor in [-1, 1], got dtype {x.dtype}")
    scaled = (x.detach().to("cpu", torch.float32) + 1.0) / 2.0 * 255.0
    return scaled.clamp(0.0, 255.0).to(torch.uint8)


def _as_hwc_array(image: torch.Tensor, where: str) -> np.ndarray:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.size(0) not in (1, 3):
        raise ValueError(f"{where}: expected a uint8 tensor of shape 1|3 x H x W, got {image.dtype} {tuple(image.shape)}")
    if image.size(0) == 1:
        image = image.expand(3, -1, -1)
    return image.detach().cpu().permute(1, 2, 0).numpy()


def save_image(image: torch.Tensor, path: Union[str, Path]) -> Path:
    """Write one uint8 ``3 x H x W`` (or ``1 x H x W``) tensor as a PNG/JPEG (by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(_as_hwc_array(image, str(path)))).save(path)
    return path


def make_grid(rows: Sequence[Sequence[Optional[torch.Tensor]]], pad: int = 2) -> torch.Tensor:
    """Tile rows of uint8 ``3 x H x W`` images into one uint8 image (black background).

    Cells may differ in size: each column is as wide as its widest image and each row as tall as
    its tallest; images sit top-left in their cell. ``None`` leaves a cell empty."""
    if not rows or not any(rows):
        raise ValueError("make_grid: no images given")
    n_cols = max(len(r) for r in rows)
    col_w = [0] * n_cols
    row_h = [0] * len(rows)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                _as_hwc_array(image, f"grid cell ({r}, {c})")
                row_h[r] = max(row_h[r], image.size(1))
                col_w[c] = max(col_w[c], image.size(2))
    height = sum(row_h) + pad * (len(rows) + 1)
    width = sum(col_w) + pad * (n_cols + 1)
    canvas = torch.zeros(3, height, width, dtype=torch.uint8)
    y = pad
    for r, row in enumerate(rows):
        x = pad
        for c in range(n_cols):
            image = row[c] if c < len(row) else None
            if image is not None:
                image = image.detach().cpu().expand(3, -1, -1)
                canvas[:, y:y + image.size(1), x:x + image.size(2)] = image
            x += col_w[c] + pad
        y += row_h[r] + pad
    return canvas


def save_grid(rows: Sequence[Sequence[Optional[torch.Tensor]]], path: Union[str, Path], pad: int = 2) -> Path:
    """:func:`make_grid` then write it as a PNG at ``path``."""
    return save_image(make_grid(rows, pad), path)


@dataclass
class GalleryRow:
    """One row of the gallery: a caption and (column header, image path) cells, left to right."""

    caption: str
    images: list[tuple[str, Union[str, Path]]] = field(default_factory=list)


def _image_href(image_path: Union[str, Path], html_dir: Path) -> str:
    path = Path(image_path)
    if path.is_absolute():
        path = Path(os.path.relpath(path, html_dir.resolve()))
    return urllib.parse.quote(path.as_posix())


def enlarged_width(path: Union[str, Path], target: int) -> Optional[int]:
    """Display width for the image at ``path``: its width times the largest integer factor that keeps
    it within ``target`` px (at least 1). Integer factors + ``image-rendering: pixelated`` show small
    (e.g. 64 px) samples large with crisp pixels instead of as thumbnails. None if unreadable."""
    try:
        with Image.open(path) as img:
            width = img.width
    except OSError:
        return None
    return width * max(1, target // max(width, 1))


def write_gallery(html_path: Union[str, Path], title: str, rows: Sequence[GalleryRow],
                  columns: Optional[Sequence[str]] = None, notes: Sequence[str] = ()) -> Path:
    """Write a self-contained HTML page (no scripts, no external assets) showing ``rows`` of images.

    Image paths are made relative to the page (absolute paths are converted), so the folder can be
    copied or served as is. All text is HTML-escaped. ``columns`` adds a header row; ``notes`` are
    paragraphs under the title (e.g. checkpoint and seed). Small images are shown enlarged by an
    integer factor with crisp pixels (:func:`enlarged_width`)."""
    html_path = Path(html_path)
    html_dir = html_path.parent
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em;background:#fafafa}"
        "table{border-collapse:collapse}td,th{padding:4px;border:1px solid #ccc;vertical-align:top;"
        "text-align:center}img{image-rendering:pixelated;display:block}"
        ".cap{font-family:monospace;text-align:left}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += [f"<p>{esc(note)}</p>" for note in notes]
    parts.append("<table>")
    if columns:
        parts.append("<tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
    for row in rows:
        cells = []
        for header, image_path in row.images:
            href = _image_href(image_path, html_dir)
            width = enlarged_width(html_dir / image_path, GALLERY_IMAGE_PX)  # an absolute path stays as is
            size = f' width="{width}"' if width else ""
            cells.append(
                f'<td><a href="{esc(href)}"><img src="{esc(href)}"{size} alt="{esc(header)}"></a>'
                f"<div>{esc(header)}</div></td>"
            )
        parts.append(f'<tr><td class="cap">{esc(row.caption)}</td>' + "".join(cells) + "</tr>")
    parts += ["</table>", "</body></html>", ""]
    write_atomic(html_path, "\n".join(parts))  # a browser never sees half a page; 0644
    return html_path
