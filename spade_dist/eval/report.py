"""The run's evaluation page: ``<run_dir>/eval/fid.html``, an FID-over-steps curve (inline SVG) and a table.

Self-contained HTML (no JavaScript, no external assets) so it opens from a shared filesystem or an
artifact store; rewritten atomically after every evaluation. The sample gallery links to it as
``../eval/fid.html``.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.files import write_atomic

_WIDTH, _HEIGHT, _PAD = 640, 300, 48


def _polyline(points: Sequence[tuple[float, float]]) -> tuple[str, list[tuple[float, float]]]:
    """Map (step, fid) points into the SVG box; return the polyline attribute and the mapped points."""
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    s_span = (s_hi - s_lo) or 1.0
    v_span = (v_hi - v_lo) or 1.0
    mapped = [(_PAD + (s - s_lo) / s_span * (_WIDTH - 2 * _PAD),
               _HEIGHT - _PAD - (v - v_lo) / v_span * (_HEIGHT - 2 * _PAD)) for s, v in points]
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in mapped), mapped


def fid_curve_svg(records: Sequence[dict], best_step: Optional[int]) -> str:
    points = sorted((float(r["step"]), float(r["fid"])) for r in records if r.get("status") == "ok")
    if not points:
        return "<p>No checkpoint evaluated yet.</p>"
    line, mapped = _polyline(points)
    dots = []
    for (step, fid), (x, y) in zip(points, mapped):
        colour = "#d62728" if best_step is not None and int(step) == best_step else "#1f77b4"
        dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>step {int(step)}: FID {fid:.3f}'
                    f"</title></circle>")
    lo, hi = min(p[1] for p in points), max(p[1] for p in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" role="img" '
        f'aria-label="FID over training steps">'
        f'<rect width="100%" height="100%" fill="white" stroke="#ccc"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>{"".join(dots)}'
        f'<text x="{_PAD}" y="{_PAD - 12}" font-size="12">FID (max {hi:.2f})</text>'
        f'<text x="{_PAD}" y="{_HEIGHT - 12}" font-size="12">step {int(points[0][0])}</text>'
        f'<text x="{_WIDTH - _PAD}" y="{_HEIGHT - 12}" font-size="12" text-anchor="end">step {int(points[-1][0])}</text>'
        f'<text x="{_WIDTH - _PAD}" y="{_PAD - 12}" font-size="12" text-anchor="end">min {lo:.2f}</text>'
        "</svg>"
    )


def write_fid_page(path: Path, records: Sequence[dict], best: Optional[dict], run_name: str) -> None:
    """Write the page for ``records`` (metrics.jsonl lines, in file order)."""
    best_step = int(best["step"]) if best else None
    rows = []
    for r in sorted(records, key=lambda r: (int(r.get("step", -1)), r.get("time", 0))):
        if r.get("status") == "ok":
            cells = [r["step"], f"{r['fid']:.4f}", f"{r['kid_mean']:.5f} ± {r['kid_std']:.5f}", r["num_images"],
                     "x".join(str(v) for v in r["resolution"]), f"{r['seconds']:.1f}", "ok"]
        else:
            cells = [r.get("step", "?"), "", "", "", "", "", f"skipped: {r.get('reason', '')}"]
        mark = ' style="background:#fde0e0"' if best_step is not None and r.get("step") == best_step and r.get("status") == "ok" else ""
        rows.append(f"<tr{mark}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    weights = sorted({r["weights_sha256"] for r in records if r.get("status") == "ok"})
    best_line = (f"<p>Best: step {best['step']}, FID {best['fid']:.4f} "
                 f'(<a href="best_generator.pt">best_generator.pt</a>)</p>' if best else "")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>FID - {html.escape(run_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px;border-bottom:1px solid #eee}}</style>
</head><body>
<h1>FID over training: {html.escape(run_name)}</h1>
{fid_curve_svg(records, best_step)}
{best_line}
<p>Inception weights sha256: {html.escape(", ".join(weights) or "-")}. Raw data: <a href="metrics.jsonl">metrics.jsonl</a>.
Samples: <a href="../samples/index.html">gallery</a>.</p>
<table><tr><th>step</th><th>FID</th><th>KID</th><th>images</th><th>resolution</th><th>seconds</th><th>status</th></tr>
{"".join(rows)}
</table></body></html>
"""
    write_atomic(path, page)
