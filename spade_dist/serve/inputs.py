"""Requests -> tensors, tensors -> downloads, for ``spade-serve``. Everything a browser sends is
untrusted: sizes are bounded before anything is decoded, and every failure is a :class:`RequestError`
whose message the page shows.

Label maps arrive in three forms:

- the canvas: raw little-endian uint16 ids at exactly the generation size;
- an uploaded PNG of ids (single channel, mode L / P / I / I;16 — ``spade-generate``'s reader, so the
  same file gives the same label tensor) or of palette colours (RGB: each colour is mapped to the id
  the label palette gives it; where the palette repeats a colour, the lowest id wins);
- a shard sample, read through the eval loader at startup.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from spade_dist.generation import GenerateError, read_integer_map, read_photo
from spade_dist.labels import DONTCARE_ID, LabelError, check_label_ids
from spade_dist.visualize import label_palette

# Pixels of an uploaded image, checked from its header before decoding (a 100 kB PNG can expand
# to gigabytes).
MAX_UPLOAD_PIXELS = 64 * 1024 * 1024
# Colours listed in an "unknown colour" message before it abbreviates.
_MAX_COLOURS_IN_MESSAGE = 8


class RequestError(ValueError):
    """A request the server refuses; the message is shown in the page as is."""


def _check_header(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of an image from its header, refusing empty, unknown or oversized images."""
    if not data:
        raise RequestError(f"{name}: empty upload")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # Pillow's own cap, above ours: the same answer
        raise RequestError(f"{name}: more than the {MAX_UPLOAD_PIXELS} pixels this server decodes") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise RequestError(f"{name}: not an image PIL can read ({exc})") from exc
    if width * height > MAX_UPLOAD_PIXELS:
        raise RequestError(f"{name}: {width}x{height} pixels is more than the {MAX_UPLOAD_PIXELS} this server decodes")
    return width, height


def _colours_to_ids(rgb: np.ndarray, label_nc: int, name: str) -> np.ndarray:
    """H x W x 3 uint8 palette colours -> H x W int64 ids (black with 255 allowed is not special: a
    colour is looked up in the palette only)."""
    palette = label_palette(label_nc).numpy().astype(np.int64)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    # np.unique keeps the first index of each colour: the lowest id wins for repeated colours.
    unique_codes, first_ids = np.unique(palette_codes, return_index=True)
    pos = np.clip(np.searchsorted(unique_codes, codes), 0, len(unique_codes) - 1)
    known = unique_codes[pos] == codes
    if not known.all():
        bad = np.unique(codes[~known])
        shown = ", ".join(f"#{int(c):06x}" for c in bad[:_MAX_COLOURS_IN_MESSAGE])
        more = f" ... ({len(bad)} colours)" if len(bad) > _MAX_COLOURS_IN_MESSAGE else ""
        raise RequestError(f"{name}: colours not in the label palette of {label_nc} classes: {shown}{more} "
                           "(upload a PNG of ids, or of the exact palette colours, without smoothing)")
    return first_ids[pos]


def decode_label_upload(data: bytes, name: str, size_hw: tuple[int, int], label_nc: int,
                        contain_dontcare_label: bool) -> torch.Tensor:
    """An uploaded label PNG -> int64 1 x 1 x H x W at the generation size (nearest neighbour)."""
    _check_header(data, name)
    with Image.open(io.BytesIO(data)) as img:
        mode = img.mode
    try:
        if mode in ("RGB", "RGBA"):
            with Image.open(io.BytesIO(data)) as img:
                rgb = np.array(img.convert("RGB"), dtype=np.uint8)
            ids = _colours_to_ids(rgb, label_nc, name)
            resized = Image.fromarray(ids.astype(np.int32)).resize((size_hw[1], size_hw[0]), Image.NEAREST)
            return torch.from_numpy(np.array(resized, dtype=np.int64)).view(1, 1, *size_hw)
        return read_integer_map(io.BytesIO(data), size_hw, "label map",
                                check_ids=(label_nc, contain_dontcare_label), name=name)
    except GenerateError as exc:
        raise RequestError(str(exc)) from exc
    except (OSError, ValueError) as exc:  # truncated data found while decoding pixels
        raise RequestError(f"{name}: cannot decode: {exc}") from exc


def decode_style_upload(data: bytes, name: str, size_hw: tuple[int, int]) -> torch.Tensor:
    """An uploaded style photo -> uint8 3 x H x W at the generation size (bicubic, as spade-generate)."""
    _check_header(data, name)
    try:
        return read_photo(io.BytesIO(data), size_hw, name=name)
    except GenerateError as exc:
        raise RequestError(str(exc)) from exc


def decode_canvas(data: bytes, width: int, height: int, size_hw: tuple[int, int], label_nc: int,
                  contain_dontcare_label: bool) -> torch.Tensor:
    """Raw little-endian uint16 ids from the canvas -> int64 1 x 1 x H x W; the canvas is always at the
    generation size, anything else is refused rather than resized."""
    if (height, width) != size_hw:
        raise RequestError(f"label map is {width}x{height}; this model generates {size_hw[1]}x{size_hw[0]}")
    if len(data) != width * height * 2:
        raise RequestError(f"label map has {len(data)} bytes; {width}x{height} uint16 ids are {width * height * 2}")
    ids = torch.from_numpy(np.frombuffer(data, dtype="<u2").astype(np.int64)).view(1, 1, height, width)
    try:
        check_label_ids(ids, label_nc, contain_dontcare_label)
    except LabelError as exc:
        raise RequestError(str(exc)) from exc
    return ids


def label_png(label: torch.Tensor, label_nc: int) -> bytes:
    """int64 1 x 1 x H x W ids -> PNG bytes that both ``spade-generate`` and people read: a palette
    image whose indices are the ids and whose palette is the label palette (255 = don't care, black).
    Ids above 255 (label sets of more than 255 classes) go into a 16-bit greyscale PNG instead."""
    ids = label[0, 0].cpu().numpy()
    buffer = io.BytesIO()
    if ids.max(initial=0) <= DONTCARE_ID and label_nc <= DONTCARE_ID:
        image = Image.fromarray(ids.astype(np.uint8))  # putpalette turns L into P
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[:label_nc] = label_palette(label_nc).numpy()
        image.putpalette(palette.reshape(-1).tolist())
    else:
        image = Image.fromarray(ids.astype(np.uint16))  # I;16
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_png(image: torch.Tensor) -> bytes:
    """uint8 3 x H x W -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def ids_payload(label: torch.Tensor, key: Optional[str] = None) -> dict:
    """int64 1 x 1 x H x W ids -> the JSON the page loads into its canvas."""
    _, _, height, width = label.shape
    payload = {"width": int(width), "height": int(height), "ids": label.reshape(-1).tolist()}
    if key is not None:
        payload["key"] = key
    return payload
