"""Inline SVG line charts (no plotting dependency): the run report and the FID page draw with these."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")

Point = tuple[float, float]




def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1/2/5 x 10^k steps)."""
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def fmt_number(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: dict[str, list[Point]] = field(default_factory=dict)

    def has_data(self) -> bool:
        return any(self.series.values())


def svg_line_chart(chart: Chart, width: int = 640, height: int = 300, marks: Sequence[tuple[Point, str, str]] = ()) -> str:
    """An inline SVG line chart with axes, ticks and a legend; non-finite points are left out.

    ``marks``: (point, tooltip, colour) drawn as dots over the lines (e.g. each FID, the best one red)."""
    left, right, top, bottom = 64, 16, 28, 48
    legend_h = 18 * ((len(chart.series) + 2) // 3)
    plot_w, plot_h = width - left - right, height - top - bottom
    total_h = height + legend_h
    points = [p for pts in chart.series.values() for p in pts]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
           f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{e(chart.title)}">',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{e(chart.title)}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for t in xt:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">{fmt_number(t)}</text>')
    for t in yt:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{fmt_number(t)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" text-anchor="middle" font-size="12">{e(chart.x_label)}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 14 {top + plot_h / 2})">{e(chart.y_label)}</text>')
    for i, (name, pts) in enumerate(chart.series.items()):
        color = PALETTE[i % len(PALETTE)]
        if len(pts) == 1:
            out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        elif pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        lx, ly = left + (i % 3) * (plot_w / 3), height + 4 + 18 * (i // 3)
        out.append(f'<rect x="{lx:.1f}" y="{ly}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 16:.1f}" y="{ly + 10}" font-size="12">{e(name)}</text>')
    for (x, y), title, color in marks:
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}"><title>{e(title)}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)
