"""The run's evaluation page: ``<run_dir>/eval/fid.html``, an FID-over-steps curve (inline SVG) and a table.

Self-contained HTML (no JavaScript, no external assets) so it opens from a shared filesystem or an
artifact store; rewritten atomically after every evaluation. The sample gallery links to it as
``../eval/fid.html``.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.charts import PALETTE, Chart, svg_line_chart
from spade_dist.files import write_atomic

def fid_curve_svg(records: Sequence[dict], best_step: Optional[int]) -> str:
    """FID over steps of the ``ok`` records, the best checkpoint's point highlighted."""
    points = sorted((float(r["step"]), float(r["fid"])) for r in records if r.get("status") == "ok")
    if not points:
        return "<p>No checkpoint evaluated yet.</p>"
    marks = [((step, fid), f"step {int(step)}: FID {fid:.3f}", PALETTE[1] if int(step) == best_step else PALETTE[0])
             for step, fid in points]
    return svg_line_chart(Chart("FID over training steps", "step", "FID", {"FID": points}), marks=marks)


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
