"""The memory planner (spade_dist/memory_plan.py, spade-config --plan): batch, accumulation and
activation checkpointing chosen from the measured linear model, with the margin kept free."""
from __future__ import annotations

import pytest

from spade_dist import memory_plan
from spade_dist.config import ConfigError
from spade_dist.memory_plan import GIB, architecture_key, plan
from tests import kit


@pytest.fixture
def measured_tiny(monkeypatch):
    """The tiny preset with a known model: off = 1 GiB + 2 GiB per sample, generator = 1 GiB + 1 GiB per
    sample in fp32; in bf16 half of each (0.5 GiB + 1 GiB, 0.5 GiB + 0.5 GiB)."""
    cfg = kit.tiny_config()
    monkeypatch.setattr(memory_plan, "MEASURED",
                        {architecture_key(cfg): {"off": (1 * GIB, 2 * GIB), "generator": (1 * GIB, 1 * GIB)}})
    monkeypatch.setattr(memory_plan, "MEASURED_BF16",
                        {architecture_key(cfg): {"off": (GIB // 2, 1 * GIB), "generator": (GIB // 2, GIB // 2)}})
    return cfg


def test_plan_prefers_the_largest_micro_batch_then_savings_off(measured_tiny):
    cfg = measured_tiny
    # 32 on 8 GPUs = 4 per GPU: off needs 9 GiB, generator 5 GiB (margin 0 to make the edges exact).
    assert plan(cfg, 9, 8, margin=0) == memory_plan.Plan(4, 1, "off", "no", 9 * GIB, 9 * GIB)
    assert plan(cfg, 8.9, 8, margin=0) == memory_plan.Plan(4, 1, "generator", "no", 5 * GIB, 8.9 * GIB)
    # 32 on 2 GPUs = 16 per GPU in 4 GiB: micro-batches divide 16; 4 needs 5 GiB even with savings, 2 needs
    # 5 GiB off and 3 GiB with savings -> 8 micro-batches of 2.
    assert plan(cfg, 4, 2, margin=0) == memory_plan.Plan(2, 8, "generator", "no", 3 * GIB, 4 * GIB)
    # Not even one sample in fp32 (2 GiB with savings): bf16 (1 GiB at batch 1) is the plan, 1.5 GiB fits 2 x 0.5.
    assert plan(cfg, 1.5, 2, margin=0) == memory_plan.Plan(2, 8, "generator", "bf16", 1.5 * GIB, 1.5 * GIB)
    assert plan(cfg, 0.9, 2, margin=0) is None  # not even one sample in bf16
    # The margin is kept free: 10 GiB with 15% free is 8.5 GiB usable, so batch 4 needs savings.
    assert plan(cfg, 10, 8).activation_checkpointing == "generator"


def test_plan_keeps_the_configured_precision_and_says_when_bf16_is_needed(measured_tiny):
    cfg = measured_tiny
    bf16 = kit.tiny_config("train.mixed_precision=bf16")
    # Configured bf16: its rows (4 per GPU in 3 GiB: 0.5 + 4 x 0.5 with savings); never switched to fp32.
    assert plan(bf16, 3, 8, margin=0) == memory_plan.Plan(4, 1, "generator", "bf16", 2.5 * GIB, 3 * GIB)
    # Configured fp32 where fp32 fits only with accumulation: the plan stays fp32, bf16 is the alternative.
    assert plan(cfg, 3, 8, margin=0) == memory_plan.Plan(2, 2, "generator", "no", 3 * GIB, 3 * GIB)
    assert memory_plan.bf16_alternative(cfg, 3, 8, margin=0) == plan(bf16, 3, 8, margin=0)
    text, fits = memory_plan.describe(kit.tiny_config("data.batch_size=2", "speed.activation_checkpointing=generator"),
                                      3, 8, margin=0)
    assert fits and "plan: data.batch_size=2 train.grad_accum=2 speed.activation_checkpointing=generator " \
                    "train.mixed_precision=no" in text
    assert "bf16 would fit a larger micro-batch: data.batch_size=4 train.grad_accum=1" in text
    assert "bf16, activation_checkpointing=off: 0.50 GiB + 1.00 GiB per sample" in text
    # fp32 fits the whole share: no alternative; nothing fits in fp32: bf16 is the plan and the text says why.
    assert memory_plan.bf16_alternative(cfg, 9, 8, margin=0) is None
    text, _ = memory_plan.describe(cfg, 1.5, 2, margin=0)
    assert "train.mixed_precision=bf16" in text and "bf16 is needed to fit" in text
    # The configured batch is judged in the configured precision.
    text, fits = memory_plan.describe(kit.tiny_config("train.mixed_precision=bf16", "data.batch_size=4",
                                                      "speed.activation_checkpointing=generator"), 3, 8, margin=0)
    assert fits and "train.mixed_precision=bf16: 2.5 GiB, fits" in text
    # fp16 plans from the bf16 rows, and says so.
    text, _ = memory_plan.describe(kit.tiny_config("train.mixed_precision=fp16"), 3, 8, margin=0)
    assert "fp16: planned from the bf16 rows" in text and "train.mixed_precision=fp16" in text


def test_plan_takes_all_when_less_checkpointing_does_not_fit(measured_tiny, monkeypatch):
    key = architecture_key(measured_tiny)
    monkeypatch.setitem(memory_plan.MEASURED, key, {**memory_plan.MEASURED[key], "all": (1 * GIB, GIB // 2)})
    # Batch 4: off 9 GiB, generator 5 GiB, all 3 GiB.
    assert plan(measured_tiny, 4, 8, margin=0) == memory_plan.Plan(4, 1, "all", "no", 3 * GIB, 4 * GIB)
    assert plan(measured_tiny, 5, 8, margin=0).activation_checkpointing == "generator"
    text, _ = memory_plan.describe(measured_tiny, 4, 8, margin=0)
    assert "activation_checkpointing=all: 1.00 GiB + 0.50 GiB per sample" in text


def test_describe_says_whether_the_configured_batch_fits(measured_tiny):
    text, fits = memory_plan.describe(kit.tiny_config("data.batch_size=4"), 9, 8, margin=0)
    assert fits and "plan: data.batch_size=4 train.grad_accum=1 speed.activation_checkpointing=off" in text
    text, fits = memory_plan.describe(kit.tiny_config("data.batch_size=8"), 9, 8, margin=0)
    assert not fits and "WILL NOT FIT" in text


def test_unmeasured_architecture_and_bad_values_are_config_errors(measured_tiny):
    with pytest.raises(ConfigError, match="no fp32 memory measurement.*bench/memory.py"):
        plan(kit.tiny_config("model.ngf=16"), 40, 8)
    with pytest.raises(ConfigError, match="no bf16 memory measurement"):
        plan(kit.tiny_config("model.ngf=16", "train.mixed_precision=bf16"), 40, 8)
    with pytest.raises(ConfigError, match="gpus >= 1"):
        plan(measured_tiny, 40, 0)


def test_shipped_table_plans_the_paper_batch_for_each_measured_preset():
    """Every row of the shipped tables belongs to a preset and plans 32 on 8 x 80 GB without accumulation;
    the bf16 table measures the presets the fp32 one does, each level in fewer bytes per sample."""
    from spade_dist.config import load_config
    from spade_dist.resources import preset_names, preset_path

    keys = {architecture_key(load_config(preset_path(name))): name for name in preset_names()}
    assert memory_plan.MEASURED and set(memory_plan.MEASURED) <= set(keys)
    assert set(memory_plan.MEASURED_BF16) == set(memory_plan.MEASURED)
    for key in memory_plan.MEASURED:
        for precision in ("no", "bf16"):
            p = plan(load_config(preset_path(keys[key]), [f"train.mixed_precision={precision}"]), 80, 8)
            assert p is not None and p.per_gpu_batch == 4 and p.grad_accum == 1, (keys[key], precision)
        for setting, (_, per_sample) in memory_plan.MEASURED_BF16[key].items():
            assert 0 < per_sample < memory_plan.MEASURED[key][setting][1], (keys[key], setting)


def test_spade_config_plan_cli(capsys):
    from spade_dist.cli.show_config import main

    assert main(["--preset", "coco_stuff", "--plan", "--gpu-memory", "40", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "plan: data.batch_size=4 train.grad_accum=1" in out and "configured:" in out
    assert main(["--preset", "coco_stuff", "--plan", "--gpu-memory", "4", "data.batch_size=16"]) == 0
    assert "warning: the configured data.batch_size will not fit" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--plan", "--gpu-memory", "40", "model.ngf=16"]) == 2  # not measured
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no fp32 memory measurement" in err
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "coco_stuff", "--plan"])
    assert exc.value.code == 2
