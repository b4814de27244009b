"""spade-report on a finished (synthetic) run directory: plots, FID curve, latest samples, errors."""
from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_dist.charts import nice_ticks
from spade_dist.cli.report import main as report_main
from spade_dist.config import MetricsConfig
from spade_dist.files import read_jsonl
from spade_dist.monitoring.exporter import TrainingMetrics
from spade_dist.monitoring.report import ReportError, build_report, run_summary
from spade_dist.monitoring.train_log import current_run

STEPS = list(range(10, 110, 10))  # 10 logged steps
EVAL_STEPS = [25, 50, 75, 100]


def make_finished_run(run_dir: Path) -> None:
    # The training log is written by the real exporter, as rank 0 of a run does.
    m = TrainingMetrics(MetricsConfig(enabled=True, port_base=0, run_name="synthetic", job_id="1"),
                        run_dir=run_dir, rank=0, local_rank=0, world_size=2, node="n1")
    m.start()
    for i, step in enumerate(STEPS):
        m.record_step(step=step, epoch=i // 4, images=20, data_seconds=0.2, compute_seconds=1.8 - 0.1 * i, steps=10,
                      losses={"GAN": 1.0 / (i + 1), "KLD<x>": 0.5, "VGG": float("inf") if i == 3 else 2.0 - 0.1 * i},
                      lrs={"G": 1e-4, "D": 4e-4})
    m.close()
    (run_dir / "eval").mkdir()
    with open(run_dir / "eval" / "metrics.jsonl", "w") as f:
        for step, fid in zip(EVAL_STEPS, [90.0, 70.0, 65.0, 68.0]):
            f.write(json.dumps({"step": step, "fid": fid, "kid_mean": fid / 1000, "kid_std": 0.001,
                                "num_images": 50, "resolution": [64, 64], "weights_sha256": "ab", "seconds": 3.0}) + "\n")
    (run_dir / "eval" / "best.json").write_text(json.dumps({"step": 75, "fid": 65.0}))
    (run_dir / "samples").mkdir()
    for step in (50, 100, 150, 200, 250):
        pixels = np.full((8, 24, 3), step % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(run_dir / "samples" / f"step-{step:09d}.png")
    (run_dir / "DONE").write_text(json.dumps({"step": 100, "time": 1.0}))


def svgs(page: str) -> dict[str, ET.Element]:
    out = {}
    for text in re.findall(r"<svg .*?</svg>", page, re.S):
        root = ET.fromstring(text)  # well-formed XML, or this raises
        out[root.get("aria-label")] = root
    return out


def polyline_lengths(svg: ET.Element) -> list[int]:
    ns = "{http://www.w3.org/2000/svg}"
    return [len(p.get("points").split()) for p in svg.iter(f"{ns}polyline")]


def test_report_of_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    assert report_main(["--run-dir", str(run_dir)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == run_dir / "report.html"
    page = out.read_text()

    charts = svgs(page)
    assert set(charts) == {"Losses", "Throughput", "Data-wait share", "Learning rate", "FID", "KID"}
    # One line per loss term; the non-finite VGG value is left out of its line.
    assert sorted(polyline_lengths(charts["Losses"])) == [9, 10, 10]
    assert polyline_lengths(charts["Throughput"]) == [10]
    assert polyline_lengths(charts["FID"]) == [4]
    assert polyline_lengths(charts["Learning rate"]) == [10, 10]
    assert "KLD&lt;x&gt;" in page and "KLD<x>" not in page  # names are escaped
    ns = "{http://www.w3.org/2000/svg}"
    for title, svg in charts.items():  # every drawn point lies inside its plot frame
        frame = next(svg.iter(f"{ns}rect"))
        x0, y0 = float(frame.get("x")), float(frame.get("y"))
        x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
        for line in svg.iter(f"{ns}polyline"):
            for point in line.get("points").split():
                x, y = map(float, point.split(","))
                assert x0 - 0.1 <= x <= x1 + 0.1 and y0 - 0.1 <= y <= y1 + 0.1, (title, point)

    assert "finished at step 100" in page
    assert "65 at step 75" in page  # best FID from eval/best.json
    # The 4 latest sample grids, newest first, embedded byte for byte.
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)" width="768" alt="samples at step (\d+)"', page)
    assert [int(step) for _, step in embedded] == [250, 200, 150, 100]
    assert base64.b64decode(embedded[0][0]) == (run_dir / "samples" / "step-000000250.png").read_bytes()
    # 24-px-wide grids shown 32x enlarged (768 px), pixels kept crisp.
    assert "image-rendering:pixelated" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


def test_report_output_option_and_sample_count(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    target = tmp_path / "elsewhere" / "r.html"
    assert report_main(["--run-dir", str(run_dir), "--out", str(target), "--samples", "1"]) == 0
    assert len(re.findall(r"<img ", target.read_text())) == 1


def test_report_summary_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    capsys.readouterr()
    assert report_main(["--run-dir", str(run_dir), "--summary"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(run_dir / "report.html")
    assert "  Status: finished at step 100" in lines and "  Best FID: 65 at step 75" in lines
    assert any(line.startswith("  Last losses: GAN ") for line in lines)


def test_training_log_values(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    records = read_jsonl(run_dir / "logs" / "train_metrics.jsonl")
    assert [r["step"] for r in records] == STEPS
    assert records[0]["images_per_sec"] == pytest.approx(2 * 20 / 2.0)  # world size x this rank's rate
    assert records[0]["data_wait_share"] == pytest.approx(0.1)
    assert records[3]["losses"]["VGG"] is None


def test_report_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main(["--run-dir", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="nothing to report"):
        build_report(empty)

    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    log = run_dir / "logs" / "train_metrics.jsonl"
    lines = log.read_text().splitlines()
    # A half-written last line (the trainer is appending) is tolerated...
    log.write_text("\n".join(lines) + '\n{"step": 11')
    assert len(read_jsonl(log)) == len(STEPS)
    # ...a broken line in the middle is not.
    log.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(ReportError, match=r"train_metrics\.jsonl:3: not valid JSON"):
        build_report(run_dir)


def test_resumed_run_keeps_the_rerun_values(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    log = run_dir / "logs" / "train_metrics.jsonl"
    lines = log.read_text().splitlines()
    rerun = json.loads(lines[-1])
    rerun["step"] = STEPS[-3]  # the requeued job resumed from an older checkpoint
    log.write_text("\n".join(lines + [json.dumps(rerun)]) + "\n")
    charts = svgs(build_report(run_dir))
    assert polyline_lengths(charts["Throughput"]) == [len(STEPS)]  # one point per step, no doubling back


def test_nice_ticks_cover_the_range() -> None:
    assert nice_ticks(0, 100) == [0, 25, 50, 75, 100]
    ticks = nice_ticks(0.013, 0.087)
    assert ticks[0] <= 0.013 and ticks[-1] >= 0.087 and len(ticks) <= 7
    flat = nice_ticks(5, 5)
    assert flat[0] <= 5 <= flat[-1] and flat[0] < flat[-1]


def test_report_says_what_is_missing_and_how_to_turn_it_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.kit import tiny_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tiny_config("metrics.enabled=false", "eval.mode=none", "train.sample_every=7")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    # Monitoring off: the training log is still there, so the report has the training charts.
    m = TrainingMetrics(cfg.metrics, run_dir=run_dir, rank=0, local_rank=0, world_size=1)
    m.start()
    m.record_step(step=5, epoch=0, images=4, data_seconds=0.1, compute_seconds=0.9, losses={"GAN": 1.0})
    m.close()
    assert report_main(["--run-dir", str(run_dir)]) == 0
    err = capsys.readouterr().err
    page = (run_dir / "report.html").read_text()
    assert {"Losses", "Throughput"} <= set(svgs(page))
    notes = [line for line in err.splitlines() if line.startswith("spade-report: note: ")]
    assert len(notes) == 3, err  # FID, samples, live metrics; the training log is there
    for text in (err, page):
        assert "eval.mode=none" in text and "spade-eval watch" in text
        assert "train.sample_every=7" in text
        assert "metrics.enabled=true" in text


def test_report_reads_only_the_current_run(tmp_path: Path) -> None:
    """The log's last lineage, without steps a later start went back over (a requeue after the last
    checkpoint, a rewind) and without an earlier run's lines."""
    def rec(step: int, lineage: str, start: float, resumed_from: int) -> dict:
        return {"step": step, "epoch": 0, "lineage": lineage, "start": start, "resumed_from": resumed_from,
                "images_per_sec": 1.0, "losses": {"GAN": float(step)}}

    records = ([rec(s, "old", 1.0, 0) for s in (25, 50, 75, 100)]  # an earlier run, never archived
               + [rec(s, "new", 2.0, 0) for s in (25, 50, 75)]  # checkpoint at 50, then preempted
               + [rec(s, "new", 3.0, 50) for s in (75, 100, 125)]  # resumed from 50
               + [rec(s, "new", 4.0, 100) for s in (125,)])  # rewound to 100 (--resume .../step-100)
    kept = current_run(records)
    assert [(r["step"], r["start"]) for r in kept] == [(25, 2.0), (50, 2.0), (75, 3.0), (100, 3.0), (125, 4.0)]
    assert current_run([{"step": 5}, {"step": 3}]) == [{"step": 5}, {"step": 3}]  # logs of earlier versions
    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    log = run_dir / "logs" / "train_metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = dict(run_summary(run_dir))
    assert summary["Last logged step"] == "125 (epoch 0)" and summary["Last losses"] == "GAN 125"


def test_health_events_are_marked_on_the_loss_curve_and_the_verdict_summarised(tmp_path: Path) -> None:
    from spade_dist.run_dir import RunDir

    run_dir = tmp_path / "run"
    make_finished_run(run_dir)
    run = RunDir(run_dir)
    run.health.mkdir()
    events = [{"step": 40, "signal": "spike", "action": "warn", "detail": "GAN 9 is 30 robust deviations above"},
              {"step": 60, "signal": "nonfinite", "action": "rewind", "detail": "4 consecutive steps skipped"}]
    run.health_events.write_text("".join(json.dumps(e) + "\n" for e in events))
    run.health_verdict.write_text(json.dumps({"status": "healthy", "line": "health: no stopping signal up to step 100"}))
    page = build_report(run_dir)
    ns = "{http://www.w3.org/2000/svg}"
    dots = [(c.get("fill"), c.find(f"{ns}title").text) for c in svgs(page)["Losses"].iter(f"{ns}circle")
            if c.find(f"{ns}title") is not None]
    assert dots == [("#e69f00", "warn: spike at step 40: GAN 9 is 30 robust deviations above"),
                    ("#6a3d9a", "rewind: nonfinite at step 60: 4 consecutive steps skipped")]
    assert "health: no stopping signal up to step 100" in page
    assert not [c for c in svgs(page)["Throughput"].iter(f"{ns}circle") if c.find(f"{ns}title") is not None]
