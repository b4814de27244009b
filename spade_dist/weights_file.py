"""Reading a weights file (``torch.load(weights_only=True)`` or safetensors) with errors people can act on.

Checkpoints, official ``latest_net_G.pth`` files and VGG weights come from elsewhere: they are read
with ``weights_only=True`` (tensors and plain containers, never code) or as safetensors (tensors and a
string metadata map). When that fails, torch's own message is written for developers (it suggests
``weights_only=False``, which would run the file's code); :func:`load_weights` says instead what the
file is and what was expected, in one line. The one reader of weights files in the package.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Union

import torch


class WeightsFileError(ValueError):
    """A file that is no readable weights file; the message names it and says why."""


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return bool(head) and all(b in b"\t\n\r" or 32 <= b < 127 for b in head)


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words (no library internals, no advice to
    unpickle untrusted code)."""
    text = str(exc)
    # torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module x is blocked".
    if isinstance(exc, pickle.UnpicklingError) and "unsupported global" in text.lower():
        found = _GLOBAL.search(text)
        what = f" ({found.group(1)})" if found else ""
        return (f"holds pickled Python objects{what}, not only tensors: spade-dist reads weights only and never "
                "runs code from a file")
    if _looks_like_text(path):
        return "is a text file (a config?), not PyTorch weights"
    if isinstance(exc, EOFError) or "central directory" in text or "zip archive" in text:
        return f"is truncated or corrupt ({path.stat().st_size} bytes): copy it again"
    if isinstance(exc, pickle.UnpicklingError):
        return "is not a PyTorch weights file (neither a torch.save archive nor a pickle of tensors)"
    return f"cannot be read as PyTorch weights ({type(exc).__name__})"


def is_safetensors(path: Union[str, Path]) -> bool:
    """A safetensors file, by its header (8-byte little-endian length, then a JSON object)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
        size = os.fstat(handle.fileno()).st_size
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def read_safetensors(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata map of a safetensors file; :class:`WeightsFileError` naming the file
    when it is torn or malformed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line about the file
        detail = " ".join(str(exc).split())[:200]
        raise WeightsFileError(f"{path}: is a truncated or malformed safetensors file ({detail}): copy it again") from exc


def load_weights(path: Union[str, Path], mmap: bool = False) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (``mmap``: memory-mapped where the
    file's format allows it; legacy non-zip files are read plainly); a safetensors file gives its
    tensors. :class:`WeightsFileError` naming the file and the reason when that fails
    (FileNotFoundError for a missing file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if is_safetensors(path):
        return read_safetensors(path)[0]
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped; the plain read decides
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line about the file
        raise WeightsFileError(f"{path}: {unreadable_reason(path, exc)}") from exc
