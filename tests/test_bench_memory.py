"""bench/memory.py: exact live-tensor accounting, the same bytes with real and fake tensors."""
from __future__ import annotations

import json

import pytest
import torch

TINY_64 = ["data.crop_size=64", "data.load_size=64", "loss.no_vgg_loss=true"]  # 2x2 latent: BN defined at batch 1


def test_live_bytes_follows_storages_until_they_are_freed() -> None:
    from bench.memory import LiveBytes

    tracker = LiveBytes()
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = torch.ones(250)  # 1000 bytes; peak 5000
        del a, b
        d = torch.ones(500)  # a's storage is gone: 3000 live
        sparse = torch.eye(3).to_sparse()  # its int64 indices and float values count
    assert tracker.peak == 5000
    assert tracker.total == 1000 + 2000 + 2 * 3 * 8 + 3 * 4
    del c, d, sparse
    assert tracker.total == 0


def test_live_bytes_names_where_the_bytes_at_the_peak_were_made() -> None:
    from bench.memory import LiveBytes

    tracker = LiveBytes(sites=True)
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(250)  # 1000 bytes: the peak, made here
        del a
        c = torch.zeros(100)  # below the peak: not in it
    assert tracker.peak == 5000 and sum(tracker.peak_sites.values()) == 5000
    assert [nbytes for _, nbytes in tracker.peak_sites.most_common()] == [4000, 1000]
    assert all(site.startswith("tests/test_bench_memory.py:") and site.endswith("aten.ones.default")
               for site in tracker.peak_sites)
    assert tracker.peak_op == tracker.peak_sites.most_common()[1][0]
    del b, c


def test_memory_bench_fake_accounting_equals_real_and_savings_lower_the_per_sample_memory(capsys) -> None:
    """fp32 and the step's bf16 autocast (CPU autocast here), run by run the same bytes with both accountings."""
    from bench.memory import main

    args = ["--config", "configs/tiny.yaml", "--batch", "1", "2", "--modes", "reference", "reference+savings",
            "--precision", "fp32", "bf16", "--time-iters", "1", "--", *TINY_64]
    real = main(["--accounting", "real", *args])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(real))  # the last line is the whole result
    fake = main(["--accounting", "fake", *args])
    keys = ("mode", "precision", "batch", "peak_bytes", "persistent_bytes_at_peak", "other_bytes_at_peak")
    assert [{k: r[k] for k in keys} for r in real["runs"]] == [{k: r[k] for k in keys} for r in fake["runs"]]
    assert {(r["mode"], r["precision"]) for r in real["runs"]} == {
        (m, p) for m in ("reference", "reference+savings") for p in ("fp32", "bf16")}
    assert all(r["step_s"] > 0 for r in real["runs"]) and all(r["step_s"] is None for r in fake["runs"])
    ref, saved = real["linear_model"]["reference/fp32"], real["linear_model"]["reference+savings/fp32"]
    assert 0 < saved["per_sample_bytes"] < ref["per_sample_bytes"]
    assert real["ratios"]["reference+savings/fp32 per_sample / reference"] == round(
        saved["per_sample_bytes"] / ref["per_sample_bytes"], 4)
    assert "reference+savings/fp32 step_s / reference" in real["ratios"]
    # bf16 autocast keeps 2-byte activations: fewer bytes per sample at each level, the ratio against fp32's reference.
    for mode in ("reference", "reference+savings"):
        assert 0 < real["linear_model"][f"{mode}/bf16"]["per_sample_bytes"] < real["linear_model"][f"{mode}/fp32"][
            "per_sample_bytes"]
    assert real["ratios"]["reference/bf16 per_sample / reference"] < 1
    # The planner's rows (bench/memory_table.py), one per precision, whole bytes.
    rows = fake["table_rows"]
    assert set(rows) == {"fp32", "bf16"} and rows["fp32"]["key"] == rows["bf16"]["key"]
    for precision, row in rows.items():
        model = fake["linear_model"][f"reference/{precision}"]
        assert row["off"] == [round(model["fixed_bytes"]), round(model["per_sample_bytes"])]
        assert set(row) == {"key", "off", "generator_spade"}
    for run in real["runs"]:  # batch 1 -> 2 adds the batch itself to the persistent bytes, never removes any
        assert run["peak_bytes"] == run["persistent_bytes_at_peak"] + run["other_bytes_at_peak"]
        assert run["persistent_bytes_at_peak"] == run["persistent_bytes_at_start"]


def test_memory_bench_refuses_fake_accounting_of_the_speed_paths(capsys) -> None:
    from bench.memory import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", "configs/tiny.yaml", "--modes", "fast", "--accounting", "fake"])
    assert exc.value.code == 2 and "--accounting real" in capsys.readouterr().err


def test_memory_table_script_writes_the_planners_module(tmp_path) -> None:
    """bench/memory_table.py: the rows it measures land in a module that imports, other rows kept."""
    import importlib.util

    from bench.memory import SAVINGS
    from bench.memory_table import main
    from spade_dist import memory_table

    out = tmp_path / "memory_table.py"
    main(["--precision", "bf16", "--presets", "tiny", "--out", str(out)])
    spec = importlib.util.spec_from_file_location("written_memory_table", out)
    written = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(written)
    assert written.MEASURED == memory_table.MEASURED  # fp32 not re-measured: kept as shipped
    (key, row), = ((k, v) for k, v in written.MEASURED_BF16.items() if k[4] == 8)  # tiny: ngf 8
    assert set(row) == {"off", *SAVINGS}
    assert all(0 < per_sample < memory_table.MEASURED[key][setting][1] for setting, (_, per_sample) in row.items())
    assert "bench/memory_table.py" in written.TABLE_SOURCE and "# tiny" in out.read_text()


def test_memory_bench_runs_the_speed_paths_a_run_chooses_on_real_label_maps(capsys) -> None:
    """The speed modes on the COCO-Stuff sample's label maps (../shared, the CI has it), their speed
    paths chosen as a training run chooses them, and the same paths for fast and fast+savings."""
    from bench.memory import main

    out = main(["--config", "configs/coco_stuff.yaml", "--batch", "1", "2", "--modes", "fast", "fast+savings",
                "--savings", "all", "--time-iters", "1", "--", "data.crop_size=64", "data.load_size=72",
                "model.ngf=8", "model.ndf=8", "loss.no_vgg_loss=true"])
    assert out["labels"] == "coco-sample"  # auto: COCO's 182 labels and the sample present
    paths = {(r["mode"], r["batch"]): r["speed_paths"] for r in out["runs"]}
    assert all(paths.values()) and all(" x " in p for p in paths.values())  # e.g. "9 x dense, 9 x region"
    for batch in (1, 2):
        assert paths[("fast", batch)] == paths[("fast+savings", batch)]
    assert out["ratios"]["fast+savings/fp32 step_s / fast"] > 0
    blocks = main(["--config", "configs/tiny.yaml", "--batch", "1", "2", "--modes", "fast", "--time-iters", "0",
                   "--labels", "blocks", "--", *TINY_64])
    assert blocks["labels"] == "blocks" and all(r["speed_paths"] for r in blocks["runs"])
