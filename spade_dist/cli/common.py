"""Plumbing shared by every console script, so that they behave alike:

- ``--help`` shows the module docstring (RST markup stripped) as the description;
- ``--version`` prints ``PROG (spade-dist X.Y.Z)``;
- config overrides are positional ``dotted.key=value`` arguments (``--set KEY=VALUE`` is accepted as an
  alias for scripts that used it);
- a user error (bad argument, bad value, missing file) prints one line ``PROG: error: ...`` on stderr
  and exits with :data:`EXIT_USAGE` (2), never a traceback or a usage block; a failure of the machine
  (disk full, read-only directory) likewise with :data:`EXIT_ENVIRONMENT` (74), :func:`fail_os`;
- overrides may come before and after options (``--config X a=1 --resume none b=2``).
- one vocabulary (docs/CLI.md): ``--run-dir`` for a run, ``--checkpoint`` for a checkpoint file or step
  directory, ``--out`` for outputs, ``--config`` / ``--preset`` wherever a config is read; an old
  spelling still works for one release and prints one ``PROG: warning: ... is deprecated`` line.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence, Union

from spade_dist.exit_codes import EXIT_ENVIRONMENT, EXIT_USAGE
from spade_dist.files import environment_problem
from spade_dist.resources import preset_names, preset_path
from spade_dist.run_dir import RunDir

# ``literal`` -> literal; :mod:`x` / :class:`~a.b` -> x / b
_RST_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(doc: str) -> str:
    """A docstring as terminal text: RST roles and literals reduced to their content."""
    text = _RST_ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), doc)
    return _RST_LITERAL.sub(r"\1", text).strip("\n")


def package_version() -> str:
    try:
        return importlib.metadata.version("spade-dist")
    except importlib.metadata.PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line and exit 2 (subparsers inherit the class). Positional
    arguments (the overrides) may be split by options: argparse's plain parsing consumes a ``*``
    positional at its first stretch and calls a second stretch "unrecognized arguments"."""

    _intermixing = False

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._subparsers is not None or self._intermixing:  # intermixed parsing calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def make_parser(prog: str, doc: Optional[str], **kwargs) -> CliParser:
    """The parser of console script ``prog``; ``doc`` is its module docstring (the help description)."""
    parser = CliParser(prog=prog, description=plain_text(doc or ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s (spade-dist {package_version()})")
    return parser


def add_subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Required sub-commands whose help keeps its line breaks, like the top-level one."""
    return parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def add_subcommand(sub: argparse._SubParsersAction, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                          **kwargs)


def add_overrides(parser: argparse.ArgumentParser, example: str = "model.ngf=32") -> None:
    """Config overrides: positional ``dotted.key=value`` (the one syntax), ``--set`` as an alias."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"dotted config overrides, e.g. {example}")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="same as a positional KEY=VALUE (repeatable)")


def add_config_options(parser: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    """``--config FILE|NAME`` and ``--preset NAME`` (one of them); ``what``: what the config is for."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--config", metavar="FILE|NAME",
                       help=f"{what}: a YAML file, or a shipped preset's name when no such file exists (e.g. tiny)")
    group.add_argument("--preset", metavar="NAME", help=f"{what}: a shipped preset ({', '.join(preset_names())})")


def config_source(args: argparse.Namespace) -> Optional[Union[str, Path]]:
    """The config ``--preset`` / ``--config`` name (a preset's file, or what load_config resolves), or None."""
    return preset_path(args.preset) if args.preset else args.config


def warn_deprecated(prog: str, old: str, new: str) -> None:
    print(f"{prog}: warning: {old} is deprecated and goes away in the next release; use {new}",
          file=sys.stderr, flush=True)


class _DeprecatedSpelling(argparse.Action):
    """An old option spelling: stores into the new option's ``dest`` and prints one deprecation line."""

    def __init__(self, option_strings: Sequence[str], dest: str, instead: str, **kwargs: Any) -> None:
        self.instead = instead
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        warn_deprecated(parser.prog, str(option_string), self.instead)
        setattr(namespace, self.dest, values)


def add_deprecated_option(parser: argparse.ArgumentParser, old: str, instead: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a spelling of ``instead`` for one more release."""
    parser.add_argument(old, dest=dest, action=_DeprecatedSpelling, instead=instead,
                        help=f"deprecated spelling of {instead}", **kwargs)


def add_model_source(parser: argparse.ArgumentParser, checkpoint_help: str, run_help: str) -> None:
    """``--run-dir RUN`` (its newest committed checkpoint) or ``--checkpoint FILE|STEP_DIR``, one required."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", type=Path, help=run_help)
    which.add_argument("--checkpoint", type=Path, help=checkpoint_help)


def model_source(prog: str, args: argparse.Namespace) -> Path:
    """The path :func:`add_model_source`'s options name: a run directory (checked; RunDirNotFound
    otherwise) or a checkpoint; ``--checkpoint RUN_DIR`` still works, with a deprecation line."""
    if args.run_dir is not None:
        return RunDir(args.run_dir).require().root
    if RunDir(args.checkpoint).is_run():
        warn_deprecated(prog, "--checkpoint RUN_DIR", "--run-dir RUN_DIR")
    return args.checkpoint


def overrides(args: argparse.Namespace) -> list[str]:
    """All overrides of ``args``: the positional ones, then the ``--set`` ones (later ones win)."""
    return list(args.overrides) + list(args.set_overrides)


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (anything else is the one-line usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def fail(prog: str, exc: BaseException | str, code: int = EXIT_USAGE) -> int:
    """Report an error as one line on stderr; returns ``code`` (:data:`EXIT_USAGE` by default) for
    ``return fail(...)``."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def fail_os(prog: str, exc: OSError) -> int:
    """An ``OSError`` as one line: the machine's fault (disk full, read-only, I/O error, ...) exits
    :data:`EXIT_ENVIRONMENT`, anything else (a missing or unreadable input path) :data:`EXIT_USAGE`."""
    problem = environment_problem(exc)
    if problem:
        return fail(prog, problem, EXIT_ENVIRONMENT)
    return fail(prog, f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else exc)
