"""Evaluate one generator on the validation split: every metric of ``eval.metrics`` in one pass.

The pieces that cost something to build (the Inception network, the segmenter, the results on the
real images) live in an :class:`Evaluator` built once per process; the watcher then calls
:meth:`Evaluator.evaluate_checkpoint` for each new checkpoint. One pass over the images serves every
metric: each batch is generated once, then goes through the Inception network (fid, kid) and the
segmenter (miou, pixel_accuracy, against the label maps it was generated from).

With several processes (``torch.distributed`` initialised), every rank generates and scores its own
part of the validation split (the eval loader gives each sample to exactly one rank, the first
``eval.num_images`` samples on any number of ranks); sample keys and features are all-gathered and
the int64 confusion matrices summed, so the result equals the single-process one. Features are put
in a canonical order, sorted by ``<key>.png`` (how torch-fidelity orders a folder of those files),
before any metric: KID's random subsets then pick the same images whatever the number of ranks, and
KID equals torch-fidelity's on a folder of the same images.

Images are scored at the dataset's evaluation resolution (crop size x aspect ratio): the generator
output is converted to uint8 exactly as the official code saves images (``visualize.to_uint8_image``,
``(x + 1) / 2 * 255`` truncated), and the extractor resizes to 299 as ``eval.fid_protocol`` says
(torch-fidelity's TF1-style resize, or pytorch-fid's PyTorch bilinear one).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from spade_dist.config import SEGMENTATION_METRICS, Config
from spade_dist.eval.class_map import load_class_map
from spade_dist.eval.fid import (
    all_gather_features,
    collective_device,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    kid_subset_size_used,
)
from spade_dist.eval.inception import (
    build_inception,
    extract_features,
    resolve_inception_weights,
    weights_identity,
)
from spade_dist.eval.protocol import build_protocol, protocol_hashes
from spade_dist.eval.reference_stats import (
    RealSegmentation,
    ReferenceStats,
    dataset_fingerprint,
    evaluation_resolution,
    load_real_segmentation,
    load_reference,
    preprocessing_key,
    reference_cache_name,
    resolve_cache_dir,
    save_real_segmentation,
    save_reference,
    segmentation_cache_name,
)
from spade_dist.eval.segmentation import (
    SegmentationScores,
    all_reduce_confusion,
    confusion_matrix,
    segmentation_scores,
    target_classes,
)
from spade_dist.eval.segmenter import Segmenter, load_segmenter
from spade_dist.generation import load_model
from spade_dist.labels import encode_semantics
from spade_dist.progress import progress_bar
from spade_dist.visualize import to_uint8_image

Batch = dict
BatchesFactory = Callable[[], Iterable[Batch]]
INCEPTION_METRICS = ("fid", "kid")


class CheckpointUnavailable(RuntimeError):
    """The checkpoint vanished (pruned) or cannot be read (corrupt): the watcher skips and records it."""


class NonFiniteGeneration(CheckpointUnavailable):
    """The generator produced NaN/inf (a diverged run): no meaningful score; recorded as skipped."""


@dataclass
class EvalResult:
    """The scores of one generator; only the metrics of ``eval.metrics`` are set."""

    metrics: list[str]
    protocol: dict
    protocol_hash: dict[str, str]
    seconds: float
    fid: Optional[float] = None
    kid_mean: Optional[float] = None
    kid_std: Optional[float] = None
    segmentation: Optional[SegmentationScores] = None  # generated images
    real_segmentation: Optional[SegmentationScores] = None  # the real images (the paper's "real" row)
    extra: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.protocol["images"]["num_images"])

    def _segmentation_record(self, scores: SegmentationScores) -> dict:
        out = {m: getattr(scores, m) for m in SEGMENTATION_METRICS if m in self.metrics}
        if "miou" in self.metrics:
            out["class_iou"] = scores.class_iou
        return out

    def to_record(self) -> dict:
        """The ``metrics.jsonl`` fields (docs/EVALUATION.md): scores, protocol, hashes, seconds, extras."""
        out: dict[str, Any] = {}
        if "fid" in self.metrics:
            out["fid"] = self.fid
        if "kid" in self.metrics:
            out.update(kid_mean=self.kid_mean, kid_std=self.kid_std)
        if self.segmentation is not None and self.real_segmentation is not None:
            out.update(self._segmentation_record(self.segmentation))
            out["real"] = self._segmentation_record(self.real_segmentation)
        return {**out, "protocol": self.protocol, "protocol_hash": self.protocol_hash,
                "seconds": round(self.seconds, 3), **self.extra}


@dataclass
class ImagePass:
    """One pass over validation images: sample keys, Inception features (fid / kid) and the
    segmenter's confusion matrix (miou / pixel_accuracy) - this rank's share, or everyone's gathered."""

    keys: list[str]
    features: Optional[torch.Tensor]
    confusion: Optional[torch.Tensor]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_batches_factory(cfg: Config, rank: int, world_size: int) -> BatchesFactory:
    """The eval loader over the first ``eval.num_images`` samples of ``data.val_split`` (each once
    across ranks), ``eval.batch_size`` images per batch: one generator forward, one Inception forward
    and one segmenter forward per batch."""
    def make() -> Iterable[Batch]:
        from spade_dist.data import build_eval_loader  # local: the data stack is heavy to import

        return build_eval_loader(cfg.data, split=cfg.data.val_split, rank=rank, world_size=world_size,
                                 batch_size=cfg.eval.batch_size, max_samples=cfg.eval.num_images)
    return make


def canonical_order(keys: list[str]) -> list[int]:
    """Indices that sort samples by ``<key>.png``: the order torch-fidelity reads a folder of them."""
    return sorted(range(len(keys)), key=lambda i: f"{keys[i]}.png")


def _check_resolution(images: torch.Tensor, expected: tuple[int, int], what: str) -> None:
    height, width = images.shape[-2:]
    if (width, height) != tuple(expected):
        raise ValueError(f"{what} are {width}x{height} but the evaluation resolution is "
                         f"{expected[0]}x{expected[1]} (data.crop_size / data.aspect_ratio)")


@torch.no_grad()
def score_images(batches: Iterable[Batch], images_of: Callable[[Batch], torch.Tensor],
                 extractor: Optional[nn.Module], segmenter: Optional[Segmenter], label_nc: int, bar: Any) -> ImagePass:
    """This rank's :class:`ImagePass` over ``batches``; ``images_of(batch)`` gives each batch's uint8
    images (the real ones or generated from the batch's label maps)."""
    keys: list[str] = []
    chunks: list[torch.Tensor] = []
    confusion: Optional[torch.Tensor] = None
    lookup = segmenter.class_map.target_lookup(label_nc, segmenter.device) if segmenter is not None else None
    for batch in batches:
        images = images_of(batch)
        keys += [str(k) for k in batch["key"]]
        if extractor is not None:
            chunks.append(extract_features(extractor, images))
        if segmenter is not None:
            target = target_classes(batch["label"].to(segmenter.device), lookup)
            counts = confusion_matrix(segmenter.predict(images), target, segmenter.class_map.num_outputs)
            confusion = counts if confusion is None else confusion + counts
        bar.update(images.shape[0])
    features = (torch.cat(chunks) if chunks else torch.zeros(0, 2048)) if extractor is not None else None
    if segmenter is not None and confusion is None:  # no batch on this rank
        classes = segmenter.class_map.num_outputs
        confusion = torch.zeros((classes, classes), dtype=torch.int64, device=segmenter.device)
    return ImagePass(keys, features, confusion)


def gather_pass(local: ImagePass) -> ImagePass:
    """Every rank's pass in the canonical sample order (the local pass without a process group)."""
    keys = local.keys
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank: list[Optional[list[str]]] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, local.keys)
        keys = [k for rank_keys in per_rank for k in (rank_keys or [])]
    features = all_gather_features(local.features) if local.features is not None else None
    confusion = all_reduce_confusion(local.confusion) if local.confusion is not None else None
    order = canonical_order(keys)
    return ImagePass([keys[i] for i in order], features[order] if features is not None else None, confusion)


def _pass_description(extractor: Optional[nn.Module], segmenter: Optional[Segmenter]) -> str:
    return " + ".join(what for what, used in (("Inception features", extractor), ("segmentation", segmenter))
                      if used is not None)


def load_generator(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, Config]:
    """The EMA generator of a checkpoint step directory, or a single-file exported generator.

    Any failure to read it (gone, truncated, not a checkpoint) becomes :class:`CheckpointUnavailable`
    naming the path, which the watcher records as a skip.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointUnavailable(f"{path}: checkpoint does not exist (pruned?)")
    try:
        loaded = load_model(path, use_ema=True)
    except ImportError:  # a missing dependency is not a bad checkpoint
        raise
    except Exception as exc:  # noqa: BLE001 - pruned mid-read, truncated, corrupt: all the same to us
        raise CheckpointUnavailable(f"{path}: cannot load the generator: {type(exc).__name__}: {exc}") from exc
    return loaded.generator.to(device).eval(), loaded.cfg


class Evaluator:
    """Inception, segmenter and the real images' results, built once; scores generators against them.

    ``batches_factory`` yields this rank's validation batches (the FORMATS.md batch dict, ``key`` and
    ``label`` included): by default the project's eval loader (spade_dist.data) over the first
    ``eval.num_images`` samples. All ranks of an initialised process group must build the Evaluator
    and call :meth:`evaluate` together.
    """

    def __init__(self, cfg: Config, device: Union[str, torch.device] = "cpu",
                 batches_factory: Optional[BatchesFactory] = None, cache_dir: Optional[Union[str, Path]] = None,
                 log: Callable[[str], None] = print, progress: bool = False) -> None:
        self.cfg = cfg
        self.metrics = list(cfg.eval.metrics)
        self.device = torch.device(device)
        self.rank, self.world_size = _rank_world()
        self.progress = progress and self.rank == 0  # bars of rank 0's share (see spade_dist.progress)
        self.batches_factory = batches_factory or default_batches_factory(cfg, self.rank, self.world_size)
        self.log = log
        self.resolution = evaluation_resolution(cfg.data)
        uses_inception = any(m in INCEPTION_METRICS for m in self.metrics)
        # Inputs first, cheap checks first: a missing file or a class map that does not fit must fail
        # before anything slow happens (and before any image is generated).
        self.weights_path = resolve_inception_weights(cfg.eval.inception_weights, cfg.eval.allow_download) \
            if uses_inception else None
        self.segmenter: Optional[Segmenter] = None
        if any(m in SEGMENTATION_METRICS for m in self.metrics):
            class_map = load_class_map(cfg.eval.segmenter.class_map, cfg.data)
            self.segmenter = load_segmenter(cfg.eval.segmenter, class_map, self.device, self.resolution)
        self.extractor = build_inception(self.weights_path, self.device, cfg.eval.fid_protocol) if uses_inception else None
        self.weights_sha256 = weights_identity(self.weights_path) if uses_inception else None
        self.cache_dir = resolve_cache_dir(str(cache_dir) if cache_dir is not None else cfg.eval.reference_cache_dir)
        self.data_sha256 = dataset_fingerprint(cfg.data, cfg.data.val_split)
        self.reference, self.real_segmentation = self._real_images()
        self.num_images = int(self.reference.features.shape[0]) if self.reference is not None \
            else int(self.real_segmentation.meta["num_images"])  # type: ignore[union-attr]
        self.protocol = build_protocol(
            cfg, num_images=self.num_images, resolution=self.resolution, data_sha256=self.data_sha256,
            inception_sha256=self.weights_sha256,
            kid_subset_size=kid_subset_size_used(cfg.eval.kid_subset_size, self.num_images, self.num_images),
            segmentation=self.segmenter.protocol() if self.segmenter is not None else None)
        self.protocol_hash = protocol_hashes(self.protocol, self.metrics)

    # ---------------------------------------------------------------- the real images, cached

    def _cache_names(self) -> tuple[str, str]:
        data, split = self.cfg.data, self.cfg.data.val_split
        common = (data.dataset, split, self.data_sha256, self.resolution, preprocessing_key(data), self.cfg.eval.num_images)
        inception = reference_cache_name(*common, self.weights_sha256 or "", self.cfg.eval.fid_protocol)
        segmentation = segmentation_cache_name(*common, self.segmenter.protocol() if self.segmenter else {})
        return inception, segmentation

    @property
    def reference_cache_path(self) -> Path:
        """The real images' Inception features (fid / kid)."""
        return self.cache_dir / self._cache_names()[0]

    @property
    def segmentation_cache_path(self) -> Path:
        """The segmenter's confusion matrix on the real images (miou / pixel_accuracy)."""
        return self.cache_dir / self._cache_names()[1]

    def _real_images(self) -> tuple[Optional[ReferenceStats], Optional[RealSegmentation]]:
        """The real images' features and confusion matrix: from the cache, else one pass computing
        what is missing (written to the cache by rank 0)."""
        feature_path, seg_path = self.reference_cache_path, self.segmentation_cache_path
        wanted = [self.extractor is not None, self.segmenter is not None]
        # Rank 0 decides hit or miss for everyone: ranks must agree on whether to run the collectives.
        hits = torch.tensor([int(w and p.is_file()) if self.rank == 0 else 0 for w, p in
                             zip(wanted, (feature_path, seg_path))], device=collective_device())
        if self.world_size > 1:
            dist.broadcast(hits, src=0)
        feature_hit, seg_hit = (bool(v) for v in hits.tolist())
        reference = load_reference(feature_path) if feature_hit else None
        real_seg = load_real_segmentation(seg_path) if seg_hit else None
        for hit, path in ((feature_hit, feature_path), (seg_hit, seg_path)):
            if hit:
                self.log(f"[eval] real images from cache {path}")
        extractor = self.extractor if wanted[0] and not feature_hit else None
        segmenter = self.segmenter if wanted[1] and not seg_hit else None
        if extractor is None and segmenter is None:
            return reference, real_seg

        start = time.time()

        def images_of(batch: Batch) -> torch.Tensor:
            _check_resolution(batch["image"], self.resolution, "validation images")
            return batch["image"]

        with progress_bar(total=self.cfg.eval.num_images or None, unit="img", enabled=self.progress,
                          desc=f"real images: {_pass_description(extractor, segmenter)}") as bar:
            real = gather_pass(score_images(self.batches_factory(), images_of, extractor, segmenter,
                                            self.cfg.data.label_nc, bar))
        if len(real.keys) < 2:
            raise ValueError(f"validation split '{self.cfg.data.val_split}' of {self.cfg.data.val_shards} gave "
                             f"{len(real.keys)} images; the metrics need at least 2")
        meta = {"dataset": self.cfg.data.dataset, "split": self.cfg.data.val_split, "resolution": list(self.resolution),
                "image_resample": self.cfg.data.image_resample, "num_images": len(real.keys),
                "seconds": round(time.time() - start, 3)}
        if extractor is not None:
            assert real.features is not None
            reference = ReferenceStats(features=real.features, stats=feature_statistics(real.features), keys=real.keys,
                                       meta={**meta, "weights_sha256": self.weights_sha256,
                                             "fid_protocol": self.cfg.eval.fid_protocol})
            if self.rank == 0:
                save_reference(feature_path, reference)
                self.log(f"[eval] Inception features of {len(real.keys)} real images written to {feature_path}")
        if segmenter is not None:
            assert real.confusion is not None
            real_seg = RealSegmentation(confusion=real.confusion.cpu(), meta={**meta, "segmenter": segmenter.protocol()})
            if self.rank == 0:
                save_real_segmentation(seg_path, real_seg)
                self.log(f"[eval] segmentation of {len(real.keys)} real images written to {seg_path}")
        return reference, real_seg

    # ---------------------------------------------------------------- scoring generators

    def _generated_pass(self, generator: nn.Module) -> ImagePass:
        """This rank's pass over images generated from its validation label maps.

        The RNG is forked and seeded (per rank), so a VAE generator's random style codes are the same
        every time a checkpoint is scored: differences between steps come from the weights only.
        """
        data = self.cfg.data
        device = self.device

        def images_of(batch: Batch) -> torch.Tensor:
            instance = batch.get("instance")
            semantics = encode_semantics(batch["label"].to(device), instance.to(device) if instance is not None else None,
                                         data.label_layout)
            output = generator(semantics)
            if not torch.isfinite(output).all():
                # uint8 conversion would silently turn NaN into 0 and give a (meaningless) score.
                raise NonFiniteGeneration("the generator output NaN/inf (diverged weights?)")
            images = to_uint8_image(output)
            _check_resolution(images, self.resolution, "generated images")
            return images

        devices = [device] if device.type == "cuda" else []
        bar = progress_bar(total=self.cfg.eval.num_images or None, unit="img", enabled=self.progress,
                           desc=f"generated images: {_pass_description(self.extractor, self.segmenter)}")
        with torch.random.fork_rng(devices=devices), bar:
            torch.manual_seed(self.cfg.train.seed + self.rank)
            return score_images(self.batches_factory(), images_of, self.extractor, self.segmenter, data.label_nc, bar)

    def evaluate(self, generator: nn.Module, extra: Optional[dict] = None) -> EvalResult:
        """Every metric of ``eval.metrics`` for ``generator`` (already on this evaluator's device, in eval mode)."""
        start = time.time()
        where = (extra or {}).get("checkpoint", "generator")
        error: Optional[NonFiniteGeneration] = None
        try:
            local = self._generated_pass(generator)
        except NonFiniteGeneration as exc:
            error, local = exc, ImagePass([], None, None)
        if self.world_size > 1:
            # All ranks give up together; otherwise the healthy ones would wait in the gather forever.
            failed = torch.tensor([int(error is not None)], device=collective_device())
            dist.all_reduce(failed)
            if failed.item() and error is None:
                error = NonFiniteGeneration("another rank's generator output NaN/inf")
        if error is not None:
            raise NonFiniteGeneration(f"{where}: {error}") from error
        fake = gather_pass(local)
        if len(fake.keys) != self.num_images:
            raise ValueError(f"{len(fake.keys)} generated images but {self.num_images} real ones: the validation "
                             "data changed since the evaluator started")
        result = EvalResult(metrics=self.metrics, protocol=self.protocol, protocol_hash=self.protocol_hash, seconds=0.0,
                            extra=dict(extra or {}))
        if self.reference is not None:
            assert fake.features is not None
            if fake.keys != self.reference.keys:
                raise ValueError("the generated images are not those of the cached real-image features "
                                 f"({self.reference_cache_path}): delete it to recompute")
            result.fid = frechet_distance(feature_statistics(fake.features), self.reference.stats)
            result.kid_mean, result.kid_std = kernel_inception_distance(fake.features, self.reference.features,
                                                                        self.cfg.eval.kid_subset_size)
        if self.segmenter is not None and self.real_segmentation is not None:
            assert fake.confusion is not None
            result.segmentation = segmentation_scores(fake.confusion, self.segmenter.class_map)
            result.real_segmentation = segmentation_scores(self.real_segmentation.confusion, self.segmenter.class_map)
        result.seconds = time.time() - start
        return result

    def load_checkpoint(self, checkpoint: Union[str, Path]) -> tuple[nn.Module, Config]:
        """The EMA generator of ``checkpoint`` (and its config) on this evaluator's device.

        Raises :class:`CheckpointUnavailable` on every rank when any rank cannot read it.
        """
        error: Optional[CheckpointUnavailable] = None
        loaded: Optional[tuple[nn.Module, Config]] = None
        try:
            loaded = load_generator(checkpoint, self.device)
        except CheckpointUnavailable as exc:
            error = exc
        if self.world_size > 1:
            # Every rank must skip together, or the others would wait in the feature all_gather forever.
            failed = torch.tensor([int(error is not None)], device=collective_device())
            dist.all_reduce(failed)
            if failed.item() and error is None:
                error = CheckpointUnavailable(f"{checkpoint}: another rank could not load it")
        if error is not None:
            raise error
        assert loaded is not None
        return loaded

    def evaluate_checkpoint(self, checkpoint: Union[str, Path]) -> EvalResult:
        """Load the EMA generator of ``checkpoint`` and score it; :class:`CheckpointUnavailable` if it can't be read."""
        generator, _ = self.load_checkpoint(checkpoint)
        return self.evaluate(generator, extra={"checkpoint": str(checkpoint)})
