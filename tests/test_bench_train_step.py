"""bench/train_step.py runs both modes and reports consistent JSON (what it claims, not how fast)."""
from __future__ import annotations

import json

import torch


def test_train_step_bench_reports_both_modes_flops_and_ratio(capsys) -> None:
    from bench.train_step import main

    threads = torch.get_num_threads()
    try:
        out = main(["--threads", "1", "--warmup", "1", "--iters", "1", "model.ngf=4", "model.ndf=4",
                    "model.n_layers_D=2", "data.crop_size=64", "data.load_size=64", "loss.no_vgg_loss=true"])
    finally:
        torch.set_num_threads(threads)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(out))  # the last line is the whole result
    assert out["labels"] == "coco-sample"  # real label maps from ../shared (the CI has them too)
    ref, fast = out["reference"], out["fast"]
    assert out["ratio"] == fast["images_per_s"] / ref["images_per_s"]
    assert ref["images_per_s"] == 1 / ref["median_s"] and len(ref["times_s"]) == 1
    # Same network: the reference counts the dense mlp_shared multiply-adds the gather skips.
    assert ref["flops_per_image"] > fast["flops_per_image"] > 0
    assert ref["peak_memory_bytes"] > 0 and fast["peak_memory_bytes"] > 0
    # Same weights, same batch: the first iteration's losses agree to fp32 rounding.
    assert set(out["first_iteration_loss_rel_diff"]) == {"GAN", "GAN_Feat", "D_Fake", "D_real"}
    assert max(out["first_iteration_loss_rel_diff"].values()) < 1e-4
    assert out["machine"]["cpu_count"] >= 1
