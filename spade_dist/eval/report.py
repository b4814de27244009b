"""The run's evaluation page ``<run_dir>/eval/fid.html`` (every metric over the steps, inline SVG, and a
table), plus the metric charts ``spade-report`` shows too (:func:`metric_charts`).

Self-contained HTML (no JavaScript, no external assets) so it opens from a shared filesystem or an
artifact store; rewritten atomically after every evaluation. The sample gallery links to it as
``../eval/fid.html``. Scores computed under different protocols are never drawn as one line: each
protocol gets its own series and letter, and the page names the fields that differ.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional, Sequence

from spade_dist.charts import PALETTE, Chart, Point, svg_line_chart
from spade_dist.config import SEGMENTATION_METRICS
from spade_dist.eval.protocol import protocol_groups, protocol_letter, protocol_notes
from spade_dist.eval.scores import METRICS, metric_value, protocol_hash_of
from spade_dist.files import write_atomic


def _axis_label(metric: str) -> str:
    info = METRICS[metric]
    return f"{info.label} ({'lower' if info.lower_is_better else 'higher'} is better)"


def metric_charts(records: Sequence[dict[str, Any]]) -> list[Chart]:
    """One chart per metric that has scores: a series per protocol (a letter when there are several),
    and for mIoU / pixel accuracy the segmenter's score on the real images as a reference line."""
    charts = []
    for metric, info in METRICS.items():
        groups = protocol_groups(records, metric)
        if not groups:
            continue
        series: dict[str, list[Point]] = {}
        for k, members in enumerate(groups.values()):
            suffix = f" [{protocol_letter(k)}]" if len(groups) > 1 else ""
            steps = sorted((float(records[i]["step"]), records[i]) for i in members if "step" in records[i])
            series[info.label + suffix] = [(step, metric_value(r, metric)) for step, r in steps]  # type: ignore[misc]
            real = metric_value(records[members[0]].get("real") or {}, metric) if metric in SEGMENTATION_METRICS else None
            if real is not None and steps:
                series["real images" + suffix] = [(steps[0][0], real), (steps[-1][0], real)]
        charts.append(Chart(info.label, "step", _axis_label(metric), series))
    return charts


def _cell(record: dict[str, Any], metric: str, letters: dict[str, str]) -> str:
    value = metric_value(record, metric)
    if value is None:
        return ""
    text = f"{value:.4f}"
    if metric == "kid" and isinstance(record.get("kid_std"), (int, float)):
        text += f" ± {record['kid_std']:.4f}"
    letter = letters.get(protocol_hash_of(record, metric))
    return text + (f" [{letter}]" if letter else "")


def write_fid_page(path: Path, records: Sequence[dict], best: Optional[dict], run_name: str) -> None:
    """Write the page for ``records`` (metrics.jsonl lines, in file order); ``best`` is best.json's record."""
    metrics = [m for m in METRICS if protocol_groups(records, m)]
    letters = {}  # per metric: protocol hash -> letter, only where a metric has several protocols
    for metric in metrics:
        groups = protocol_groups(records, metric)
        letters[metric] = {d: protocol_letter(k) for k, d in enumerate(groups)} if len(groups) > 1 else {}
    best_step = int(best["step"]) if best else None
    rows = []
    for r in sorted(records, key=lambda r: (int(r.get("step", -1)), r.get("time", 0))):
        if r.get("status") == "ok":
            images = (r.get("protocol") or {}).get("images") or {}
            cells = [r["step"], *(_cell(r, m, letters[m]) for m in metrics), images.get("num_images", ""),
                     "x".join(str(v) for v in images.get("resolution", [])), f"{r.get('seconds', 0):.1f}", "ok"]
        else:
            cells = [r.get("step", "?"), *([""] * (len(metrics) + 3)), f"skipped: {r.get('reason', '')}"]
        mark = ' style="background:#fde0e0"' if best_step is not None and r.get("step") == best_step and r.get("status") == "ok" else ""
        rows.append(f"<tr{mark}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    e = html.escape
    labels = [f"step {r.get('step', '?')}" for r in records]
    notes = [line for m in metrics for line in protocol_notes(records, labels, m)]
    best_metric = best.get("best_metric", "fid") if best else "fid"
    best_value = metric_value(best, best_metric) if best else None
    best_line = (f"<p>Best ({e(METRICS[best_metric].label)}): step {best['step']}, {best_value:.4f} "
                 f'(<a href="best_generator.pt">best_generator.pt</a>)</p>' if best and best_value is not None else "")
    hashes = sorted({f"{METRICS[m].label} {protocol_hash_of(r, m)}" for r in records for m in metrics
                     if metric_value(r, m) is not None})
    charts = "".join(svg_line_chart(c, marks=_best_marks(c, best_step)) for c in metric_charts(records))
    header = "".join(f"<th>{e(METRICS[m].label)}</th>" for m in metrics)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Evaluation - {e(run_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px;border-bottom:1px solid #eee}}</style>
</head><body>
<h1>Evaluation over training: {e(run_name)}</h1>
{charts or "<p>No checkpoint evaluated yet.</p>"}
{best_line}
{"<pre>" + e(chr(10).join(notes)) + "</pre>" if notes else ""}
<p>Protocol hashes: {e(", ".join(hashes) or "-")} (the full protocol is in each line of
<a href="metrics.jsonl">metrics.jsonl</a>). Samples: <a href="../samples/index.html">gallery</a>.</p>
<table><tr><th>step</th>{header}<th>images</th><th>resolution</th><th>seconds</th><th>status</th></tr>
{"".join(rows)}
</table></body></html>
"""
    write_atomic(path, page)


def _best_marks(chart: Chart, best_step: Optional[int]) -> list[tuple[Point, str, str]]:
    """A dot per score, the best checkpoint's in red."""
    marks = []
    for name, points in chart.series.items():
        if name.startswith("real images"):
            continue
        for step, value in points:
            color = PALETTE[1] if best_step is not None and int(step) == best_step else PALETTE[0]
            marks.append(((step, value), f"step {int(step)}: {name} {value:.4f}", color))
    return marks
