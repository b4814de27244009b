"""``spade-report --run-dir R [--output FILE] [--samples N]``: a self-contained HTML page of a run.

Plots losses, throughput and FID over steps and embeds the latest sample grids; see
:mod:`spade_dist.monitoring.report` for what it reads. Exit status 2 on a bad run directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.monitoring.report import ReportError, write_report


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="spade-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path, help="the run directory (train.run_dir)")
    ap.add_argument("--output", type=Path, default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    ap.add_argument("--samples", type=int, default=4, help="how many of the latest sample grids to embed")
    args = ap.parse_args(argv)
    if args.samples < 0:
        ap.error(f"--samples must be >= 0, got {args.samples}")
    try:
        out = write_report(args.run_dir, args.output, args.samples)
    except ReportError as exc:
        print(f"spade-report: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
