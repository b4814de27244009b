"""FID / KID math and the Inception feature path.

The math is checked against an independent computation (scipy's matrix square root; a direct numpy
KID), the feature path on real COCO-Stuff photos with calibrated test Inception weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from spade_dist.config import DataConfig
from spade_dist.eval.fid import feature_statistics, frechet_distance, kernel_inception_distance
from spade_dist.eval.inception import (
    InceptionWeightsError,
    build_inception,
    extract_features,
    make_test_inception_weights,
    resolve_inception_weights,
    sha256_file,
)
from spade_dist.eval.reference_stats import (
    ReferenceStats,
    dataset_fingerprint,
    evaluation_resolution,
    load_reference,
    reference_cache_name,
    save_reference,
)


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), via scipy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def _numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3, all samples, no subsets."""
    d = x.shape[1]
    k = lambda p, q: (p @ q.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def test_fid_matches_scipy_on_same_features() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 32))
    b = rng.normal(loc=0.3, scale=1.4, size=(300, 32)) @ rng.normal(scale=0.4, size=(32, 32))
    ours = frechet_distance(feature_statistics(torch.from_numpy(a)), feature_statistics(torch.from_numpy(b)))
    reference = _scipy_fid(a, b)
    assert reference > 1.0
    assert abs(ours - reference) / reference <= 1e-6


def test_fid_identical_is_zero_and_grows_with_shift() -> None:
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(size=(200, 16)))
    stats_a = feature_statistics(a)
    assert abs(frechet_distance(stats_a, stats_a)) < 1e-8
    fids = [frechet_distance(stats_a, feature_statistics(a + shift)) for shift in (0.1, 0.5, 1.0)]
    # A pure mean shift by s in 16 dims adds exactly 16 s^2.
    np.testing.assert_allclose(fids, [16 * 0.01, 16 * 0.25, 16 * 1.0], rtol=1e-9)


def test_kid_matches_numpy_when_subset_is_whole_set() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 8))
    y = rng.normal(loc=0.5, size=(40, 8))
    # With the subset = the whole set every subset is the same permutation-invariant value: std 0.
    mean, std = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subset_size=40, subsets=5)
    assert abs(mean - _numpy_kid(x, y)) <= 1e-9 * max(1.0, abs(mean))
    assert std < 1e-12
    # Two independent samples of the same distribution: the unbiased estimate is near 0 (either sign).
    x2 = rng.normal(size=(40, 8))
    same_mean, _ = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(x2), subset_size=40, subsets=3)
    assert abs(same_mean) < mean / 5


def test_fid_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N x D"):
        feature_statistics(torch.zeros(5))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(feature_statistics(torch.randn(4, 3)), feature_statistics(torch.randn(4, 5)))


# ------------------------------------------------------------------------------------------------
# Inception features on real photos
# ------------------------------------------------------------------------------------------------


def _photos(coco_sample: Path, size: int = 32) -> torch.Tensor:
    paths = sorted((coco_sample / "train_img").glob("*.jpg")) + sorted((coco_sample / "val_img").glob("*.jpg"))
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((size, size)))).permute(2, 0, 1)
              for p in paths]
    return torch.stack(images)


@pytest.fixture(scope="module")
def test_weights(tmp_path_factory: pytest.TempPathFactory, coco_sample: Path) -> Path:
    path = tmp_path_factory.mktemp("inception") / "inception-test.pth"
    return make_test_inception_weights(path, _photos(coco_sample)[:8], seed=0)


@pytest.mark.slow
def test_inception_features_real_photos_identical_zero_shifted_larger(test_weights: Path, coco_sample: Path) -> None:
    photos = _photos(coco_sample)[8:16]
    extractor = build_inception(test_weights)
    features = extract_features(extractor, photos)
    assert features.shape == (8, 2048)
    assert torch.isfinite(features).all()
    # Calibrated weights: features vary between images (a random-init net gives ~constant ones).
    assert features.std(dim=0).mean() > 1e-3
    stats = feature_statistics(features)
    scale = float(np.trace(stats.sigma))
    # 8 samples in 2048 dims: the covariances are rank 7, and the eigenvalue square roots of the
    # (numerically) zero part leave ~1e-6 of the trace as noise, not more.
    identical = frechet_distance(stats, feature_statistics(extract_features(extractor, photos.clone())))
    assert abs(identical) < 1e-5 * scale
    fids = []
    for offset in (20, 60):
        shifted = (photos.float() + offset).clamp(0, 255).to(torch.uint8)
        fids.append(frechet_distance(stats, feature_statistics(extract_features(extractor, shifted))))
    assert 0 < fids[0] < fids[1]


def test_missing_weights_error_says_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPADE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(InceptionWeightsError, match="SPADE_INCEPTION_WEIGHTS"):
        resolve_inception_weights("")
    with pytest.raises(InceptionWeightsError, match="does not exist: .*nope.pth"):
        resolve_inception_weights(str(tmp_path / "nope.pth"))
    assert resolve_inception_weights("", allow_download=True) is None
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv("SPADE_INCEPTION_WEIGHTS", str(weights))
    assert resolve_inception_weights("") == weights


def test_changing_weights_changes_cache_name(tmp_path: Path, coco_sample: Path) -> None:
    photos = _photos(coco_sample)[:2]
    w0 = make_test_inception_weights(tmp_path / "w0.pth", photos, seed=0)
    w1 = make_test_inception_weights(tmp_path / "w1.pth", photos, seed=1)
    assert sha256_file(w0) != sha256_file(w1)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"dataset": "x", "label_nc": 3, "splits": {"val": {"shards": [{"file": "a.tar"}]}}}')
    data = DataConfig(dataset="custom", val_shards=str(shards / "x-val-{000000..000000}.tar"), crop_size=64,
                      aspect_ratio=2.0)
    fingerprint = dataset_fingerprint(data, "val")
    resolution = evaluation_resolution(data)
    assert resolution == (64, 32)
    names = {reference_cache_name("custom", "val", fingerprint, resolution, "p", 0, sha256_file(w)) for w in (w0, w1)}
    assert len(names) == 2
    # Resolution and manifest content are part of the name too.
    assert reference_cache_name("custom", "val", fingerprint, (32, 32), "p", 0, sha256_file(w0)) not in names
    (shards / "manifest.json").write_text('{"dataset": "x", "label_nc": 3, "splits": {"val": {"shards": [{"file": "b.tar"}]}}}')
    assert dataset_fingerprint(data, "val") != fingerprint
    # The cache file round-trips (the Evaluator decides hit or miss; test_eval_watcher covers that).
    features = torch.randn(6, 2048)
    ref = ReferenceStats(features=features, stats=feature_statistics(features), meta={"num_images": 6},
                         keys=[f"k{i}" for i in range(6)])
    save_reference(tmp_path / "cache" / "a.pt", ref)
    ref2 = load_reference(tmp_path / "cache" / "a.pt")
    torch.testing.assert_close(ref.features, ref2.features)
    assert ref2.meta == ref.meta and ref2.keys == ref.keys
