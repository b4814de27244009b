"""``spade-run``: what batch scripts need to know about a run directory, without spelling out its layout.

    spade-run path RUN_DIR stop requeue done     # one path per line, in the order asked
    spade-run outcome RUN_DIR                    # "done STEP" | "requeue STEP" | "incomplete"
    spade-run owner RUN_DIR                      # who holds the run's lock, or "none"
    spade-run prepare RUN_DIR                    # before a launch: remove stale STOP / REQUEUE markers
    spade-run verdict RUN_DIR --rc RC [--preempted] --requeue-exit-code N
                                                 # after it: "finished|requeue|failed EXIT_CODE message"
    spade-run health RUN_DIR                     # the run's health verdict line (docs/HEALTH.md), or "none"

Exit status 0; 2 for an unknown entry name or a bad argument; 74 when ``prepare`` cannot remove a
marker (read-only run directory, docs/FORMATS.md "Exit codes").
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.cli.common import CliParser, add_subcommand, add_subparsers, fail, fail_os, make_parser
from spade_dist.exit_codes import requeue_code_problem
from spade_dist.run_dir import PATH_NAMES, RunDir, launch_verdict, read_health_verdict


def build_parser() -> CliParser:
    ap = make_parser("spade-run", __doc__)
    sub = add_subparsers(ap)
    p_path = add_subcommand(sub, "path", help="print run directory paths, one per line")
    p_path.add_argument("run_dir", type=Path)
    p_path.add_argument("names", nargs="+", metavar="NAME", help=f"any of: {', '.join(PATH_NAMES)}")
    for name, text in (("outcome", "done STEP | requeue STEP | incomplete"), ("owner", "the lock holder or 'none'"),
                       ("prepare", "remove stale STOP / REQUEUE markers before a launch"),
                       ("health", "the run's final health verdict (train.health) or 'none'")):
        add_subcommand(sub, name, help=text).add_argument("run_dir", type=Path)
    p_verdict = add_subcommand(sub, "verdict", help="after a launch: what the batch script should do")
    p_verdict.add_argument("run_dir", type=Path)
    p_verdict.add_argument("--rc", type=int, required=True, help="the launcher's exit code")
    p_verdict.add_argument("--preempted", action="store_true", help="the batch script received a preemption signal")
    p_verdict.add_argument("--requeue-exit-code", type=int, required=True, help="checkpoint.requeue_exit_code")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run = RunDir(args.run_dir)
    if args.command == "path":
        unknown = [n for n in args.names if n not in PATH_NAMES]
        if unknown:
            return fail("spade-run", f"unknown entry {unknown[0]!r} (known: {', '.join(PATH_NAMES)})")
        print("\n".join(str(run.path(n)) for n in args.names))
    elif args.command == "outcome":
        kind, step = run.outcome()
        print(kind if step is None else f"{kind} {step}")
    elif args.command == "prepare":
        try:
            run.clear_launch_markers()
        except OSError as exc:
            return fail_os("spade-run", exc)
    elif args.command == "verdict":
        problem = requeue_code_problem(args.requeue_exit_code)
        if problem:
            return fail("spade-run", f"--requeue-exit-code {problem} (checkpoint.requeue_exit_code)")
        v = launch_verdict(run, args.rc, args.preempted, args.requeue_exit_code)
        print(f"{v.action} {v.exit_code} {v.message}")
    elif args.command == "health":
        verdict = read_health_verdict(run)
        print(verdict["line"] if verdict is not None and "line" in verdict else "none")
    else:
        owner = run.read_owner()
        print(owner.describe() if owner is not None else "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
