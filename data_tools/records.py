"""Turn one source sample (image, label, instance files) into validated tar members.

Runs inside pool workers, so it is a pure function of its arguments: it never raises for bad
data but returns a :class:`BadSample` with a readable reason, letting the parent decide between
failing the run and skipping (``--skip-bad``). Labels are always read as single-channel integers:
a PNG label decoded through RGB would silently change ids, so RGB labels are rejected.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from data_tools.layouts import DONTCARE, SourceSample

# Modes whose pixels are integer ids. "P" (palette) pixels are the indices, i.e. the ids; such maps
# are re-encoded as mode L so that no reader can turn them into palette colours.
ID_MAP_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")
# Modes a PNG can carry verbatim into the shard (decoders read them as one integer channel).
PASSTHROUGH_MODES = ("L", "I;16", "I;16B", "I;16L", "I")
JPEG_QUALITY = 95  # only used when --max-side re-encodes a JPEG


@dataclass(frozen=True)
class EncodeOptions:
    label_nc: int
    contain_dontcare_label: bool
    label_shift: int
    instance: bool
    max_side: Optional[int] = None


@dataclass
class SampleRecord:
    key: str
    members: list[tuple[str, bytes]]  # (member name, payload) in field order
    width: int
    height: int
    histogram: list[int]  # label_nc class pixel counts, then the don't-care count


@dataclass
class BadSample:
    key: str
    files: tuple[str, ...]  # relative to the dataset root
    reason: str


class _Reject(Exception):
    """Internal: the sample is bad for the reason in the message."""


def _open_fully(path: Path, role: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not later in the training loop
    except FileNotFoundError:
        raise _Reject(f"{role} file missing: {path}") from None
    except Exception as err:  # PIL raises several types (OSError, SyntaxError, ValueError, ...)
        raise _Reject(f"cannot decode {role} {path}: {err}") from None
    return image


def _read_id_map(path: Path, role: str) -> tuple[Image.Image, np.ndarray]:
    image = _open_fully(path, role)
    if image.mode not in ID_MAP_MODES:
        raise _Reject(
            f"{role} {path} has mode {image.mode}: {role} maps must be single-channel integer images "
            f"(PIL modes {', '.join(ID_MAP_MODES)}), not colour")
    return image, np.asarray(image).astype(np.int64)


def _encode_png(ids: np.ndarray, role: str, path: Path) -> bytes:
    """Smallest integer PNG holding ``ids``: 8-bit when possible, else 16-bit."""
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise _Reject(f"{role} {path} has ids outside 0..65535 ({ids.min()}..{ids.max()}); cannot store as PNG")
    if ids.size == 0 or ids.max() <= 255:
        image = Image.fromarray(ids.astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(ids.astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _target_size(width: int, height: int, max_side: Optional[int]) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_ids(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map (never interpolate ids)."""
    height, width = ids.shape
    new_w, new_h = size
    rows = np.minimum((np.arange(new_h) + 0.5) * height / new_h, height - 1).astype(np.int64)
    cols = np.minimum((np.arange(new_w) + 0.5) * width / new_w, width - 1).astype(np.int64)
    return ids[rows[:, None], cols[None, :]]


def _image_member(path: Path, raw: bytes, image: Image.Image,
                  size: tuple[int, int]) -> tuple[str, bytes]:
    suffix = path.suffix.lower().lstrip(".")
    suffix = "jpg" if suffix == "jpeg" else suffix
    if size == image.size:
        return f"image.{suffix}", raw  # original bytes: no generation loss, no extra CPU
    rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
    resized = rgb.resize(size, Image.BICUBIC)  # the official code resizes images bicubically
    buffer = io.BytesIO()
    if suffix == "jpg":
        resized.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return "image.jpg", buffer.getvalue()
    resized.save(buffer, format="PNG")
    return "image.png", buffer.getvalue()


def _check_ids(ids: np.ndarray, options: EncodeOptions, path: Path) -> None:
    present = np.unique(ids)
    allowed = (present >= 0) & (present < options.label_nc)
    if options.contain_dontcare_label:
        allowed |= present == DONTCARE
    bad = present[~allowed]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:20]) + (" ..." if bad.size > 20 else "")
        shift = f" after the dataset's shift of {options.label_shift}" if options.label_shift else ""
        dontcare = f" or {DONTCARE}" if options.contain_dontcare_label else ""
        raise _Reject(f"label {path} has ids {shown}{shift}; allowed are 0..{options.label_nc - 1}{dontcare}")


def _encode(root: Path, source: SourceSample, options: EncodeOptions) -> SampleRecord:
    image_path, label_path = root / source.image, root / source.label
    try:
        raw_image = image_path.read_bytes()
    except OSError as err:
        raise _Reject(f"cannot read image {image_path}: {err}") from None
    image = _open_fully(image_path, "image")
    label_image, ids = _read_id_map(label_path, "label")
    if label_image.size != image.size:
        raise _Reject(f"image {image_path} is {image.size[0]}x{image.size[1]} but label {label_path} is "
                      f"{label_image.size[0]}x{label_image.size[1]}")
    if options.label_shift:
        # ADE20K: raw 0 ("other") becomes don't care, classes 1..N become 0..N-1 (official postprocess).
        ids = ids + options.label_shift
        ids[ids < 0] = DONTCARE
    _check_ids(ids, options, label_path)

    size = _target_size(image.size[0], image.size[1], options.max_side)
    members = [_image_member(image_path, raw_image, image, size)]
    label_verbatim = (size == image.size and not options.label_shift and label_image.format == "PNG"
                      and label_image.mode in ("L", "I;16", "I;16B", "I;16L"))
    if size != image.size:
        ids = _resize_ids(ids, size)
    members.append(("label.png", label_path.read_bytes() if label_verbatim else _encode_png(ids, "label", label_path)))

    if options.instance:
        if source.instance is None:
            raise _Reject(f"no instance map for image {image_path}")
        instance_path = root / source.instance
        instance_image, instance_ids = _read_id_map(instance_path, "instance")
        if instance_image.size != image.size:
            raise _Reject(f"image {image_path} is {image.size[0]}x{image.size[1]} but instance map {instance_path} "
                          f"is {instance_image.size[0]}x{instance_image.size[1]}")
        if size == image.size and instance_image.format == "PNG" and instance_image.mode in PASSTHROUGH_MODES:
            members.append(("instance.png", instance_path.read_bytes()))
        else:
            resized = _resize_ids(instance_ids, size) if size != image.size else instance_ids
            members.append(("instance.png", _encode_png(resized, "instance", instance_path)))

    counts = np.bincount(ids.ravel(), minlength=max(options.label_nc, DONTCARE + 1))
    dontcare_count = int(counts[DONTCARE]) if options.contain_dontcare_label else 0
    histogram = [int(c) for c in counts[: options.label_nc]] + [dontcare_count]

    source_paths = {"image": source.image, "label": source.label}
    if options.instance and source.instance is not None:
        source_paths["instance"] = source.instance
    meta = {"key": source.key, "width": size[0], "height": size[1], "source": source_paths}
    members.append(("meta.json", json.dumps(meta, sort_keys=False, separators=(",", ":")).encode("utf-8")))
    named = [(f"{source.key}.{field}", payload) for field, payload in members]
    return SampleRecord(source.key, named, size[0], size[1], histogram)


def encode_sample(root: Union[str, Path], source: SourceSample,
                  options: EncodeOptions) -> Union[SampleRecord, BadSample]:
    """Validate and encode one sample; bad data gives a :class:`BadSample`, never an exception."""
    try:
        return _encode(Path(root), source, options)
    except _Reject as reject:
        return BadSample(source.key, tuple(source.files()), str(reject))
    except Exception as err:  # anything unexpected from a decoder is still a property of this sample
        return BadSample(source.key, tuple(source.files()), f"{type(err).__name__}: {err}")


def encode_sample_task(task: tuple[str, SourceSample, EncodeOptions]) -> Union[SampleRecord, BadSample]:
    """Pool entry point (one picklable tuple argument)."""
    return encode_sample(*task)
