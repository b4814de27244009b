"""Evaluation split across 2 gloo ranks gives the single-process FID / KID."""
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


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path: Path, coco_sample: Path) -> None:
    shard_dataset("coco-stuff", coco_sample, tmp_path / "shards", "val", max_count=1000, workers=1, progress=False)
    overrides = [
        f"data.val_shards={tmp_path / 'shards' / 'manifest.json'}", "data.pin_memory=false",
        "model.norm_G=spectralspadebatch3x3", f"eval.inception_weights={tmp_path / 'inception.pth'}",
        # Separate caches: each run computes its reference itself (2 ranks gather it).
        # KID subsets as large as the set: the value does not depend on the gathered order.
        "eval.kid_subset_size=1000",
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
    for result in results:
        assert result["num_images"] == 8 and result["reference_images"] == 8
        assert result["fid"] == pytest.approx(expected.fid, rel=1e-5)
        assert result["kid_mean"] == pytest.approx(expected.kid_mean, rel=1e-5)
    # Rank 0 alone wrote the shared cache file, with the full gathered reference.
    assert len(list((tmp_path / "c2").glob("ref-*.pt"))) == 1
