"""A self-contained HTML report of a run for people without Grafana (``spade-report --run-dir R``).

Reads what the run directory already holds (docs/FORMATS.md):
- ``logs/train_metrics.jsonl`` (written by rank 0's TrainingMetrics): losses, throughput, data-wait share,
  of the current run only (:func:`spade_dist.monitoring.train_log.current_run`: its lineage, without the
  steps a later start went back over);
- ``eval/metrics.jsonl`` and ``eval/best.json`` (the evaluation watcher): FID / KID / mIoU / pixel
  accuracy over steps, one series per protocol (spade_dist.eval.report);
- ``samples/step-*.png`` (the trainer's sample grids): the latest ones, embedded;
- ``DONE`` and ``config.yaml`` when present (the latter to say why a section is empty and which
  setting turns it on).

Plots are inline SVG generated here and images are base64 data URIs, so the one HTML file can be
mailed or attached to a ticket as is (no matplotlib dependency, nothing fetched by the browser).
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from spade_dist.charts import Chart, Point, fmt_number, svg_line_chart
from spade_dist.config import Config, ConfigError, load_config
from spade_dist.eval.report import metric_charts
from spade_dist.eval.scores import METRICS, best_record, metric_value
from spade_dist.files import read_jsonl, write_atomic
from spade_dist.monitoring.train_log import current_run
from spade_dist.run_dir import RunDir, read_health_verdict
from spade_dist.visualize import enlarged_width

# Where the report's data lives, relative to the run directory (for messages).
TRAIN_LOG_RELPATH = RunDir("").train_metrics_log
EVAL_LOG_RELPATH = RunDir("").eval_metrics_log
HEALTH_EVENTS_RELPATH = RunDir("").health_events
# Health events on the loss curve (docs/HEALTH.md), by what their policy did.
HEALTH_MARK_COLOURS = {"warn": "#e69f00", "rewind": "#6a3d9a", "stop": "#d62728"}
SAMPLE_PATTERN = re.compile(r"^step-(\d+)\.png$")
REPORT_SAMPLE_PX = 768  # sample grids are enlarged by an integer factor up to this display width


class ReportError(ValueError):
    """The run directory cannot be reported on; the message names the file / line / value."""


def latest_per_step(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last one written, in step order: a resumed run appends to the same
    log and repeats the steps after its checkpoint; the rerun's values are the ones that count."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _series(records: Sequence[dict[str, Any]], key: str, sub: Optional[str] = None) -> list[Point]:
    pts = []
    for r in records:
        value = r.get(key)
        if sub is not None:
            value = value.get(sub) if isinstance(value, dict) else None
        y, x = _number(value), _number(r.get("step"))
        if x is not None and y is not None:
            pts.append((x, y))
    return pts


def training_charts(train: Sequence[dict[str, Any]]) -> list[Chart]:
    terms = sorted({t for r in train for t in (r.get("losses") or {})})
    nets = sorted({n for r in train for n in (r.get("lr") or {})})
    return [
        Chart("Losses", "step", "loss", {t: _series(train, "losses", t) for t in terms}),
        Chart("Throughput", "step", "images / s (all ranks)", {"images/s": _series(train, "images_per_sec")}),
        Chart("Data-wait share", "step", "fraction of step time", {"data wait": _series(train, "data_wait_share")}),
        Chart("Learning rate", "step", "lr", {n: _series(train, "lr", n) for n in nets}),
    ]


def health_marks(events: Sequence[dict[str, Any]], chart: Chart) -> list[tuple[Point, str, str]]:
    """A dot per health event at its step along the top of ``chart`` (the tooltip says what fired)."""
    values = [p[1] for pts in chart.series.values() for p in pts]
    if not values:
        return []
    top = max(values)
    return [((float(ev["step"]), top), f"{ev.get('action', '?')}: {ev.get('signal', '?')} at step {ev['step']}: "
             f"{ev.get('detail', '')}", HEALTH_MARK_COLOURS.get(ev.get("action", ""), "#000000"))
            for ev in events if _number(ev.get("step")) is not None]


def eval_charts(evals: Sequence[dict[str, Any]]) -> list[Chart]:
    """The evaluation page's charts (spade_dist.eval.report): one per metric, one series per protocol."""
    return metric_charts(evals)


def latest_samples(run_dir: Path, count: int) -> list[tuple[int, Path]]:
    found = []
    for path in RunDir(run_dir).samples.glob("step-*.png"):
        match = SAMPLE_PATTERN.match(path.name)
        if match:
            found.append((int(match[1]), path))
    return sorted(found)[-count:][::-1]


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _run_config(run_dir: Path) -> Optional[Config]:
    """The run's resolved ``config.yaml`` (written by the trainer), or None when there is none."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ReportError(str(exc)) from exc


def missing_hints(cfg: Optional[Config]) -> dict[str, str]:
    """Why a section of the report is empty and how to turn it on, per section."""
    if cfg is None:
        how = "(no config.yaml in the run directory: not a spade-train run directory?)"
        return {"train": how, "eval": how, "samples": how, "live": ""}
    t, ev = cfg.train, cfg.eval
    if ev.mode == "none":
        eval_hint = ("evaluation is off for this run (eval.mode=none): start it with eval.mode=subprocess (or slurm) "
                     "and its inputs (Inception weights: eval.inception_weights or $SPADE_INCEPTION_WEIGHTS; for "
                     "miou / pixel_accuracy eval.segmenter.path), or score the checkpoints afterwards with "
                     "`spade-eval watch --run-dir RUN_DIR`.")
    else:
        eval_hint = (f"eval.mode={ev.mode}: the evaluation watcher scores each committed checkpoint "
                     f"(checkpoint.every_steps={cfg.checkpoint.every_steps}); see eval/watcher.log if none appear.")
    return {
        "train": f"rank 0 writes it every train.log_every={t.log_every} steps.",
        "eval": eval_hint,
        "samples": f"written every train.sample_every={t.sample_every} steps.",
        "live": "" if cfg.metrics.enabled else
        "off (metrics.enabled=false): Prometheus / Grafana get nothing from this run; turn on with "
        "metrics.enabled=true (docs/MONITORING.md)",
    }


def _summary_rows(run_dir: Path, train: list[dict], evals: list[dict], hints: dict[str, str]) -> list[tuple[str, str]]:
    rows = [("Run directory", str(run_dir))]
    done = RunDir(run_dir).done
    if done.is_file():
        try:
            info = json.loads(done.read_text() or "{}")
        except json.JSONDecodeError as exc:
            raise ReportError(f"{done}: not valid JSON ({exc.msg})") from exc
        rows.append(("Status", f"finished at step {info.get('step', '?')}"))
    else:
        rows.append(("Status", "running or interrupted (no DONE marker)"))
    if train:
        last = train[-1]
        rows.append(("Last logged step", f"{last['step']} (epoch {last.get('epoch', '?')})"))
        rates = [p[1] for p in _series(train, "images_per_sec")]
        if rates:
            rows.append(("Images / s (mean of logged steps)", f"{sum(rates) / len(rates):.4g}"))
        losses = {k: v for k, v in (last.get("losses") or {}).items()}
        if losses:
            rows.append(("Last losses", ", ".join(f"{k} {fmt_number(v) if _number(v) is not None else 'non-finite'}"
                                                  for k, v in sorted(losses.items()))))
    best_path = RunDir(run_dir).eval_best
    best: Optional[dict[str, Any]] = None
    if best_path.is_file():
        try:
            best = json.loads(best_path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{best_path}: not valid JSON ({exc.msg})") from exc
    elif evals:  # the watcher has not written best.json (yet): the best FID line, if any
        best = best_record([{"status": "ok", **r} for r in evals], "fid")
    if best is not None:
        metric = str(best.get("best_metric", "fid"))
        value = metric_value(best, metric) if metric in METRICS else None
        rows.append((f"Best {METRICS[metric].label if metric in METRICS else metric}",
                     f"{fmt_number(value) if value is not None else 'nan'} at step {best.get('step', '?')}"))
    verdict = read_health_verdict(RunDir(run_dir))
    if verdict is not None and "line" in verdict:
        rows.append(("Health", str(verdict["line"])))
    if hints["live"]:
        rows.append(("Live metrics", hints["live"]))
    return rows


def _charts_html(charts: Sequence[Chart], marks: Optional[dict[str, list[tuple[Point, str, str]]]] = None) -> str:
    shown = [c for c in charts if c.has_data()]
    marks = marks or {}
    return '<div class="charts">' + "".join(f"<div>{svg_line_chart(c, marks=marks.get(c.title, ()))}</div>"
                                            for c in shown) + "</div>"


def build_report(run_dir: Union[str, Path], num_samples: int = 4) -> str:
    """The report's HTML text for ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    train = latest_per_step(current_run(read_jsonl(run_dir / TRAIN_LOG_RELPATH, ReportError)))
    evals = latest_per_step(read_jsonl(run_dir / EVAL_LOG_RELPATH, ReportError))
    events = read_jsonl(run_dir / HEALTH_EVENTS_RELPATH, ReportError)
    samples = latest_samples(run_dir, num_samples)
    hints = missing_hints(_run_config(run_dir))
    if not train and not evals and not samples:
        raise ReportError(f"{run_dir}: nothing to report: no {TRAIN_LOG_RELPATH}, no {EVAL_LOG_RELPATH}, "
                          f"no samples/step-*.png")
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>spade-dist report: {e(run_dir.name)}</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1400px}"
        "table{border-collapse:collapse}td{padding:2px 12px 2px 0;vertical-align:top}"
        ".charts{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0 0 16px 0}"
        "img{max-width:100%;image-rendering:pixelated;border:1px solid #ccc}</style>",
        "</head><body>", f"<h1>Run {e(run_dir.name)}</h1>", "<table>",
    ]
    parts += [f"<tr><td><b>{e(k)}</b></td><td>{e(v)}</td></tr>" for k, v in _summary_rows(run_dir, train, evals, hints)]
    parts.append("</table>")

    parts.append("<h2>Training</h2>")
    charts = training_charts(train)
    if events:
        parts.append("<p>Health events on the loss curve (docs/HEALTH.md): warn orange, rewind purple, stop red; "
                     "hover a dot for what fired.</p>")
    parts.append(_charts_html(charts, {"Losses": health_marks(events, charts[0])}) if train else
                 f"<p>No training log ({e(str(TRAIN_LOG_RELPATH))}) yet: {e(hints['train'])}</p>")
    parts.append("<h2>Evaluation</h2>")
    parts.append(_charts_html(eval_charts(evals)) if evals else
                 f"<p>No evaluation results ({e(str(EVAL_LOG_RELPATH))}): {e(hints['eval'])}</p>")

    parts.append("<h2>Latest samples</h2>")
    if samples:
        parts.append("<p>Label | EMA generator | real image, per row.</p>")
        for step, path in samples:
            width = enlarged_width(path, REPORT_SAMPLE_PX)
            size = f' width="{width}"' if width else ""
            parts.append(f'<figure><figcaption>step {step}</figcaption>'
                         f'<img src="{_data_uri(path)}"{size} alt="samples at step {step}"></figure>')
    else:
        parts.append(f"<p>No sample grids (samples/step-*.png) yet: {e(hints['samples'])}</p>")
    parts.append(f"<p><small>Generated by spade-report at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def run_summary(run_dir: Union[str, Path]) -> list[tuple[str, str]]:
    """The report's summary table as ``(name, value)`` rows (status, last step, throughput, losses, FID)."""
    run_dir = Path(run_dir)
    train = latest_per_step(current_run(read_jsonl(run_dir / TRAIN_LOG_RELPATH, ReportError)))
    evals = latest_per_step(read_jsonl(run_dir / EVAL_LOG_RELPATH, ReportError))
    return _summary_rows(run_dir, train, evals, missing_hints(_run_config(run_dir)))


def missing_sections(run_dir: Union[str, Path]) -> list[str]:
    """One line per empty part of the report (and live metrics being off), saying how to turn it on."""
    run_dir = Path(run_dir)
    hints = missing_hints(_run_config(run_dir))
    lines = []
    if not read_jsonl(run_dir / TRAIN_LOG_RELPATH, ReportError):
        lines.append(f"no training log ({TRAIN_LOG_RELPATH}) yet: {hints['train']}")
    if not read_jsonl(run_dir / EVAL_LOG_RELPATH, ReportError):
        lines.append(f"no evaluation results ({EVAL_LOG_RELPATH}): {hints['eval']}")
    if not latest_samples(run_dir, 1):
        lines.append(f"no sample grids (samples/step-*.png) yet: {hints['samples']}")
    if hints["live"]:
        lines.append(f"live metrics {hints['live']}")
    return lines


def write_report(run_dir: Union[str, Path], output: Optional[Union[str, Path]] = None, num_samples: int = 4) -> Path:
    """Write the report (default ``<run_dir>/report.html``) and return its path."""
    text = build_report(run_dir, num_samples)
    out = Path(output) if output else RunDir(run_dir).report
    write_atomic(out, text)
    return out
