"""bench/train_step.py runs both modes and reports consistent JSON (what it claims, not how fast)."""
from __future__ import annotations

import json

import torch


def test_train_step_bench_reports_both_modes_flops_and_ratio(capsys) -> None:
    from bench.train_step import main

    threads = torch.get_num_threads()
    out = main(["--threads", "1", "2", "--batch", "2", "--warmup", "1", "--iters", "1", "model.ngf=4",
                "model.ndf=4", "model.n_layers_D=2", "data.crop_size=64", "data.load_size=64", "loss.no_vgg_loss=true"])
    assert torch.get_num_threads() == threads  # the bench restores the caller's thread count
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(out))  # the last line is the whole result
    assert out["labels"] == "coco-sample"  # real label maps from ../shared (the CI has them too)
    # One run per (batch, thread count), each also printed as it finished.
    assert [(r["batch"], r["threads"]) for r in out["runs"]] == [(2, 1), (2, 2)]
    assert [json.loads(line)["run"] for line in lines[-3:-1]] == json.loads(json.dumps(out["runs"]))
    assert out["ratios"] == [{"batch": r["batch"], "threads": r["threads"], "ratio": round(r["ratio"], 4)} for r in out["runs"]]
    for run in out["runs"]:
        assert len(run["load_avg_start"]) == 3 and len(run["load_avg_end"]) == 3
        _check_run(run)


def _check_run(run: dict) -> None:
    ref, fast = run["reference"], run["fast"]
    batch = run["batch"]
    assert run["ratio"] == fast["images_per_s"] / ref["images_per_s"]
    assert ref["images_per_s"] == batch / ref["median_s"] and len(ref["times_s"]) == 1
    assert run["cpu_ratio"] == ref["median_cpu_s"] / fast["median_cpu_s"] and ref["median_cpu_s"] > 0
    # Same network: the reference counts the dense mlp_shared multiply-adds the gather skips.
    assert ref["flops_per_image"] > fast["flops_per_image"] > 0
    assert ref["peak_memory_bytes"] > 0 and fast["peak_memory_bytes"] > 0
    # Same weights, same batch: the first iteration's losses agree to fp32 rounding.
    assert set(run["first_iteration_loss_rel_diff"]) == {"GAN", "GAN_Feat", "D_Fake", "D_real"}
    assert max(run["first_iteration_loss_rel_diff"].values()) < 1e-4


def test_profile_bench_lists_the_top_ops_per_thread_count(capsys) -> None:
    from bench.profile_step import main

    threads = torch.get_num_threads()
    results = main(["--threads", "1", "--top", "5", "model.ngf=4", "model.ndf=4", "model.n_layers_D=2",
                    "data.crop_size=64", "data.load_size=64", "loss.no_vgg_loss=true"])
    assert torch.get_num_threads() == threads
    (result,) = results
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    ops = result["top_ops"]
    assert len(ops) == 5 and result["threads"] == 1 and result["iteration_s"] > 0
    assert [op["self_cpu_s"] for op in ops] == sorted((op["self_cpu_s"] for op in ops), reverse=True)
    assert 0 < sum(op["share"] for op in ops) <= 1.0 + 1e-6
    assert result["self_cpu_total_s"] > 0 and all(op["calls"] >= 1 for op in ops)
