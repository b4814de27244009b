"""``spade-report --run-dir R [--out FILE] [--samples N]``: a self-contained HTML page of a run.

Plots losses, throughput and FID over steps and embeds the latest sample grids; see
:mod:`spade_dist.monitoring.report` for what it reads. Prints the report's path; for each part that is
empty (no training log, no FID results, no samples, live metrics off) a note on stderr says which
setting turns it on. Exit status 2 on a bad run directory, 74 when the report cannot be written
(read-only directory, disk full).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.cli.common import add_deprecated_option, fail, fail_os, make_parser
from spade_dist.monitoring.report import ReportError, missing_sections, run_summary, write_report


def build_parser() -> argparse.ArgumentParser:
    ap = make_parser("spade-report", __doc__)
    ap.add_argument("--run-dir", required=True, type=Path, help="the run directory (train.run_dir)")
    ap.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    add_deprecated_option(ap, "--output", "--out", dest="out", type=Path)
    ap.add_argument("--samples", type=int, default=4, help="how many of the latest sample grids to embed")
    ap.add_argument("--summary", action="store_true",
                    help="also print the summary (status, last step, img/s, losses, best FID) after the path")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.samples < 0:
        ap.error(f"--samples must be >= 0, got {args.samples}")
    try:
        out = write_report(args.run_dir, args.out, args.samples)
        notes = missing_sections(args.run_dir)
        summary = run_summary(args.run_dir) if args.summary else []
    except ReportError as exc:
        return fail("spade-report", exc)
    except OSError as exc:  # writing the report: read-only run directory, disk full
        return fail_os("spade-report", exc)
    for note in notes:
        print(f"spade-report: note: {note}", file=sys.stderr)
    print(out)
    for name, value in summary:
        print(f"  {name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
