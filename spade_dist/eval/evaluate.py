"""Evaluate one generator on the validation split: generate, extract Inception features, FID + KID.

The pieces that cost something to build (the Inception network, the real-image reference) live in an
:class:`Evaluator` built once per process; the watcher then calls :meth:`Evaluator.evaluate_checkpoint`
for each new checkpoint. With several processes (``torch.distributed`` initialised), every rank
generates and extracts its own part of the validation split (the eval loader gives each sample to
exactly one rank) and the features are all-gathered before the metric, so the result equals the
single-process one.

Images are scored at the dataset's evaluation resolution (crop size x aspect ratio): the generator
output is converted to uint8 exactly as the official code saves images (``visualize.to_uint8_image``,
``(x + 1) / 2 * 255`` truncated), and the extractor resizes to 299 as ``eval.fid_protocol`` says (torch-fidelity's TF1-style
resize, or pytorch-fid's PyTorch bilinear one).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from spade_dist.config import Config
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
from spade_dist.eval.reference_stats import (
    ReferenceStats,
    dataset_fingerprint,
    evaluation_resolution,
    load_reference,
    preprocessing_key,
    reference_cache_name,
    resolve_cache_dir,
    save_reference,
)
from spade_dist.generation import load_model
from spade_dist.labels import encode_semantics
from spade_dist.progress import progress_bar
from spade_dist.visualize import to_uint8_image

Batch = dict
BatchesFactory = Callable[[], Iterable[Batch]]


class CheckpointUnavailable(RuntimeError):
    """The checkpoint vanished (pruned) or cannot be read (corrupt): the watcher skips and records it."""


class NonFiniteGeneration(CheckpointUnavailable):
    """The generator produced NaN/inf (a diverged run): no meaningful score; recorded as skipped."""


@dataclass
class EvalResult:
    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    num_images: int
    resolution: list[int]  # [width, height]
    weights_sha256: str
    seconds: float
    extra: dict = field(default_factory=dict)
    fid_protocol: str = "torch-fidelity"

    def to_record(self) -> dict:
        return {"fid": self.fid, "kid_mean": self.kid_mean, "kid_std": self.kid_std,
                "kid_subset_size": self.kid_subset_size, "num_images": self.num_images,
                "resolution": self.resolution, "weights_sha256": self.weights_sha256,
                "fid_protocol": self.fid_protocol, "seconds": round(self.seconds, 3), **self.extra}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_batches_factory(cfg: Config, rank: int, world_size: int) -> BatchesFactory:
    """The eval loader over ``data.val_split`` (each sample once across ranks), ``eval.batch_size``
    images per batch: one batch is one generator forward and one Inception forward."""
    def make() -> Iterable[Batch]:
        from spade_dist.data import build_eval_loader  # local: the data stack is heavy to import

        return build_eval_loader(cfg.data, split=cfg.data.val_split, rank=rank, world_size=world_size,
                                 batch_size=cfg.eval.batch_size)
    return make


def _limit_per_rank(num_images: int, world_size: int) -> int:
    return math.ceil(num_images / world_size) if num_images > 0 else 0


def _check_resolution(images: torch.Tensor, expected: tuple[int, int], what: str) -> None:
    height, width = images.shape[-2:]
    if (width, height) != tuple(expected):
        raise ValueError(f"{what} are {width}x{height} but the evaluation resolution is "
                         f"{expected[0]}x{expected[1]} (data.crop_size / data.aspect_ratio)")


def _collect_features(batches: Iterable[Batch], images_of: Callable[[Batch, Optional[int]], torch.Tensor],
                      extractor: nn.Module, limit: int, bar: Any) -> torch.Tensor:
    """Inception features of ``images_of(batch, keep)`` (uint8 images of the batch's first ``keep``
    samples, all when None) over the batches, at most ``limit`` (> 0) images."""
    chunks: list[torch.Tensor] = []
    seen = 0
    for batch in batches:
        images = images_of(batch, limit - seen if limit else None)
        chunks.append(extract_features(extractor, images))
        seen += images.shape[0]
        bar.update(images.shape[0])
        if limit and seen >= limit:
            break
    return torch.cat(chunks) if chunks else torch.zeros(0, 2048)


@torch.no_grad()
def real_features(batches: Iterable[Batch], extractor: nn.Module, resolution: tuple[int, int],
                  limit: int = 0, progress: bool = False) -> torch.Tensor:
    """Features of this rank's real validation images (``limit`` > 0: at most that many)."""
    def images_of(batch: Batch, keep: Optional[int]) -> torch.Tensor:
        _check_resolution(batch["image"], resolution, "validation images")
        return batch["image"][:keep]

    with progress_bar(total=limit or None, desc="reference statistics: real images", unit="img",
                      enabled=progress) as bar:
        return _collect_features(batches, images_of, extractor, limit, bar)


@torch.no_grad()
def generated_features(generator: nn.Module, batches: Iterable[Batch], extractor: nn.Module, cfg: Config,
                       device: Union[str, torch.device], resolution: tuple[int, int], limit: int = 0,
                       seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Generate from this rank's validation labels and return the fakes' Inception features.

    The RNG is forked and seeded (per rank), so a VAE generator's random style codes are the same
    every time a checkpoint is scored: FID differences between steps come from the weights only.
    """
    rank, _ = _rank_world()
    data = cfg.data

    def images_of(batch: Batch, keep: Optional[int]) -> torch.Tensor:
        label, instance = batch["label"][:keep], batch.get("instance")
        semantics = encode_semantics(
            label.to(device), instance[:keep].to(device) if instance is not None else None, data.label_layout,
        )
        output = generator(semantics)
        if not torch.isfinite(output).all():
            # uint8 conversion would silently turn NaN into 0 and give a (meaningless) score.
            raise NonFiniteGeneration("the generator output NaN/inf (diverged weights?)")
        images = to_uint8_image(output)
        _check_resolution(images, resolution, "generated images")
        return images

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    bar = progress_bar(total=limit or None, desc="generated images + Inception features", unit="img", enabled=progress)
    with torch.random.fork_rng(devices=devices), bar:
        torch.manual_seed(seed + rank)
        return _collect_features(batches, images_of, extractor, limit, bar)


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
    """Inception + cached real statistics, built once; scores generators against them.

    ``batches_factory`` yields this rank's validation batches (the FORMATS.md batch dict); by
    default the project's eval loader (spade_dist.data). All ranks of an initialised process group must build
    the Evaluator and call :meth:`evaluate` together.
    """

    def __init__(self, cfg: Config, device: Union[str, torch.device] = "cpu",
                 batches_factory: Optional[BatchesFactory] = None, cache_dir: Optional[Union[str, Path]] = None,
                 log: Callable[[str], None] = print, progress: bool = False) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank, self.world_size = _rank_world()
        self.progress = progress and self.rank == 0  # bars of rank 0's share (see spade_dist.progress)
        self.batches_factory = batches_factory or default_batches_factory(cfg, self.rank, self.world_size)
        self.log = log
        # Weights first: a missing file must fail before anything slow happens.
        self.weights_path = resolve_inception_weights(cfg.eval.inception_weights, cfg.eval.allow_download)
        self.extractor = build_inception(self.weights_path, self.device, cfg.eval.fid_protocol)
        self.weights_sha256 = weights_identity(self.weights_path)
        self.resolution = evaluation_resolution(cfg.data)
        self.cache_dir = resolve_cache_dir(str(cache_dir) if cache_dir is not None else cfg.eval.reference_cache_dir)
        self.reference = self._reference()

    @property
    def reference_cache_path(self) -> Path:
        split = self.cfg.data.val_split
        name = reference_cache_name(
            self.cfg.data.dataset, split, dataset_fingerprint(self.cfg.data, split), self.resolution,
            preprocessing_key(self.cfg.data), self.cfg.eval.num_images, self.weights_sha256, self.cfg.eval.fid_protocol,
        )
        return self.cache_dir / name

    def _reference(self) -> ReferenceStats:
        path = self.reference_cache_path
        # Rank 0 decides hit or miss for everyone: ranks must agree on whether to run the collective.
        flag = torch.tensor([int(path.is_file()) if self.rank == 0 else 0], device=collective_device())
        if self.world_size > 1:
            dist.broadcast(flag, src=0)
        if flag.item():
            self.log(f"[eval] reference statistics from cache {path}")
            return load_reference(path)
        start = time.time()
        local = real_features(self.batches_factory(), self.extractor, self.resolution,
                              _limit_per_rank(self.cfg.eval.num_images, self.world_size), progress=self.progress)
        features = all_gather_features(local)
        if self.cfg.eval.num_images:
            features = features[: self.cfg.eval.num_images]
        if features.shape[0] < 2:
            raise ValueError(f"validation split '{self.cfg.data.val_split}' of {self.cfg.data.val_shards} gave "
                             f"{features.shape[0]} images; FID needs at least 2")
        ref = ReferenceStats(features=features, stats=feature_statistics(features), meta={
            "dataset": self.cfg.data.dataset, "split": self.cfg.data.val_split,
            "resolution": list(self.resolution), "weights_sha256": self.weights_sha256,
            "fid_protocol": self.cfg.eval.fid_protocol, "image_resample": self.cfg.data.image_resample,
            "num_images": int(features.shape[0]), "seconds": round(time.time() - start, 3),
        })
        if self.rank == 0:
            save_reference(path, ref)
            self.log(f"[eval] reference statistics of {features.shape[0]} real images written to {path}")
        return ref

    def evaluate(self, generator: nn.Module, extra: Optional[dict] = None) -> EvalResult:
        """FID / KID of ``generator`` (already on this evaluator's device, in eval mode)."""
        start = time.time()
        where = (extra or {}).get("checkpoint", "generator")
        error: Optional[NonFiniteGeneration] = None
        try:
            local = generated_features(generator, self.batches_factory(), self.extractor, self.cfg, self.device,
                                       self.resolution, _limit_per_rank(self.cfg.eval.num_images, self.world_size),
                                       seed=self.cfg.train.seed, progress=self.progress)
        except NonFiniteGeneration as exc:
            error, local = exc, torch.zeros(0, 2048)
        if self.world_size > 1:
            # All ranks give up together; otherwise the healthy ones would wait in the gather forever.
            failed = torch.tensor([int(error is not None)], device=collective_device())
            dist.all_reduce(failed)
            if failed.item() and error is None:
                error = NonFiniteGeneration("another rank's generator output NaN/inf")
        if error is not None:
            raise NonFiniteGeneration(f"{where}: {error}") from error
        fake = all_gather_features(local)
        if self.cfg.eval.num_images:
            fake = fake[: self.cfg.eval.num_images]
        if fake.shape[0] < 2:
            raise ValueError(f"only {fake.shape[0]} generated images; FID needs at least 2")
        fid = frechet_distance(feature_statistics(fake), self.reference.stats)
        kid_mean, kid_std = kernel_inception_distance(fake, self.reference.features, self.cfg.eval.kid_subset_size)
        return EvalResult(
            fid=fid, kid_mean=kid_mean, kid_std=kid_std,
            kid_subset_size=kid_subset_size_used(self.cfg.eval.kid_subset_size, fake.shape[0],
                                                 self.reference.features.shape[0]),
            num_images=int(fake.shape[0]), resolution=list(self.resolution), weights_sha256=self.weights_sha256,
            seconds=time.time() - start, extra=dict(extra or {}), fid_protocol=self.cfg.eval.fid_protocol,
        )

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
