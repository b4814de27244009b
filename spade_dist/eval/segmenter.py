"""The segmentation network behind mIoU / pixel accuracy, loaded from a local path (never downloaded).

Two formats, told apart by the path (``eval.segmenter.path``):

- a **folder**: a Hugging Face ``transformers`` model saved with ``save_pretrained`` (``config.json``
  + ``*.safetensors``), loaded with ``eval.segmenter.model_class`` (default
  ``AutoModelForSemanticSegmentation``: SegFormer, UperNet, DPT, BEiT, ...), ``local_files_only`` and
  safetensors only (no pickled weights). Per-pixel models give ``logits``; mask-classification models
  (MaskFormer / Mask2Former / OneFormer, ``model_class: Mask2FormerForUniversalSegmentation``) give
  class and mask queries, combined into per-class scores as their image processors' semantic
  post-processing does (softmax over classes without the "no object" one, times sigmoid masks).
- a **file**: a TorchScript module (``torch.jit.save``; a traced or scripted wrapper of any
  segmentation code, docs/REPRODUCE.md step 5). It gets the normalised batch and returns N x C x h x w
  scores, or a tuple / list whose first element they are, or a dict with ``out`` or ``logits``.
  TorchScript is code: load only files you trust (their sha256 is recorded with every score).

Both run on uint8 images: channels in ``channel_order``, resized to ``input_size`` (float, no
rounding; empty = as they are), normalised as ``(pixel - mean) / std``. The scores are resized back
to the label map's size (bilinear) and the arg-max is the predicted class. :func:`load_segmenter`
checks the number of output classes against the class map with one forward on a blank image, before
any image is generated.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from spade_dist.config import ConfigError, SegmenterConfig
from spade_dist.eval.class_map import ClassMap
from spade_dist.files import sha256_file

HUGGINGFACE = "huggingface"
TORCHSCRIPT = "torchscript"
# What a save_pretrained folder loads from with safetensors (the files its identity covers).
_HF_FILES = ("config.json", ".safetensors", ".safetensors.index.json")


class SegmenterError(ConfigError):
    """The segmenter cannot be loaded or does not fit its class map; the message names the path / key
    (a bad ``eval.segmenter`` setting: exit 2 in every command)."""


def segmenter_format(path: Path) -> str:
    """``huggingface`` for a folder, ``torchscript`` for a file; :class:`SegmenterError` when missing."""
    if path.is_dir():
        return HUGGINGFACE
    if path.is_file():
        return TORCHSCRIPT
    raise SegmenterError(f"segmenter {path} (eval.segmenter.path) does not exist: give a Hugging Face folder "
                         "(save_pretrained) or a TorchScript file (torch.jit.save)")


def segmenter_sha256(path: Path) -> str:
    """sha256 of a TorchScript file, or of a Hugging Face folder's config and safetensors files
    (their names and contents), so that any change of the weights changes the recorded protocol."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for entry in sorted(path.iterdir()):
        if entry.is_file() and (entry.name == _HF_FILES[0] or entry.name.endswith(_HF_FILES[1:])):
            digest.update(f"{entry.name}\0{sha256_file(entry)}\n".encode())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _load_huggingface(path: Path, model_class: str) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise SegmenterError(f"segmenter {path} is a Hugging Face folder, but transformers is not installed "
                             "(pip install 'spade-dist[eval]')") from exc
    if not (path / "config.json").is_file():
        raise SegmenterError(f"segmenter folder {path} (eval.segmenter.path) has no config.json: not a "
                             "save_pretrained folder")
    name = model_class or "AutoModelForSemanticSegmentation"
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise SegmenterError(f"eval.segmenter.model_class {name!r} is not a transformers model class "
                             "(e.g. AutoModelForSemanticSegmentation, Mask2FormerForUniversalSegmentation)")
    try:
        return cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise SegmenterError(f"segmenter {path}: {name} cannot load it ({_first_line(exc)}); it needs config.json "
                             "and *.safetensors from save_pretrained") from exc


def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise SegmenterError(f"segmenter {path} is not a TorchScript file ({_first_line(exc)}); save the model "
                             "with torch.jit.save (docs/REPRODUCE.md step 5)") from exc


def _scores_of(output: Any) -> torch.Tensor:
    """N x C x h x w class scores from whatever the model returned."""
    if hasattr(output, "class_queries_logits") and getattr(output, "masks_queries_logits", None) is not None:
        classes = output.class_queries_logits.softmax(dim=-1)[..., :-1]  # drop "no object"
        return torch.einsum("bqc,bqhw->bchw", classes, output.masks_queries_logits.sigmoid())
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        for key in ("out", "logits"):
            if key in output:
                return output[key]
        raise SegmenterError(f"the segmenter returned a dict without 'out' or 'logits' (keys {sorted(output)})")
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


class Segmenter:
    """A loaded segmenter with its preprocessing; :meth:`predict` gives class indices per pixel."""

    def __init__(self, cfg: SegmenterConfig, class_map: ClassMap, device: Union[str, torch.device]) -> None:
        self.cfg = cfg
        self.class_map = class_map
        self.device = torch.device(device)
        self.path = Path(cfg.path).expanduser()
        self.format = segmenter_format(self.path)
        self.sha256 = segmenter_sha256(self.path)
        model = _load_huggingface(self.path, cfg.model_class) if self.format == HUGGINGFACE \
            else _load_torchscript(self.path, self.device)
        self.model = model.to(self.device).eval()
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W (RGB) -> the segmenter's float input (see the module doc)."""
        x = images_uint8.to(self.device, torch.float32)
        if self.cfg.channel_order == "bgr":
            x = x.flip(1)
        if self.cfg.input_size and tuple(self.cfg.input_size) != (x.shape[-1], x.shape[-2]):
            width, height = self.cfg.input_size
            mode = self.cfg.interpolation
            x = F.interpolate(x, size=(height, width), mode=mode,
                              **({} if mode == "nearest" else {"align_corners": False, "antialias": True}))
        return (x - self.mean) / self.std

    @torch.no_grad()
    def scores(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """N x C x H x W float scores at the images' own size."""
        x = self.preprocess(images_uint8)
        output = self.model(pixel_values=x) if self.format == HUGGINGFACE else self.model(x)
        scores = _scores_of(output)
        if not torch.is_tensor(scores) or scores.dim() != 4 or scores.shape[0] != x.shape[0]:
            shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
            raise SegmenterError(f"segmenter {self.path} returned {shape} for a batch of {x.shape[0]}; expected "
                                 "N x classes x height x width scores")
        size = images_uint8.shape[-2:]
        if scores.shape[-2:] != size:
            scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
        return scores

    def predict(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Predicted output class per pixel, int64 N x H x W."""
        return self.scores(images_uint8).argmax(dim=1)

    def protocol(self) -> dict:
        """How this segmenter scores (the ``segmentation`` section of the protocol record)."""
        cfg = self.cfg
        model_class = (cfg.model_class or "AutoModelForSemanticSegmentation") if self.format == HUGGINGFACE else ""
        return {"segmenter_sha256": self.sha256, "format": self.format, "model_class": model_class,
                "class_map": self.class_map.source, "class_map_sha256": self.class_map.sha256,
                "input_size": list(cfg.input_size), "interpolation": cfg.interpolation, "mean": list(cfg.mean),
                "std": list(cfg.std), "channel_order": cfg.channel_order}

    def check_outputs(self, resolution: tuple[int, int]) -> None:
        """One forward on a blank image: the number of output classes must equal the class map's."""
        width, height = resolution
        blank = torch.zeros((1, 3, height, width), dtype=torch.uint8)
        try:
            classes = self.scores(blank).shape[1]
        except SegmenterError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the model raises on a plain image: it cannot run here
            raise SegmenterError(f"segmenter {self.path} fails on a {width}x{height} image: {_first_line(exc)}") from exc
        if classes != self.class_map.num_outputs:
            raise SegmenterError(
                f"segmenter {self.path} predicts {classes} classes but its class map {self.class_map.source} "
                f"(eval.segmenter.class_map) lists {self.class_map.num_outputs}: use the map made for this model")


def load_segmenter(cfg: SegmenterConfig, class_map: ClassMap, device: Union[str, torch.device],
                   resolution: tuple[int, int]) -> Segmenter:
    """The segmenter of ``cfg``, checked against ``class_map`` at ``resolution`` (width, height)."""
    segmenter = Segmenter(cfg, class_map, device)
    segmenter.check_outputs(resolution)
    return segmenter
