"""The evaluation watcher over a run directory with real checkpoints of tiny generators.

Real pieces throughout: COCO-Stuff val photos sharded by data_tools, the project's eval loader,
checkpoints written by CheckpointManager (DCP step dirs + COMMITTED), the EMA generator loaded by
``load_generator_from_checkpoint``, and Inception test weights calibrated on the same photos.
Images are 32x32 (upscaled to 299 by the extractor - that is the cost), 6 of the 8 validation images.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_tools.shard import shard_dataset
from spade_dist.checkpoint import CheckpointManager
from spade_dist.config import CheckpointConfig, Config, EvalConfig, MetricsConfig
from spade_dist.data import build_eval_loader
from spade_dist.eval.evaluate import Evaluator
from spade_dist.eval.inception import make_test_inception_weights
from spade_dist.eval.watcher import EvalWatcher, WatcherBusy, committed_checkpoints, read_records
from spade_dist.models.compat import load_generator_file, save_generator_file
from spade_dist.models.factory import build_generator
from spade_dist.monitoring.exporter import EvalMetrics
from tests.kit import SHRINK, tiny_config


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory: pytest.TempPathFactory, coco_sample: Path) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("eval")
    shard_dataset("coco-stuff", coco_sample, root / "shards", "val", max_count=1000, workers=1, progress=False)
    overrides = [
        f"data.val_shards={root / 'shards' / 'manifest.json'}", "data.batch_size=4", "data.pin_memory=false",
        "model.norm_G=spectralspadebatch3x3", f"eval.inception_weights={root / 'inception.pth'}",
        f"eval.reference_cache_dir={root / 'cache'}", "eval.kid_subset_size=4", "eval.poll_seconds=0.2",
        "eval.num_images=6",  # of the 8 val photos: exercises the limit, and saves time
    ]
    cfg = tiny_config(*overrides, base="coco_stuff")
    photos = torch.cat([b["image"] for b in build_eval_loader(cfg.data, split="val")])
    make_test_inception_weights(root / "inception.pth", photos, seed=0)
    evaluator = Evaluator(cfg, log=lambda _: None)
    # What a spade-eval command line needs to rebuild cfg on top of coco_stuff.
    return SimpleNamespace(root=root, cfg=cfg, evaluator=evaluator, overrides=[*SHRINK, *overrides])


def _generator(cfg: Config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator(cfg).eval()


def _save_checkpoint(run_dir: Path, cfg: Config, step: int, seed: int, nan_ema: bool = False) -> torch.nn.Module:
    """A real checkpoint whose EMA generator differs from the raw one; returns the EMA generator."""
    raw, ema = _generator(cfg, seed), _generator(cfg, seed + 1000)
    if nan_ema:  # a diverged run
        with torch.no_grad():
            ema.fc.weight.fill_(float("nan"))
    manager = CheckpointManager(run_dir, CheckpointConfig(keep_last=100, async_save=False), rank=0, world_size=1,
                                config_yaml=cfg.to_yaml(), install_signal_handlers=False)
    manager.save(step, {"train": {"G": raw.state_dict(), "G_ema": ema.state_dict()}})
    manager.close()
    return ema


def _truncate_a_data_file(step_dir: Path) -> None:
    data_file = max((p for p in step_dir.rglob("*") if p.is_file() and p.suffix == ".distcp"),
                    key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])


@pytest.mark.slow
def test_watcher_scores_skips_corrupt_keeps_best_and_resumes(eval_setup: SimpleNamespace, tmp_path: Path) -> None:
    cfg, run_dir = eval_setup.cfg, tmp_path / "run"
    emas = {step: _save_checkpoint(run_dir, cfg, step, seed=step) for step in (10, 20, 30)}
    _truncate_a_data_file(run_dir / "checkpoints" / "step-000000020")
    (run_dir / "DONE").write_text(json.dumps({"step": 30}))

    records = EvalWatcher(run_dir, eval_setup.evaluator, policy="every", poll_seconds=0.1, log=lambda _: None).run()

    on_disk = read_records(run_dir / "eval" / "metrics.jsonl")
    assert on_disk == records
    assert [(r["step"], r["status"]) for r in on_disk] == [(10, "ok"), (20, "skipped"), (30, "ok")]
    assert "step-000000020" in on_disk[1]["reason"]
    for r in (on_disk[0], on_disk[2]):
        assert r["protocol"]["images"]["num_images"] == 6 and r["protocol"]["images"]["resolution"] == [32, 32]
        assert r["protocol"]["inception"]["weights_sha256"] == eval_setup.evaluator.weights_sha256 and r["fid"] > 0
        assert r["protocol_hash"] == eval_setup.evaluator.protocol_hash
        assert r["seconds"] > 0 and r["checkpoint"].endswith(f"step-{r['step']:09d}")
        assert set(r) >= {"kid_mean", "kid_std"}
    best = json.loads((run_dir / "eval" / "best.json").read_text())
    best_ok = min((r for r in on_disk if r["status"] == "ok"), key=lambda r: r["fid"])
    assert best["step"] == best_ok["step"] and best["fid"] == best_ok["fid"]
    # The exported best generator is that checkpoint's EMA generator (not the raw one).
    exported, _ = load_generator_file(run_dir / "eval" / "best_generator.pt")
    for name, tensor in emas[best["step"]].state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0)
    page = (run_dir / "eval" / "fid.html").read_text()
    assert "<svg" in page and "step 30" in page

    # Restart with a new checkpoint: only the new one is scored, nothing is redone. This time the
    # results are also served for Prometheus (monitoring's EvalMetrics).
    _save_checkpoint(run_dir, cfg, 40, seed=40)
    (run_dir / "DONE").write_text(json.dumps({"step": 40}))
    metrics = EvalMetrics(MetricsConfig(enabled=True, sd_dir=str(tmp_path / "sd")), run_dir)
    metrics.start()
    try:
        EvalWatcher(run_dir, eval_setup.evaluator, policy="every", poll_seconds=0.1, metrics=metrics,
                    log=lambda _: None).run()
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    after = read_records(run_dir / "eval" / "metrics.jsonl")
    assert after[:3] == on_disk
    assert [(r["step"], r["status"]) for r in after[3:]] == [(40, "ok")]
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
               if line.startswith("spade_eval_")}
    assert samples["spade_eval_step"] == 40
    assert samples["spade_eval_fid"] == pytest.approx(after[3]["fid"])
    assert samples["spade_eval_best_fid"] == pytest.approx(min(best["fid"], after[3]["fid"]))


def test_checkpoint_pruned_before_it_is_read_is_skipped(eval_setup: SimpleNamespace, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _save_checkpoint(run_dir, eval_setup.cfg, 5, seed=5)
    (ref,) = committed_checkpoints(run_dir)
    shutil.rmtree(ref.path)  # retention pruned it between the scan and the read
    watcher = EvalWatcher(run_dir, eval_setup.evaluator, log=lambda _: None)
    record = watcher.evaluate_one(ref)
    assert record["status"] == "skipped" and "does not exist" in record["reason"]
    assert read_records(run_dir / "eval" / "metrics.jsonl") == [record]


def test_diverged_checkpoint_is_skipped_not_scored(eval_setup: SimpleNamespace, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _save_checkpoint(run_dir, eval_setup.cfg, 7, seed=7, nan_ema=True)
    (ref,) = committed_checkpoints(run_dir)
    record = EvalWatcher(run_dir, eval_setup.evaluator, log=lambda _: None).evaluate_one(ref)
    assert record["status"] == "skipped" and "NaN" in record["reason"] and "step-000000007" in record["reason"]


def test_a_second_watcher_on_the_same_run_refuses(tmp_path: Path) -> None:
    # What the watcher reads of an evaluator when nothing gets scored (the results page's best record).
    fake_evaluator = SimpleNamespace(rank=0, world_size=1, cfg=SimpleNamespace(eval=EvalConfig()),
                                     protocol_hash={"fid": "f" * 12, "kid": "k" * 12})
    first = EvalWatcher(tmp_path, fake_evaluator)
    held = first._acquire_lock()
    try:
        with pytest.raises(WatcherBusy, match=f"pid {os.getpid()}.*not starting a second one"):
            EvalWatcher(tmp_path, fake_evaluator).run()
    finally:
        held.close()
    # Released (as when the first watcher's process ends): a new watcher runs; nothing committed, DONE -> exits.
    (tmp_path / "DONE").write_text("{}")
    assert EvalWatcher(tmp_path, fake_evaluator, poll_seconds=0.01).run() == []


def test_torn_line_from_a_killed_watcher_is_ignored_and_cut(tmp_path: Path) -> None:
    metrics = tmp_path / "eval" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"step": 1, "status": "ok", "fid": 2.0}\n{"step": 2, "sta')
    watcher = EvalWatcher(tmp_path, SimpleNamespace(rank=0, world_size=1))
    assert watcher.done_steps == {1}  # step 2 was not recorded: it will be scored again
    watcher._append({"step": 2, "status": "skipped", "reason": "x"})
    watcher._append({"step": 3, "status": "skipped", "reason": "y"})
    assert [r["step"] for r in read_records(metrics)] == [1, 2, 3]
    assert metrics.read_text().count("\n") == 3  # the torn fragment was cut off, no blank lines added
    assert '"sta\n' not in metrics.read_text()


def _committed(run_dir: Path, *steps: int) -> None:
    for step in steps:
        step_dir = run_dir / "checkpoints" / f"step-{step:09d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / "COMMITTED").write_text("{}")


def test_policies_select_the_documented_checkpoints(tmp_path: Path) -> None:
    fake_evaluator = SimpleNamespace(rank=0, world_size=1)
    _committed(tmp_path, 100, 200, 300)
    (tmp_path / "checkpoints" / "step-000000400").mkdir()  # not committed: never selected

    every = EvalWatcher(tmp_path, fake_evaluator, policy="every")
    every.records = [{"step": 200, "status": "ok", "fid": 1.0}]
    assert [c.step for c in every.select(finished=False)] == [100, 300]

    newest = EvalWatcher(tmp_path, fake_evaluator, policy="newest")
    assert [c.step for c in newest.select(finished=False)] == [300]

    every_2 = EvalWatcher(tmp_path, fake_evaluator, policy="every_k", every_k=2)
    assert [c.step for c in every_2.select(finished=False)] == [200]
    every_2.records = [{"step": 200, "status": "ok", "fid": 1.0}]
    assert every_2.select(finished=False) == []  # 300 is the first of the next two
    # A finished run always gets its last checkpoint scored.
    assert [c.step for c in every_2.select(finished=True)] == [300]

    with pytest.raises(ValueError, match="unknown policy 'sometimes'"):
        EvalWatcher(tmp_path, fake_evaluator, policy="sometimes")


def test_spade_eval_once_on_an_exported_generator(eval_setup: SimpleNamespace, tmp_path: Path, repo_root: Path) -> None:
    cfg = eval_setup.cfg
    save_generator_file(_generator(cfg, 7), cfg, tmp_path / "G.pt")
    direct = eval_setup.evaluator.evaluate(load_generator_file(tmp_path / "G.pt")[0])
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "spade_dist.cli.eval", "once", "--checkpoint", str(tmp_path / "G.pt"),
         "--out", str(out), *eval_setup.overrides],
        cwd=repo_root, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["protocol"]["images"]["num_images"] == 6 and result["checkpoint"] == str(tmp_path / "G.pt")
    # Another process may pick other CPU kernels (alignment): float32 features agree to ~1e-6, and FID of
    # 6 samples in 2048 dimensions amplifies that a little.
    assert result["fid"] == pytest.approx(direct.fid, rel=1e-4)


@pytest.mark.e2e
def test_spade_eval_once_pushes_its_result_to_the_pushgateway(eval_setup: SimpleNamespace, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from spade_dist.cli.eval import main as eval_main
    from spade_dist.monitoring.services import start_pushgateway

    run_dir = tmp_path / "coco-run"
    _save_checkpoint(run_dir, eval_setup.cfg, 40, seed=4)
    with start_pushgateway(tmp_path / "gw") as gw:
        code = eval_main(["once", "--checkpoint", str(run_dir / "checkpoints" / "step-000000040"),
                          *eval_setup.overrides, f"metrics.pushgateway={gw.address}", "metrics.job_id='5'"])
        out, err = capsys.readouterr()
        assert code == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        with urllib.request.urlopen(f"http://{gw.address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    pushed = {s.name: (s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("spade_eval_")}
    labels = {"job": "spade-eval", "run": "coco-run", "job_id": "5", "instance": ""}
    assert pushed["spade_eval_fid"] == (labels, pytest.approx(result["fid"]))
    assert pushed["spade_eval_kid"] == (labels, pytest.approx(result["kid_mean"]))
    assert pushed["spade_eval_step"] == (labels, 40.0)
    assert f"pushed to {gw.address}" in err


def test_spade_eval_without_weights_fails_at_start_saying_how(eval_setup: SimpleNamespace, tmp_path: Path,
                                                              repo_root: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(eval_setup.cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "SPADE_INCEPTION_WEIGHTS"}
    env["TORCH_HOME"] = str(tmp_path / "torch-home")
    proc = subprocess.run(
        [sys.executable, "-m", "spade_dist.cli.eval", "watch", "--run-dir", str(run_dir),
         "eval.inception_weights="], cwd=repo_root, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2
    assert "SPADE_INCEPTION_WEIGHTS" in proc.stderr and "eval.inception_weights" in proc.stderr


def test_evaluator_progress_bars_name_each_phase(eval_setup: SimpleNamespace, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    evaluator = Evaluator(eval_setup.cfg, cache_dir=tmp_path / "cache", log=lambda _: None, progress=True)
    evaluator.evaluate(_generator(eval_setup.cfg, 3))
    err = capsys.readouterr().err
    assert "real images: Inception features" in err and "generated images: Inception features" in err
    assert "/6 " in err  # eval.num_images of this rank


@pytest.mark.slow
def test_watcher_with_a_huggingface_segmenter_records_every_metric(eval_setup: SimpleNamespace, tmp_path: Path) -> None:
    """A tiny random-weight SegFormer saved with save_pretrained, loaded by the real path: one watcher
    job scores FID, KID, mIoU and pixel accuracy; best.json follows eval.best_metric=miou; the page,
    the run report and the Prometheus gauges show the segmentation scores."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from spade_dist.monitoring.report import write_report

    torch.manual_seed(0)
    segformer = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                                decoder_hidden_size=16, num_labels=182)  # the coco-stuff-182 class map's classes
    SegformerForSemanticSegmentation(segformer).save_pretrained(tmp_path / "segformer")
    cfg = tiny_config(*eval_setup.overrides[len(SHRINK):], "eval.metrics=[fid,kid,miou,pixel_accuracy]",
                      "eval.best_metric=miou", f"eval.segmenter.path={tmp_path / 'segformer'}", base="coco_stuff")
    evaluator = Evaluator(cfg, log=lambda _: None)  # Inception features of the real images: from the cache
    run_dir = tmp_path / "run"
    for step in (10, 20):
        _save_checkpoint(run_dir, cfg, step, seed=step)
    (run_dir / "DONE").write_text(json.dumps({"step": 20}))
    metrics = EvalMetrics(MetricsConfig(enabled=True, sd_dir=str(tmp_path / "sd")), run_dir)
    metrics.start()
    try:
        records = EvalWatcher(run_dir, evaluator, poll_seconds=0.1, metrics=metrics, log=lambda _: None).run()
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()

    assert read_records(run_dir / "eval" / "metrics.jsonl") == records
    assert [(r["step"], r["status"]) for r in records] == [(10, "ok"), (20, "ok")]
    for r in records:
        assert {"fid", "kid_mean", "miou", "pixel_accuracy", "class_iou", "real"} <= set(r)
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_accuracy"] <= 1
        assert set(r["protocol_hash"]) == {"fid", "kid", "miou", "pixel_accuracy"}
        assert r["protocol"]["segmentation"]["class_map"] == "coco-stuff-182"
    best = json.loads((run_dir / "eval" / "best.json").read_text())
    assert best["best_metric"] == "miou"
    assert best["step"] == max(records, key=lambda r: (r["miou"], -r["step"]))["step"]
    page = (run_dir / "eval" / "fid.html").read_text()
    assert "mIoU" in page and "pixel accuracy" in page
    assert 'aria-label="mIoU"' in write_report(run_dir).read_text()
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
               if line.startswith("spade_eval_")}
    assert samples["spade_eval_miou"] == pytest.approx(records[-1]["miou"])
    assert samples["spade_eval_best_miou"] == pytest.approx(best["miou"])
    assert samples["spade_eval_real_miou"] == pytest.approx(records[-1]["real"]["miou"])
    assert samples["spade_eval_best_step"] == best["step"]
