"""FID and KID from Inception features.

We extract features ourselves (see ``inception.py``) instead of calling ``torch_fidelity.calculate_metrics``
so that generation and extraction can be split across ranks and the features all-gathered. The
metric math itself is torch-fidelity's (``fid_statistics_to_metric``, ``kid_features_to_metric``), so
our numbers are the ones every torch-fidelity user reports; the tests check them against an
independent scipy computation.

Statistics are float64 numpy (mean vector + covariance): FID subtracts traces of 2048x2048 matrices,
and float32 loses digits there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

# torch-fidelity's defaults (defaults.py): 100 subsets, polynomial kernel of degree 3, seed 2020.
KID_SUBSETS = 100
KID_RNG_SEED = 2020


@dataclass
class FeatureStatistics:
    """Mean and covariance of a feature set (what FID compares), plus how many samples made them."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_samples: int


def feature_statistics(features: torch.Tensor) -> FeatureStatistics:
    """Mean and (unbiased, like np.cov) covariance of ``features`` (N x D), in float64."""
    if not torch.is_tensor(features) or features.dim() != 2:
        raise ValueError(f"features must be an N x D tensor, got {type(features).__name__} "
                         f"{tuple(features.shape) if torch.is_tensor(features) else ''}")
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {features.shape[0]}")
    feats = features.detach().cpu().to(torch.float64).numpy()
    return FeatureStatistics(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), num_samples=feats.shape[0])


def frechet_distance(stats_a: FeatureStatistics, stats_b: FeatureStatistics) -> float:
    """FID between two Gaussians, via torch-fidelity's formula (eigenvalues of sigma_a @ sigma_b)."""
    if stats_a.mu.shape != stats_b.mu.shape:
        raise ValueError(f"feature dimensions differ: {stats_a.mu.shape} vs {stats_b.mu.shape}")
    out = fid_statistics_to_metric(
        {"mu": stats_a.mu.astype(np.float64), "sigma": stats_a.sigma.astype(np.float64)},
        {"mu": stats_b.mu.astype(np.float64), "sigma": stats_b.sigma.astype(np.float64)},
        verbose=False,
    )
    return float(out[KEY_METRIC_FID])


def kernel_inception_distance(
    features_a: torch.Tensor, features_b: torch.Tensor, subset_size: int, subsets: int = KID_SUBSETS,
    seed: int = KID_RNG_SEED,
) -> tuple[float, float]:
    """KID (mean, std over random subsets) with torch-fidelity's polynomial-kernel unbiased MMD.

    ``subset_size`` is clipped to the smaller set: a small validation split (or a test) must still
    give a number, and the clipped size is what gets recorded next to it.
    """
    size = min(int(subset_size), features_a.shape[0], features_b.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {features_a.shape[0]} and {features_b.shape[0]}")
    out = kid_features_to_metric(
        features_a.detach().cpu().to(torch.float64), features_b.detach().cpu().to(torch.float64),
        kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly", kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def kid_subset_size_used(subset_size: int, num_a: int, num_b: int) -> int:
    """The subset size :func:`kernel_inception_distance` actually uses (recorded with the result)."""
    return min(int(subset_size), num_a, num_b)


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_features(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's N_r x D features in rank order (ranks may hold different N_r).

    Without an initialised process group this returns ``local``. gloo's all_gather needs equal shapes,
    so rows are padded to the largest N_r and trimmed after.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    world = dist.get_world_size()
    result_device = local.device
    device = collective_device()
    local = local.to(device)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), local.shape[1]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0).to(result_device)
