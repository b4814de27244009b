"""``spade-run``: what batch scripts need to know about a run directory, without spelling out its layout.

    spade-run path    --run-dir R stop requeue done   # one path per line, in the order asked
    spade-run outcome --run-dir R                     # "done STEP" | "requeue STEP" | "incomplete"
    spade-run owner   --run-dir R                     # who holds the run's lock, or "none"
    spade-run prepare --run-dir R                     # before a launch: remove stale STOP / REQUEUE markers
    spade-run verdict --run-dir R --rc RC [--preempted] --requeue-exit-code N
                                                      # after it: "finished|requeue|failed EXIT_CODE message"
    spade-run health  --run-dir R                     # the run's health verdict line (docs/HEALTH.md), or "none"
    spade-run rendezvous --port P [--ready-file F]    # host the launchers' rendezvous store until SIGHUP

``path``, ``prepare`` and ``verdict`` also work before the run directory exists (a first launch, or
one that failed before training started); ``outcome``, ``owner`` and ``health`` need a run directory; ``rendezvous``
takes none (docs/SLURM.md: why the batch shell, not a launcher, hosts the store). The run
directory as the first positional argument (``spade-run outcome R``) is the deprecated spelling.
Exit status 0; 2 for bad input (an unknown entry name, a path that is no run directory, a bad
argument, a ``rendezvous`` port already in use); 74 when ``prepare`` cannot remove a marker (read-only run directory, docs/FORMATS.md "Exit codes").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.cli.common import CliParser, add_subcommand, add_subparsers, fail, fail_os, make_parser, warn_deprecated
from spade_dist.exit_codes import requeue_code_problem
from spade_dist.rendezvous_store import StorePortBusy, serve_rendezvous_store
from spade_dist.run_dir import PATH_NAMES, RunDir, RunDirNotFound, launch_verdict, read_health_verdict


def _run_dir_options(parser: argparse.ArgumentParser, legacy_positional: bool = True) -> None:
    parser.add_argument("--run-dir", type=Path, help="the run directory (train.run_dir)")
    if legacy_positional:  # path reads it from the front of its names instead
        parser.add_argument("legacy_run_dir", nargs="?", type=Path, metavar="RUN_DIR",
                            help="deprecated spelling of --run-dir RUN_DIR")


def build_parser() -> CliParser:
    ap = make_parser("spade-run", __doc__)
    sub = add_subparsers(ap)
    p_path = add_subcommand(sub, "path", help="print run directory paths, one per line")
    _run_dir_options(p_path, legacy_positional=False)
    p_path.add_argument("names", nargs="+", metavar="NAME",
                        help=f"any of: {', '.join(PATH_NAMES)} (deprecated: the run directory first)")
    for name, text in (("outcome", "done STEP | requeue STEP | incomplete"), ("owner", "the lock holder or 'none'"),
                       ("prepare", "remove stale STOP / REQUEUE markers before a launch"),
                       ("health", "the run's final health verdict (train.health) or 'none'")):
        _run_dir_options(add_subcommand(sub, name, help=text))
    p_verdict = add_subcommand(sub, "verdict", help="after a launch: what the batch script should do")
    _run_dir_options(p_verdict)
    p_verdict.add_argument("--rc", type=int, required=True, help="the launcher's exit code")
    p_verdict.add_argument("--preempted", action="store_true", help="the batch script received a preemption signal")
    p_verdict.add_argument("--requeue-exit-code", type=int, required=True, help="checkpoint.requeue_exit_code")
    p_store = add_subcommand(sub, "rendezvous", help="host the launchers' rendezvous store until SIGHUP / SIGINT (SIGTERM is ignored)")
    p_store.add_argument("--port", type=int, required=True, help="TCP port to listen on (every interface)")
    p_store.add_argument("--ready-file", type=Path, help="written (the port) once the store listens")
    return ap


def _run_dir(args: argparse.Namespace) -> RunDir:
    """--run-dir, or the deprecated positional run directory (the first name for ``path``)."""
    if args.run_dir is not None:
        if getattr(args, "legacy_run_dir", None) is not None:
            raise RunDirNotFound(f"give the run directory once (--run-dir {args.run_dir}), not also as {args.legacy_run_dir}")
        return RunDir(args.run_dir)
    legacy = args.names.pop(0) if args.command == "path" else args.legacy_run_dir
    if legacy is None or (args.command == "path" and not args.names):
        raise RunDirNotFound("--run-dir RUN_DIR is required")
    warn_deprecated("spade-run", f"spade-run {args.command} RUN_DIR", f"spade-run {args.command} --run-dir RUN_DIR")
    return RunDir(legacy)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "rendezvous":
        try:
            serve_rendezvous_store(args.port, args.ready_file)
        except StorePortBusy as exc:
            return fail("spade-run", exc)
        except OSError as exc:
            return fail_os("spade-run", exc)
        return 0
    try:
        run = _run_dir(args)
        if args.command in ("outcome", "owner", "health"):
            run.require()  # a typo must not read as an incomplete (resumable) run
    except RunDirNotFound as exc:
        return fail("spade-run", exc)
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
