"""Every console script in pyproject.toml behaves alike (spade_dist/cli/common.py, docs/CLI.md):
``--version``, help text = the module docstring without RST markup, a help string on every option,
config overrides as positional ``KEY=VALUE`` (``--set`` as the alias), the one flag vocabulary
(``--run-dir`` / ``--checkpoint`` / ``--out`` / ``--config`` + ``--preset``), and bad input -> exit 2 with
one line ``PROG: error: ...`` on stderr: a bad argument, a path that does not exist, a run directory
that does not exist.

Scripts are read from pyproject.toml, so a newly added one is checked without editing this file; its
module must expose ``build_parser()`` (built with ``spade_dist.cli.common.make_parser``), and the walk
below fails until each of its sub-commands has a bad-path case."""
from __future__ import annotations

import argparse
import importlib
import io
import re
import sys
import tomllib
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

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


# A nonexistent input path for every (script, sub-command): each must exit 2 with one error line.
# None = the sub-command reads no input path (it creates its --out, or only prints paths).
MISSING = "/nonexistent/spade-dist-test"
BAD_PATH: dict[tuple[str, tuple[str, ...]], Optional[list[str]]] = {
    ("spade-train", ()): ["--config", f"{MISSING}.yaml"],
    ("spade-generate", ()): ["--checkpoint", f"{MISSING}.pth", "--labels", MISSING, "--out", "{tmp}"],
    ("spade-convert", ()): None,
    ("spade-convert", ("to-official",)): ["--checkpoint", f"{MISSING}.pt", "--out", "{tmp}/G.pth"],
    ("spade-convert", ("from-official",)): ["--checkpoint", f"{MISSING}.pth", "--out", "{tmp}/G.pt", "--preset", "tiny"],
    ("spade-export", ()): ["--checkpoint", MISSING, "--out", "{tmp}/G.pt"],
    ("spade-eval", ()): None,
    ("spade-eval", ("once",)): ["--checkpoint", MISSING],
    ("spade-eval", ("watch",)): ["--run-dir", "{tmp}", "--config", f"{MISSING}.yaml"],
    ("spade-eval", ("compare",)): [MISSING],
    ("spade-report", ()): ["--run-dir", MISSING],
    ("spade-data", ()): None,
    ("spade-data", ("shard",)): ["--layout", "custom", "--root", MISSING, "--out", "{tmp}/shards"],
    ("spade-data", ("verify",)): [MISSING],
    ("spade-data", ("stats",)): [MISSING],
    ("spade-data", ("synth",)): None,  # writes --out
    ("spade-data", ("prepare",)): ["coco-stuff", "--annotations", f"{MISSING}.json", "--images", MISSING, "--labels", MISSING,
                                   "--root", "{tmp}/coco"],
    ("spade-data", ("check-layout",)): ["--layout", "custom", "--root", MISSING],
    ("spade-data", ("merge-manifest",)): [MISSING],
    ("spade-config", ()): ["--config", f"{MISSING}.yaml"],
    ("spade-serve", ()): ["--checkpoint", f"{MISSING}.pth", "--port", "0"],
    ("spade-run", ()): None,
    ("spade-run", ("path",)): None,  # paths of a run that need not exist yet
    ("spade-run", ("outcome",)): ["--run-dir", MISSING],
    ("spade-run", ("owner",)): ["--run-dir", MISSING],
    ("spade-run", ("prepare",)): None,
    ("spade-run", ("verdict",)): None,
    ("spade-run", ("health",)): ["--run-dir", MISSING],
    ("spade-run", ("rendezvous",)): None,  # reads nothing: hosts a store on --port
}
# Sub-commands whose --run-dir may name a run that does not exist yet (docs/CLI.md says why).
RUN_DIR_MAY_NOT_EXIST = {
    ("spade-eval", ("watch",)): "the watcher may start before the trainer and waits for the run",
    ("spade-run", ("path",)): "batch scripts resolve paths before the first start",
    ("spade-run", ("prepare",)): "batch scripts prepare before the first start",
    ("spade-run", ("verdict",)): "a launch that failed before creating the run still gets its verdict",
}
# The other arguments of a call whose --run-dir names no run ({tmp}: the test's temp dir).
RUN_DIR_CASES: dict[tuple[str, tuple[str, ...]], list[str]] = {
    ("spade-eval", ("once",)): [],
    ("spade-export", ()): ["--out", "{tmp}/G.pt"],
    ("spade-generate", ()): ["--labels", "{tmp}", "--out", "{tmp}/out"],
    ("spade-report", ()): [],
    ("spade-run", ("outcome",)): [],
    ("spade-run", ("owner",)): [],
    ("spade-run", ("health",)): [],
    ("spade-serve", ()): ["--port", "0"],
}
# The one vocabulary: these names, and no other spelling of the same thing (docs/CLI.md).
RETIRED_SPELLINGS = {"--output", "--run", "--rundir", "--ckpt", "--output-dir", "--outdir", "--cfg"}


def _walk() -> Iterator[tuple[str, tuple[str, ...], argparse.ArgumentParser]]:
    for script in sorted(SCRIPTS):
        _, module = _entry(SCRIPTS[script])
        for path, sub in _subcommands(module.build_parser()):
            yield script, path, sub


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


def test_every_option_has_help_and_the_one_vocabulary() -> None:
    for script, path, parser in _walk():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            name = action.option_strings or [action.dest]
            assert action.help and action.help.strip(), f"{script} {' '.join(path)} {name}: empty help"
            deprecated = action.help.startswith("deprecated spelling of")
            assert deprecated or not RETIRED_SPELLINGS & set(action.option_strings), (script, path, name)
        options = {o for a in parser._actions for o in a.option_strings}
        if "--preset" in options or "--config" in options:  # wherever a config is read, both
            assert {"--preset", "--config"} <= options, (script, path)


def test_walk_covers_every_subcommand() -> None:
    assert {(script, path) for script, path, _ in _walk()} == set(BAD_PATH)


@pytest.mark.parametrize("case", sorted(k for k, v in BAD_PATH.items() if v is not None),
                         ids=lambda c: " ".join((c[0], *c[1])))
def test_missing_input_path_is_one_line_exit_2(case: tuple[str, tuple[str, ...]], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    script, path = case
    main, _ = _entry(SCRIPTS[script])
    argv = [*path, *(a.replace("{tmp}", str(tmp_path)) for a in BAD_PATH[case])]
    code, _, err = _call(main, argv, capsys)
    assert code == 2, (argv, err)
    _one_error_line(err, script)
    assert MISSING in err, err


@pytest.mark.parametrize("case", sorted(RUN_DIR_CASES), ids=lambda c: " ".join((c[0], *c[1])))
def test_unknown_run_dir_is_one_line_exit_2(case: tuple[str, tuple[str, ...]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    script, path = case
    main, _ = _entry(SCRIPTS[script])
    for run_dir in (tmp_path / "no-such-run", tmp_path):  # a typo, and a directory that holds no run
        argv = [*path, "--run-dir", str(run_dir), *(a.replace("{tmp}", str(tmp_path)) for a in RUN_DIR_CASES[case])]
        code, _, err = _call(main, argv, capsys)
        assert code == 2, (argv, err)
        _one_error_line(err, script)
        assert str(run_dir) in err, err


def test_every_run_dir_option_is_checked() -> None:
    with_run_dir = {(s, p) for s, p, parser in _walk() if any("--run-dir" in a.option_strings for a in parser._actions)}
    assert with_run_dir == set(RUN_DIR_CASES) | set(RUN_DIR_MAY_NOT_EXIST)


def test_deprecated_spellings_still_work_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from spade_dist.cli.common import model_source
    from spade_dist.cli.report import build_parser as report_parser
    from spade_dist.cli.run import main as run_main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    args = report_parser().parse_args(["--run-dir", str(run), "--output", str(tmp_path / "r.html")])
    assert args.out == tmp_path / "r.html"
    assert capsys.readouterr().err.strip() == ("spade-report: warning: --output is deprecated and goes away in the next "
                                               "release; use --out")
    ns = argparse.Namespace(run_dir=None, checkpoint=run)
    assert model_source("spade-export", ns) == run
    assert "--checkpoint RUN_DIR is deprecated" in capsys.readouterr().err
    step = run / "checkpoints" / "step-000000010"
    step.mkdir()
    assert model_source("spade-export", argparse.Namespace(run_dir=None, checkpoint=step)) == step
    assert capsys.readouterr().err == ""  # a step directory is what --checkpoint means
    code, out, err = _call(run_main, ["outcome", str(run)], capsys)
    assert (code, out.strip()) == (0, "incomplete") and "--run-dir RUN_DIR" in err
    code, out, err = _call(run_main, ["path", str(run), "stop"], capsys)
    assert (code, out.strip()) == (0, str(run / "STOP")) and "deprecated" in err
    code, out, err = _call(run_main, ["path", "--run-dir", str(run), "stop", "eval"], capsys)
    assert (code, out.split(), err) == (0, [str(run / "STOP"), str(run / "eval")], "")


def test_train_and_eval_take_a_preset_by_name(capsys: pytest.CaptureFixture) -> None:
    from spade_dist.cli.common import config_source
    from spade_dist.cli.eval import build_parser as eval_parser
    from spade_dist.cli.train import build_parser as train_parser
    from spade_dist.config import load_config

    args = train_parser().parse_args(["--preset", "tiny", "train.max_steps=3"])
    assert load_config(config_source(args), args.overrides).train.max_steps == 3
    args = eval_parser().parse_args(["once", "--checkpoint", "G.pt", "--preset", "coco_stuff"])
    assert load_config(config_source(args)).data.label_nc == 182
    assert "preset" in train_parser().format_help() and "no such file" in train_parser().format_help()
