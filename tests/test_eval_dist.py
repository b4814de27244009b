"""Evaluation split across 2 gloo ranks gives the single-process FID / KID / mIoU / pixel accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools.shard import shard_dataset
from spade_dist.config import load_config
from spade_dist.data import build_eval_loader
from spade_dist.eval.evaluate import Evaluator
from spade_dist.eval.inception import make_test_inception_weights
from spade_dist.models.compat import load_generator_file, save_generator_file
from spade_dist.models.factory import build_generator
from tests.dist_utils import run_distributed
from tests.kit import tiny_config


def _evaluate_on_rank(rank: int, world_size: int, config_path: str, generator_path: str) -> dict:
    cfg = load_config(config_path)
    evaluator = Evaluator(cfg, log=lambda _: None)
    generator, _ = load_generator_file(generator_path)
    result = evaluator.evaluate(generator).to_record()
    return {**result, "reference_images": int(evaluator.reference.features.shape[0])}


def save_conv_segmenter(path: Path, classes: int) -> Path:
    """A random 1x1-convolution segmenter as a TorchScript file (what eval.segmenter.path loads)."""
    torch.manual_seed(5)
    torch.jit.script(torch.nn.Conv2d(3, classes, 1)).save(str(path))
    return path


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path: Path, coco_sample: Path) -> None:
    shard_dataset("coco-stuff", coco_sample, tmp_path / "shards", "val", max_count=1000, workers=1, progress=False)
    overrides = [
        f"data.val_shards={tmp_path / 'shards' / 'manifest.json'}", "data.pin_memory=false",
        "model.norm_G=spectralspadebatch3x3", f"eval.inception_weights={tmp_path / 'inception.pth'}",
        # Separate caches: each run computes its reference itself (2 ranks gather it).
        # KID subsets of 4 of the 8 images: equal only if both runs put the features in the same order.
        "eval.kid_subset_size=4", "eval.metrics=[fid,kid,miou,pixel_accuracy]",
        # 182 outputs: the preset's coco-stuff-182 class map.
        f"eval.segmenter.path={save_conv_segmenter(tmp_path / 'segmenter.pt', 182)}",
    ]
    cfg = tiny_config(*overrides, f"eval.reference_cache_dir={tmp_path / 'c1'}", base="coco_stuff")
    photos = torch.cat([b["image"] for b in build_eval_loader(cfg.data, split="val")])
    make_test_inception_weights(tmp_path / "inception.pth", photos, seed=0)
    torch.manual_seed(3)
    save_generator_file(build_generator(cfg).eval(), cfg, tmp_path / "G.pt")

    single = Evaluator(cfg, log=lambda _: None)
    expected = single.evaluate(load_generator_file(tmp_path / "G.pt")[0])

    dist_cfg = tiny_config(*overrides, f"eval.reference_cache_dir={tmp_path / 'c2'}", base="coco_stuff")
    (tmp_path / "dist.yaml").write_text(dist_cfg.to_yaml())
    results = run_distributed(_evaluate_on_rank, 2, args=(str(tmp_path / "dist.yaml"), str(tmp_path / "G.pt")))
    expected_record = expected.to_record()
    for result in results:
        assert result["protocol"]["images"]["num_images"] == 8 and result["reference_images"] == 8
        assert result["fid"] == pytest.approx(expected.fid, rel=1e-5)
        assert result["kid_mean"] == pytest.approx(expected.kid_mean, rel=1e-5)
        assert result["kid_std"] == pytest.approx(expected.kid_std, rel=1e-4)
        # Summed int64 confusion matrices: exactly the single-process scores, generated and real.
        for key in ("miou", "pixel_accuracy", "class_iou", "real"):
            assert result[key] == expected_record[key], key
        assert result["protocol_hash"] == expected.protocol_hash
    # Rank 0 alone wrote the shared cache files, with the full gathered reference.
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "c2").iterdir()) == ["inception", "segmentation"]
