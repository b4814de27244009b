"""Label maps -> generator input ("input_semantics"), on whatever device the labels live on.

The channel order is the official NVlabs/SPADE one (``Pix2PixModel.preprocess_input``), because
released checkpoints were trained with it and the first convolution of every SPADE layer depends on
it (see docs/FORMATS.md, "Label convention"):

1. one-hot over ``label_nc`` classes (ids ``0 .. label_nc-1``);
2. one extra channel for the "don't care" id 255 when ``contain_dontcare_label`` (the official
   dataset rewrites 255 to ``label_nc`` before the scatter, so it lands in channel ``label_nc``);
3. the instance-edge channel, last, when ``no_instance`` is false.

Everything is vectorised (``scatter_`` and shifted comparisons): the train step calls this on the GPU
for every batch, and a Python loop over classes or pixels would dominate small steps.
"""
from __future__ import annotations

from typing import Optional

import torch

from spade_dist.label_layout import LabelLayout

DONTCARE_ID = 255
# How many offending ids an error message lists before it abbreviates.
_MAX_IDS_IN_MESSAGE = 20


class LabelError(ValueError):
    """A label or instance map cannot be encoded (bad id, shape or dtype). The message says which."""


def _as_integer_map(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Check an N x 1 x H x W map and return it as int64 (floats must hold whole numbers)."""
    if not isinstance(tensor, torch.Tensor):
        raise LabelError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dim() != 4 or tensor.size(1) != 1:
        raise LabelError(f"{name}: expected shape N x 1 x H x W, got {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise LabelError(f"{name}: expected an integer tensor, got dtype {tensor.dtype}")
    if tensor.is_floating_point():
        # Loaders sometimes hand over float maps (ToTensor()*255); accept them only when exact.
        if not torch.equal(tensor, tensor.round()):
            raise LabelError(f"{name}: float map holds non-integer values; ids must be whole numbers")
    return tensor.long()


def _format_ids(ids: torch.Tensor) -> str:
    values = ids.tolist()
    text = ", ".join(str(v) for v in values[:_MAX_IDS_IN_MESSAGE])
    if len(values) > _MAX_IDS_IN_MESSAGE:
        text += f", ... ({len(values)} distinct ids)"
    return text


def check_label_ids(label: torch.Tensor, label_nc: int, contain_dontcare_label: bool) -> None:
    """Raise :class:`LabelError` naming every id that is neither a class nor an allowed 255.

    This costs one device->host sync (``any()``); the offending ids are gathered only on failure.
    """
    label = _as_integer_map("label", label)
    invalid = (label < 0) | (label >= label_nc)
    if contain_dontcare_label:
        invalid &= label != DONTCARE_ID
    if bool(invalid.any()):
        bad = torch.unique(label[invalid]).cpu()
        hint = ""
        if not contain_dontcare_label and bool((bad == DONTCARE_ID).any()):
            hint = " (255 is the don't-care id, allowed only with contain_dontcare_label=true)"
        allowed = f"0..{label_nc - 1}" + (" and 255 (don't care)" if contain_dontcare_label else "")
        raise LabelError(
            f"label ids out of range for label_nc={label_nc} (allowed: {allowed}): {_format_ids(bad)}{hint}"
        )


def instance_edges(instance: torch.Tensor) -> torch.Tensor:
    """Float N x 1 x H x W map: 1 where a 4-neighbour has a different instance id, else 0.

    Matches the official ``get_edges``: a difference between horizontally (or vertically) adjacent
    pixels marks *both* pixels of the pair; image borders are not edges by themselves.
    """
    inst = _as_integer_map("instance", instance)
    edge = torch.zeros_like(inst, dtype=torch.bool)
    horizontal = inst[:, :, :, 1:] != inst[:, :, :, :-1]
    edge[:, :, :, 1:] |= horizontal
    edge[:, :, :, :-1] |= horizontal
    vertical = inst[:, :, 1:, :] != inst[:, :, :-1, :]
    edge[:, :, 1:, :] |= vertical
    edge[:, :, :-1, :] |= vertical
    return edge.float()


def encode_semantics(
    label: torch.Tensor,
    instance: Optional[torch.Tensor],
    layout: LabelLayout,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Integer label map (+ instance map) -> N x ``layout.semantic_nc`` x H x W one-hot input, on label's device.

    ``label`` holds ids ``0 .. label_nc-1`` and, with ``contain_dontcare_label``, 255. ``instance``
    is required unless ``no_instance``; it is ignored when ``no_instance`` is true.
    Raises :class:`LabelError` naming the bad ids, or a shape / dtype problem.
    """
    label = _as_integer_map("label", label)
    check_label_ids(label, layout.label_nc, layout.contain_dontcare_label)
    if layout.contain_dontcare_label:
        label = torch.where(label == DONTCARE_ID, torch.full_like(label, layout.label_nc), label)

    n, _, h, w = label.shape
    one_hot = torch.zeros(n, layout.onehot_channels, h, w, dtype=dtype, device=label.device)
    one_hot.scatter_(1, label, 1.0)
    if layout.no_instance:
        return one_hot

    if instance is None:
        raise LabelError("instance map is required when no_instance is false (the edge channel needs it)")
    if tuple(instance.shape) != tuple(label.shape):
        raise LabelError(
            f"instance map shape {tuple(instance.shape)} differs from label map shape {tuple(label.shape)}"
        )
    edges = instance_edges(instance.to(label.device)).to(dtype)
    return torch.cat([one_hot, edges], dim=1)
