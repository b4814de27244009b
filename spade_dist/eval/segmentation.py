"""Semantic fidelity: mIoU and pixel accuracy from a confusion matrix of segmenter predictions.

The hot part is :func:`confusion_matrix` (one ``bincount`` per batch, on the evaluation device); the
matrix is int64 and exact, so summing it over batches and ranks (:func:`all_reduce_confusion`) gives
the single-process matrix bit for bit. The scores follow the segmentation benchmarks' convention
(FCN / DeepLab / DRN ``fast_hist`` + ``per_class_iu`` + ``nanmean``):

- rows are ground-truth classes, columns predicted classes, both in the segmenter's output classes
  (the class map turns label ids into them; ignored pixels never enter the matrix);
- IoU of a class = TP / (TP + FP + FN); a class with an empty union (never in the ground truth,
  never predicted) has no IoU and is left out of the mean; a class predicted but absent from the
  ground truth has IoU 0;
- mIoU = mean IoU over the scored classes that have one; pixel accuracy = correct / counted pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from spade_dist.eval.class_map import IGNORED, ClassMap
from spade_dist.eval.fid import collective_device


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``num_classes x num_classes`` counts of (target class, predicted class) pixel pairs.

    ``pred`` holds classes ``0..num_classes-1``; ``target`` the same or :data:`IGNORED` (not counted).
    Both any shape, equal; the result lives on their device.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != IGNORED
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def target_classes(label: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Label ids (N x 1 x H x W, int64) -> the output class each is scored as, or :data:`IGNORED`
    (``lookup``: :meth:`ClassMap.target_lookup`)."""
    return lookup[label.squeeze(1)]


def all_reduce_confusion(local: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's matrix (exact: int64); ``local`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    total = local.to(collective_device())
    dist.all_reduce(total)
    return total.to(local.device)


@dataclass(frozen=True)
class SegmentationScores:
    miou: float
    pixel_accuracy: float
    class_iou: dict[str, Optional[float]]  # per scored class name; None: empty union
    pixels: int  # counted pixels

    def to_record(self) -> dict:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "class_iou": self.class_iou}


def segmentation_scores(confusion: torch.Tensor, class_map: ClassMap) -> SegmentationScores:
    """mIoU, pixel accuracy and per-class IoU of ``confusion`` (see the module doc), in float64."""
    counts = confusion.detach().cpu().to(torch.int64)
    pixels = int(counts.sum())
    if pixels == 0:
        raise ValueError("no pixel was scored: every ground-truth label is ignored by the class map "
                         f"{class_map.source} (eval.segmenter.class_map)")
    true_positive = counts.diagonal()
    union = counts.sum(dim=1) + counts.sum(dim=0) - true_positive
    class_iou: dict[str, Optional[float]] = {}
    for k in class_map.scored:
        u = int(union[k])
        class_iou[class_map.names[k]] = int(true_positive[k]) / u if u > 0 else None
    present = [iou for iou in class_iou.values() if iou is not None]
    miou = math.fsum(present) / len(present)
    return SegmentationScores(miou=miou, pixel_accuracy=int(true_positive.sum()) / pixels, class_iou=class_iou,
                              pixels=pixels)
