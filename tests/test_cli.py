"""Every console script in pyproject.toml behaves alike (spade_dist/cli/common.py): ``--version``, help
text = the module docstring without RST markup, config overrides as positional ``KEY=VALUE`` (``--set``
as the alias), and a bad argument -> exit 2 with one line ``PROG: error: ...`` on stderr.

Scripts are read from pyproject.toml, so a newly added one is checked without editing this file; its
module must expose ``build_parser()`` (built with ``spade_dist.cli.common.make_parser``)."""
from __future__ import annotations

import argparse
import io
import importlib
import re
import sys
import tomllib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from spade_dist.cli.common import CliParser, package_version, plain_text

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _entry(spec: str) -> tuple[Callable, object]:
    module_name, func = spec.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, func), module


def _call(main: Callable, argv: Sequence[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``(argv prefix, parser)`` for the parser and every (nested) sub-command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _subcommands(child, path + (name,))


def _one_error_line(err: str, prog: str) -> None:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}") and ": error: " in lines[0], err


def test_pyproject_lists_the_scripts() -> None:
    assert {"spade-train", "spade-generate", "spade-eval", "spade-data", "spade-config"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_conventions(script: str, capsys: pytest.CaptureFixture) -> None:
    main, module = _entry(SCRIPTS[script])
    assert hasattr(module, "build_parser"), f"{script}: {module.__name__} has no build_parser()"
    parser = module.build_parser()
    assert isinstance(parser, CliParser) and parser.prog == script

    code, out, _ = _call(main, ["--version"], capsys)
    assert code == 0 and out.strip() == f"{script} (spade-dist {package_version()})"

    code, out, _ = _call(main, ["--help"], capsys)
    assert code == 0
    first_line = plain_text(module.__doc__).splitlines()[0]
    assert first_line in out, f"{script} --help does not show its module docstring"
    assert not re.search(r"``|:(mod|class|func|meth|attr):`", out), out

    for path, sub in _subcommands(parser):
        code, _, err = _call(main, [*path, "--no-such-option"], capsys)
        assert code == 2, (script, path, code)
        _one_error_line(err, script)
        # One override syntax: wherever a parser takes config overrides, it is the shared pair.
        dests = {a.dest: a for a in sub._actions}
        if "overrides" in dests or "set_overrides" in dests:
            positional, alias = dests["overrides"], dests["set_overrides"]
            assert not positional.option_strings and positional.nargs == "*" and positional.metavar == "KEY=VALUE"
            assert alias.option_strings == ["--set"] and isinstance(alias, argparse._AppendAction)
        assert not [a for a in sub._actions if a.metavar == "KEY=VALUE" and a.dest not in ("overrides", "set_overrides")]


@pytest.mark.parametrize("argv", [
    ["--preset", "custom", "model.no_such_key=1"],
    ["--preset", "custom", "--set", "model.no_such_key=1"],
    ["--preset", "custom", "model.ngf=many"],
    ["--preset", "no_such_preset"],
    ["--config", "/nonexistent/x.yaml"],
])
def test_bad_config_input_is_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    from spade_dist.cli.show_config import main

    code, _, err = _call(main, argv, capsys)
    assert code == 2
    _one_error_line(err, "spade-config")


def test_set_alias_and_positional_overrides_combine(capsys: pytest.CaptureFixture) -> None:
    from spade_dist.cli.show_config import main

    code, out, _ = _call(main, ["--preset", "custom", "model.ngf=16", "--set", "data.label_nc=7",
                                "--get", "model.ngf", "data.label_nc"], capsys)
    assert code == 0 and out.split() == ["16", "7"]


def test_train_rejects_a_bad_override_before_starting(repo_root: Path, capsys: pytest.CaptureFixture) -> None:
    from spade_dist.cli.train import main

    code, _, err = _call(main, ["--config", str(repo_root / "configs" / "quickstart.yaml"), "train.no_such=1"], capsys)
    assert code == 2
    _one_error_line(err, "spade-train")


def test_plain_text_strips_rst() -> None:
    assert plain_text("``spade-x``: see :mod:`a.b` and :class:`~a.b.C`\n") == "spade-x: see a.b and C"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_when_asked_on_rank_0_and_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from spade_dist.progress import progress_bar, progress_wanted

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_wanted(True, 0)  # a pipe / log file
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_wanted(True, 0)
    assert not progress_wanted(False, 0) and not progress_wanted(True, 1)
    with progress_bar(total=3, desc="phase", unit="img", enabled=True) as bar:
        bar.update(3)
    assert "phase" in terminal.getvalue() and "0/3" in terminal.getvalue()
    before = terminal.getvalue()
    assert list(progress_bar(range(3), desc="quiet", enabled=False)) == [0, 1, 2]
    assert terminal.getvalue() == before
