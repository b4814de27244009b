"""Hostile, careless or unlucky input: one row per case (issue 27's table and the earlier probes).

Each row names the input it builds, the command it runs, the exit code and the one-line message it
expects, and an invariant: committed checkpoints intact, nothing written outside the run directory or
``--out``, nothing a crafted file names executed. No output may hold a traceback. Adding a case is
one row in ``ROWS``: a ``setup`` that builds the input under ``tmp`` and returns the command (a console
script's ``main`` and its arguments, run in this process, or ``("subprocess", argv)``), and optionally
an ``invariant``.

Cases that need a training run, Slurm or a browser live where those run (``ELSEWHERE`` lists them).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import struct
import subprocess
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import pytest
import torch
from fastapi import FastAPI, File, UploadFile
from fastapi.testclient import TestClient

from spade_dist.checkpoint import CheckpointManager
from spade_dist.checkpoint.layout import MARKER_NAME, step_dir_name, write_marker
from spade_dist.config import CheckpointConfig
from spade_dist.exit_codes import EXIT_ENVIRONMENT, EXIT_USAGE
from spade_dist.models import build_generator
from spade_dist.models.compat import save_official_generator
from spade_dist.serve.app import BodyLimit
from spade_dist.workers import child_pids
from tests.kit import (
    PYTHON,
    REPO_ROOT,
    TINY,
    TOY_LABELS,
    cli_env,
    make_sample,
    png_bytes,
    run_cli,
    tiny_config,
    train_cmd,
    wait_for,
    write_manifest,
    write_shards,
    write_tar,
)

Command = Union[tuple[Callable[[list[str]], int], list[str]], tuple[str, list[str]]]


@dataclass(frozen=True)
class Row:
    name: str  # the row number or the probe's name
    setup: Callable[[Path], Command]
    exit_code: int
    message: str  # a substring of the one line on stderr
    invariant: Optional[Callable[[Path], None]] = None


def _no_run_dir(tmp: Path) -> None:
    assert not (tmp / "run").exists(), "a refused launch must not create the run directory"


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

class _CreatesAFile:
    """A pickle whose loading would create ``tmp/pwned``: proof that nothing in it ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _not_pwned(tmp: Path) -> None:
    assert not (tmp / "pwned").exists(), "a crafted pickle ran code"


def _committed_checkpoint(run_dir: Path, step: int = 1) -> Path:
    cfg = tiny_config()
    torch.manual_seed(0)
    generator = build_generator(cfg)
    manager = CheckpointManager(run_dir, CheckpointConfig(keep_last=1, async_save=False), rank=0, world_size=1,
                                config_yaml=cfg.to_yaml(), install_signal_handlers=False)
    manager.save(step, {"train": {"G": generator.state_dict(), "G_ema": generator.state_dict()}})
    manager.close()
    return run_dir / "checkpoints" / step_dir_name(step)


def _main(module: str) -> Callable[[list[str]], int]:
    return __import__(f"spade_dist.cli.{module}", fromlist=["main"]).main


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: Pillow reads sizes first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


# row 5: a config file that is not UTF-8
def _non_utf8_config(tmp: Path) -> Command:
    (tmp / "g.yaml").write_bytes(b"\xff\xfe x: [")
    return _main("show_config"), ["--config", str(tmp / "g.yaml")]


# row 6: spade-convert on a junk file
def _junk_weights(tmp: Path) -> Command:
    (tmp / "junk.pt").write_text("hello\n")
    return _main("convert"), ["to-official", "--checkpoint", str(tmp / "junk.pt"), "--out", str(tmp / "out.pth")]


# probe: a pickled "weights file" whose loading would run code
def _pickled_weights(tmp: Path) -> Command:
    torch.save({"generator": _CreatesAFile(tmp / "pwned")}, tmp / "G.pt")
    return _main("convert"), ["to-official", "--checkpoint", str(tmp / "G.pt"), "--out", str(tmp / "out.pth")]


# row 10: a crafted step directory: .metadata replaced by a pickle that runs code, marker rewritten
def _crafted_step_dir(tmp: Path) -> Command:
    step_dir = _committed_checkpoint(tmp / "run")
    (step_dir / ".metadata").write_bytes(pickle.dumps(_CreatesAFile(tmp / "pwned")))
    marker = json.loads((step_dir / MARKER_NAME).read_text())
    write_marker(step_dir, marker["step"], marker["world_size"],
                 {k: marker[k] for k in ("generator_paths", "world_size_locked", "lineage") if k in marker})
    return _main("export"), ["--checkpoint", str(step_dir), "--out", str(tmp / "out" / "G.pt")]


# row 13: train.run_dir= (an unset shell variable); row 15: overrides after --resume none
def _empty_run_dir(tmp: Path) -> Command:
    return "subprocess", [PYTHON, "-m", "spade_dist.cli.train", "--config", str(TINY), "--resume", "none",
                          "train.run_dir="]


# row 15: a requeue exit code outside 3..125
def _requeue_code_999(tmp: Path) -> Command:
    return _main("run"), ["verdict", str(tmp), "--rc", "0", "--requeue-exit-code", "999"]


# probe: a YAML "billion laughs" config bomb
def _config_bomb(tmp: Path) -> Command:
    lines = ["data:", "  label_nc:", "    - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10**9 leaves
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\n")
    return _main("show_config"), ["--config", str(tmp / "bomb.yaml")]


# probe: path traversal in shard keys (spade-generate writes files named by key)
def _traversal_key(tmp: Path) -> Command:
    shards = tmp / "shards"
    shards.mkdir()
    key = "../../escaped"
    write_tar(shards / "toy-val-000000.tar", [(key, make_sample(key, 40, 36, seed=0, label_nc=8))])
    manifest = write_manifest(shards, "toy", {"val": [("toy-val-000000.tar", [key])]})
    cfg = tiny_config("data.label_nc=8", "data.contain_dontcare_label=true", "data.no_instance=false")
    save_official_generator(build_generator(cfg), tmp / "G.pth")
    return _main("generate"), ["--shards", str(manifest), "--checkpoint", str(tmp / "G.pth"), "--preset", "tiny",
                               "--out", str(tmp / "a" / "b" / "out"), "data.label_nc=8",
                               "data.contain_dontcare_label=true", "data.no_instance=false"]


def _nothing_escaped(tmp: Path) -> None:
    assert not list(tmp.rglob("escaped*")), "a shard key was used as a path"


# row 2: every label map of the shards is RGB (a shard written without spade-data)
def _rgb_label_shards(tmp: Path) -> Command:
    shards = tmp / "shards"
    shards.mkdir()
    samples = []
    for i in range(8):
        members = make_sample(f"k{i:03d}", 12, 10, seed=i)
        members["label.png"] = members["image.png"]
        samples.append((f"k{i:03d}", members))
    write_tar(shards / "rgb-train-000000.tar", samples)
    manifest = write_manifest(shards, "rgb", {"train": [("rgb-train-000000.tar", [k for k, _ in samples])]})
    return "subprocess", [PYTHON, "-m", "spade_dist.cli.train", "--config", str(TINY), "--resume", "none",
                          f"data.shards={manifest}", f"train.run_dir={tmp / 'run'}", "data.label_nc=8",
                          "data.contain_dontcare_label=true", "data.no_instance=false", "eval.mode=none"]


# row 12: the launcher (spade-train --nproc-per-node) checks the config before it starts any worker
def _launcher_bad_config(tmp: Path) -> Command:
    return _main("train"), ["--config", str(TINY), "--nproc-per-node", "2", "model.ngf=-1",
                            f"train.run_dir={tmp / 'run'}"]


ROWS: list[Row] = [
    Row("5 non-UTF-8 config", _non_utf8_config, EXIT_USAGE, "g.yaml: not UTF-8 text (byte 0xff at offset 0)"),
    Row("6 junk weights file", _junk_weights, EXIT_USAGE, "junk.pt: is a text file (a config?), not PyTorch weights",
        lambda tmp: None if not (tmp / "out.pth").exists() else pytest.fail("wrote an output")),
    Row("probe pickled weights file", _pickled_weights, EXIT_USAGE, "holds pickled Python objects", _not_pwned),
    Row("10 crafted checkpoint .metadata", _crafted_step_dir, EXIT_USAGE, "refusing to unpickle posix.system",
        _not_pwned),
    Row("13+15 empty train.run_dir, override after --resume", _empty_run_dir, EXIT_USAGE,
        "train.run_dir is empty (an unset shell variable?)"),
    Row("15 requeue exit code 999", _requeue_code_999, EXIT_USAGE, "--requeue-exit-code must be in 3..125, got 999"),
    Row("2 RGB label maps in every sample", _rgb_label_shards, EXIT_USAGE,
        "label.png has mode RGB; id maps must be single-channel integers"),
    Row("probe YAML config bomb", _config_bomb, EXIT_USAGE, "data.label_nc"),
    Row("probe path traversal in a shard key", _traversal_key, EXIT_USAGE, "unsafe sample key", _nothing_escaped),
    Row("12 --nproc-per-node 0", lambda tmp: (_main("train"), ["--config", str(TINY), "--nproc-per-node", "0"]),
        EXIT_USAGE, "argument --nproc-per-node: must be an integer >= 1, got '0'"),
    Row("12 --nproc-per-node with a bad config value: no worker starts", _launcher_bad_config, EXIT_USAGE,
        "model.ngf"),
    Row("--nproc-per-node beyond the machine (a typo: 1000 for 2): no worker starts",
        lambda tmp: (_main("train"), ["--config", str(TINY), "--nproc-per-node", "1000",
                                      f"train.run_dir={tmp / 'run'}"]),
        EXIT_USAGE, "--nproc-per-node 1000: this machine has", _no_run_dir),
]

# Rows whose tests are not rows of ROWS: the direct tests below (rows 3, 4, 7, 8, 9, 11, 12, 14, 16, 19 and
# the 23-sample training run for rows 1 and 2), and these.
ELSEWHERE = {
    "1 batch of one sample": "tests/test_data_loader.py::test_odd_dataset_with_a_corrupt_sample_gives_full_batches_and_each_good_sample_once",
    "2 bad label ids": "tests/test_generate.py::test_generate_from_shards_through_eval_loader",
    "17 external scontrol requeue": "tests/test_slurm.py::test_external_requeue_checkpoints_and_resumes",
    "18 exit-barrier traceback after a successful 2-node run":
        "tests/test_slurm.py::test_train_two_nodes_to_completion_with_fid_job (and the resumed run of row 17)",
    "rendezvous store port in use": "tests/test_rendezvous_store.py::test_busy_port_is_one_line_and_exit_2",
}


def _run(command: Command, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    target, argv = command
    if target == "subprocess":
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    try:
        code = target(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input_ends_in_one_line(row: Row, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "w"
    work.mkdir()
    before = set(tmp_path.iterdir())
    code, output = _run(row.setup(work), capsys)
    assert "Traceback" not in output, output
    assert code == row.exit_code, output
    error_lines = [line for line in output.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and row.message in error_lines[0], output
    assert set(tmp_path.iterdir()) == before, "wrote outside the test's input directory"
    if row.invariant is not None:
        row.invariant(work)


# ------------------------------------------------------------------------------------------------
# rows that are not a console script: retention, the serve backend, read-only mounts
# ------------------------------------------------------------------------------------------------

def test_row16_image_size_is_checked_from_its_header_before_decoding(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A 144-megapixel image.png (header only: decoding it would fail differently) next to a 12 x 10 label."""
    from spade_dist.data import build_train_loader
    from tests.kit import toy_data_config

    samples = [(f"k{i:03d}", make_sample(f"k{i:03d}", 12, 10, seed=i)) for i in range(4)]
    huge = make_sample("k004x", 12, 10, seed=9)
    huge["image.png"] = _png_header_only(12_000, 12_000)
    samples.append(("k004x", huge))
    write_tar(tmp_path / "huge-train-000000.tar", samples)
    write_manifest(tmp_path, "huge", {"train": [("huge-train-000000.tar", [k for k, _ in samples])]})
    loader = build_train_loader(toy_data_config(str(tmp_path), max_corrupt_fraction=0.5))
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == [f"k{i:03d}" for i in range(4)]
    assert "image is 12000x12000 but label is 12x10" in caplog.text


def test_row7_pruning_never_follows_a_symlinked_step_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = _committed_checkpoint(tmp_path / "other", step=36)
    outside_files = sorted(p.name for p in outside.iterdir())
    run_dir = tmp_path / "run"
    cfg = tiny_config()
    manager = CheckpointManager(run_dir, CheckpointConfig(keep_last=1, async_save=False, existing="delete"), rank=0,
                                world_size=1, config_yaml=cfg.to_yaml(), install_signal_handlers=False)
    assert manager.restore({"x": {"w": torch.zeros(1)}}, resume="none") is None
    # Links planted into the running job's checkpoints/ (a fresh start would have cleared them away).
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / step_dir_name(36)).symlink_to(outside, target_is_directory=True)
    # the link also stands where a later save goes: removed (the link), never written through
    (run_dir / "checkpoints" / step_dir_name(40)).symlink_to(outside, target_is_directory=True)
    for step in (38, 40, 41):
        manager.save(step, {"x": {"w": torch.full((1,), float(step))}})
    manager.close()
    assert (outside / MARKER_NAME).is_file(), "pruning deleted a marker outside the run directory"
    assert sorted(p.name for p in outside.iterdir()) == outside_files
    assert (run_dir / "checkpoints" / step_dir_name(36)).is_symlink()  # left alone
    assert not (run_dir / "checkpoints" / step_dir_name(40)).exists()  # pruned (a real directory by then)
    assert "a symlink" in caplog.text and "Traceback" not in caplog.text


def test_row7_explicit_symlinked_step_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    outside = _committed_checkpoint(tmp_path / "other", step=3)
    link = tmp_path / step_dir_name(3)
    link.symlink_to(outside, target_is_directory=True)
    code, output = _run((_main("export"), ["--checkpoint", str(link), "--out", str(tmp_path / "G.pt")]), capsys)
    assert code == EXIT_USAGE and "a symlink, not a step directory" in output and "Traceback" not in output


def test_row8_chunked_upload_is_refused_while_streaming() -> None:
    app = FastAPI()
    app.add_middleware(BodyLimit, limit=200_000)
    spooled: list[int] = []

    @app.post("/upload")
    async def upload(file: UploadFile = File(...)) -> dict:
        spooled.append(len(await file.read()))
        return {"bytes": spooled[-1]}

    def body(chunks: int):  # a generator body: chunked transfer, no Content-Length
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(chunks):
            yield b"a" * 65536
        yield b"\r\n--b--\r\n"

    client = TestClient(app)
    headers = {"content-type": "multipart/form-data; boundary=b"}
    small = client.post("/upload", content=body(2), headers=headers)
    assert small.status_code == 200 and small.json() == {"bytes": 2 * 65536}
    large = client.post("/upload", content=body(400), headers=headers)  # 26 MB
    assert large.status_code == 413 and "larger than --max-upload-bytes" in large.json()["error"]
    assert spooled == [2 * 65536]  # the route never saw the large body


def test_row14_decompression_bomb_png_is_a_400_not_a_500() -> None:
    from spade_dist.serve.inputs import MAX_UPLOAD_PIXELS, RequestError, decode_label_upload

    with pytest.raises(RequestError, match=f"more than the {MAX_UPLOAD_PIXELS} pixels this server decodes"):
        decode_label_upload(_png_header_only(30_000, 30_000), "bomb.png", (32, 32), 8, True)


@contextmanager
def _tmpfs(mount: Path, size: str, read_only_after: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``mount``; ``read_only_after`` fills it, then it is remounted
    read-only (root ignores permission bits, not a read-only mount)."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        if read_only_after is not None:
            read_only_after(mount)
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def _a_run_dir_with_a_stop_file(mount: Path) -> None:
    (mount / "run").mkdir()
    (mount / "run" / "STOP").write_text("")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    with _tmpfs(tmp_path / "ro", "4m", _a_run_dir_with_a_stop_file) as mount:
        yield mount


def test_row4_read_only_outputs_exit_74_in_one_line(read_only_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    step_dir = _committed_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "samples").mkdir()
    (tmp_path / "run" / "samples" / "step-000000001.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    for command, path in [
        ((_main("export"), ["--checkpoint", str(step_dir), "--out", str(read_only_dir / "G.pt")]), read_only_dir),
        ((_main("run"), ["prepare", str(read_only_dir / "run")]), read_only_dir / "run"),
        ((_main("report"), ["--run-dir", str(step_dir.parent.parent), "--output", str(read_only_dir / "r.html")]),
         read_only_dir / "r.html"),
        (("subprocess", [PYTHON, "-m", "spade_dist.cli.train", "--config", str(TINY), "--resume", "none",
                         f"train.run_dir={read_only_dir / 'train'}"]), read_only_dir / "train"),
    ]:
        code, output = _run(command, capsys)
        assert code == EXIT_ENVIRONMENT and "Traceback" not in output, output
        assert "Read-only file system (EROFS)" in output and str(path) in output, output
    assert (step_dir / MARKER_NAME).is_file()


# ------------------------------------------------------------------------------------------------
# row 12: Ctrl-C (the real trainer and the accelerate path: tests/test_train_cli.py)
# ------------------------------------------------------------------------------------------------

def _toy_loop(run_dir: Path, step_seconds: float = 0.05) -> subprocess.Popen:
    cmd = [PYTHON, str(REPO_ROOT / "tests" / "checkpoint_toy_loop.py"), str(run_dir), "--steps", "400", "--every", "1000",
           "--sleep", str(step_seconds)]
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_steps(run_dir: Path, steps: int) -> None:
    from tests.kit import wait_for

    def logged() -> int:
        path = run_dir / "keys-rank0.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0
    wait_for(lambda: logged() >= steps, 120, f"{steps} training steps", poll=0.05)


def test_row12_ctrl_c_saves_and_exits_like_sigterm_in_one_line(tmp_path: Path) -> None:
    import signal

    from spade_dist.checkpoint.layout import list_step_dirs
    from spade_dist.exit_codes import EXIT_REQUEUE

    proc = _toy_loop(tmp_path)
    _wait_steps(tmp_path, 3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE and "Traceback" not in out, out
    assert [line for line in out.splitlines() if "Ctrl-C" in line] == [
        "spade-train: Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again to abort without it)"]
    committed = [p for p in list_step_dirs(tmp_path / "checkpoints") if (p / MARKER_NAME).is_file()]
    assert len(committed) == 1 and (tmp_path / "REQUEUE").is_file()


def test_row12_second_ctrl_c_aborts_at_once(tmp_path: Path) -> None:
    import signal

    from spade_dist.exit_codes import EXIT_INTERRUPTED

    proc = _toy_loop(tmp_path, step_seconds=4.0)  # the second Ctrl-C comes while the first step still runs
    _wait_steps(tmp_path, 1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # at once: a launcher forwarding the same Ctrl-C, ignored
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in out, out
    assert "aborted by a second Ctrl-C, without a checkpoint" in out


# ------------------------------------------------------------------------------------------------
# row 12 with several processes: spade-train --nproc-per-node 2 is the launcher (spade_dist/launcher.py)
# ------------------------------------------------------------------------------------------------

def _two_ranks(tmp_path: Path, max_steps: int, *extra: str) -> list[str]:
    """spade-train --nproc-per-node 2 on toy shards (made once per test) into tmp_path/run."""
    shards = tmp_path / "shards"
    manifest = shards / "manifest.json" if shards.is_dir() else write_shards(shards, [6, 6], size=(32, 32))
    return train_cmd("--nproc-per-node", "2", f"data.shards={manifest}", *TOY_LABELS, "model.num_D=1",
                     "train.log_every=1", "train.sample_every=100000", "checkpoint.every_steps=100000",
                     f"train.run_dir={tmp_path / 'run'}", f"train.max_steps={max_steps}", *extra)


@contextmanager
def _launched(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """The launcher in its own process group, as a terminal starts a job: a terminal's Ctrl-C is a
    SIGINT to that group (torch's agent puts the workers in sessions of their own)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:  # a failed assertion: the workers die with their launcher
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen) -> None:
    wait_for(lambda: f"step {step} epoch" in log.read_text(errors="replace"), 240, f"step {step} in {log}",
             poll=0.2, procs=[proc], log=lambda: log.read_text(errors="replace")[-3000:])


def _no_launcher_noise(text: str) -> None:
    """No traceback, no ChildFailedError report, none of the agent's own log lines."""
    for noise in ("Traceback", "ChildFailedError", "torch.distributed.elastic", "Sending process", "SignalException"):
        assert noise not in text, text[-4000:]


def _stopped_two_ranks(tmp_path: Path, step: int, stop: Callable[[subprocess.Popen], None]) -> str:
    """Two ranks started, ``stop(launcher)`` after ``step`` steps: exit 75 and no noise; their output."""
    from spade_dist.exit_codes import EXIT_REQUEUE

    log = tmp_path / "train.log"
    with _launched(_two_ranks(tmp_path, max_steps=1000), log) as proc:
        _wait_for_step(log, step, proc)
        stop(proc)
        rc = proc.wait(timeout=180)
    text = log.read_text()
    assert rc == EXIT_REQUEUE, text[-4000:]
    _no_launcher_noise(text)
    return text


@pytest.mark.dist
@pytest.mark.e2e
def test_row12_ctrl_c_with_two_processes_checkpoints_exits_75_in_one_line_and_resumes(tmp_path: Path) -> None:
    from spade_dist.checkpoint import find_latest, read_marker

    run_dir = tmp_path / "run"
    text = _stopped_two_ranks(tmp_path, 2, lambda launcher: os.killpg(launcher.pid, signal.SIGINT))  # a terminal
    stop_dir = find_latest(run_dir)
    stop_step = read_marker(stop_dir)["step"]
    assert json.loads((run_dir / "REQUEUE").read_text())["step"] == stop_step >= 2
    ctrl_c = [line for line in text.splitlines() if "Ctrl-C" in line]
    assert ctrl_c == [
        "spade-train: Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again to abort without it)",
        f"spade-train: stopped by Ctrl-C: checkpoint of step {stop_step} committed and the run asked for a requeue "
        "(worker exit code 75); run the same command again (checkpoint.resume auto) to continue"], text[-4000:]

    resumed = run_cli(_two_ranks(tmp_path, stop_step + 2), timeout=300)
    assert f"resumed from {stop_dir} (step {stop_step}" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "DONE").read_text())["step"] == stop_step + 2
    _no_launcher_noise(resumed.stdout + resumed.stderr)


@pytest.mark.dist
@pytest.mark.e2e
def test_row12_sigterm_to_the_launcher_is_a_preemption_of_both_ranks(tmp_path: Path) -> None:
    # A scheduler signals the launcher's pid, not its process group.
    text = _stopped_two_ranks(tmp_path, 1, lambda launcher: launcher.send_signal(signal.SIGTERM))
    requeue = json.loads((tmp_path / "run" / "REQUEUE").read_text())
    assert requeue["reason"] == "SIGTERM"
    assert text.splitlines()[-1].startswith(f"spade-train: stopped by SIGTERM: checkpoint of step {requeue['step']} "
                                            "committed"), text[-4000:]


@pytest.mark.dist
@pytest.mark.e2e
def test_row12_second_ctrl_c_with_two_processes_aborts_at_once_and_leaves_no_worker(tmp_path: Path) -> None:
    from spade_dist.exit_codes import EXIT_INTERRUPTED

    log = tmp_path / "train.log"
    with _launched(_two_ranks(tmp_path, max_steps=1000), log) as proc:
        _wait_for_step(log, 1, proc)
        workers = child_pids(proc.pid)
        assert len(workers) == 2
        for pid in workers:  # busy workers: the forwarded Ctrl-C waits, as during a long checkpoint save
            os.kill(pid, signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.5)  # a second Ctrl-C, not the same one forwarded twice
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=30)
    text = log.read_text()
    assert rc == EXIT_INTERRUPTED, text[-4000:]
    _no_launcher_noise(text)
    assert text.splitlines()[-1] == ("spade-train: error: aborted by a second Ctrl-C: the workers were stopped "
                                     "without a checkpoint; a resume continues from the last committed one")
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived its launcher"


@pytest.mark.dist
@pytest.mark.e2e
def test_row12_workers_bad_input_exits_2_in_one_launcher_line(tmp_path: Path) -> None:
    proc = run_cli(_two_ranks(tmp_path, 2, "--resume", str(tmp_path / "missing")), check=False, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_USAGE, text[-4000:]
    _no_launcher_noise(text)
    assert str(tmp_path / "missing") in text  # the workers' own line
    assert re.search(r"^spade-train: error: rank [01] failed with exit code 2: bad input; its error line above says "
                     r"what to fix$", text, re.MULTILINE), text[-4000:]


def test_row12_nproc_per_node_inside_another_launcher_is_refused_in_one_line() -> None:
    proc = run_cli(train_cmd("--nproc-per-node", "2"), env=cli_env(TORCHELASTIC_RUN_ID="job-7"), check=False, timeout=120)
    assert proc.returncode == EXIT_USAGE and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == ["spade-train: error: --nproc-per-node: already started by a launcher "
                                        "(TORCHELASTIC_RUN_ID is set): drop --nproc-per-node, or run spade-train "
                                        "without the other launcher"]


# ------------------------------------------------------------------------------------------------
# rows 3 and 11: the run directory's file system fills up; step directories deleted during a run
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB file system: a checkpoint bigger than what is left fails with ENOSPC."""
    with _tmpfs(tmp_path / "small", "3m") as mount:
        yield mount


def test_row3_disk_full_is_one_line_the_partial_step_removed_the_committed_one_intact(small_tmpfs: Path) -> None:
    from spade_dist.checkpoint import CheckpointWriteError, validate_step_dir

    run_dir = small_tmpfs / "run"
    manager = CheckpointManager(run_dir, CheckpointConfig(keep_last=5, async_save=False), rank=0, world_size=1,
                                config_yaml="", install_signal_handlers=False)
    manager.save(1, {"x": {"w": torch.zeros(64 * 1024)}})  # 256 KiB: fits
    with pytest.raises(CheckpointWriteError) as failure:
        manager.save(2, {"x": {"w": torch.zeros(1024 * 1024)}})  # 4 MiB: does not
    manager.close()
    message = str(failure.value)
    assert "\n" not in message and str(run_dir) in message and "No space left on device (ENOSPC)" in message
    needed = int(re.search(r"it needs about (\d+) bytes", message).group(1))
    assert 4 * 1024 * 1024 <= needed < 5 * 1024 * 1024, message  # the tensors, skeletons and RNG states
    assert not (run_dir / "checkpoints" / step_dir_name(2)).exists()  # removed, so a rerun archives nothing
    validate_step_dir(run_dir / "checkpoints" / step_dir_name(1))


def test_row11_step_dir_deleted_while_saving_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """``rm -rf RUN/checkpoints/step-*`` during a save, injected between the data and the marker."""
    import shutil

    from spade_dist.checkpoint import manager as manager_module
    from spade_dist.checkpoint import validate_step_dir

    real_write = manager_module.write_flat_state

    def write_then_delete(flat, step_dir, group):
        real_write(flat, step_dir, group)
        shutil.rmtree(step_dir)

    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=5, async_save=False), rank=0, world_size=1,
                                config_yaml="", install_signal_handlers=False)
    monkeypatch.setattr(manager_module, "write_flat_state", write_then_delete)
    manager.save(1, {"x": {"w": torch.zeros(4)}})  # no exception: a warning
    monkeypatch.setattr(manager_module, "write_flat_state", real_write)
    manager.save(2, {"x": {"w": torch.ones(4)}})  # the next save proceeds
    manager.close()
    assert "was deleted while it was written; skipped, the next save proceeds" in caplog.text
    validate_step_dir(tmp_path / "checkpoints" / step_dir_name(2))


# ------------------------------------------------------------------------------------------------
# rows 1 and 2 end to end: an odd dataset with a corrupt sample trains to DONE, each good sample once
# ------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_odd_dataset_with_a_corrupt_sample_trains_to_done_each_good_sample_once_per_epoch(tmp_path: Path) -> None:
    from collections import Counter

    from tests.kit import TOY_LABELS, audited_keys, run_cli, train_cmd

    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [(f"k{i:03d}", make_sample(f"k{i:03d}", 12, 10, seed=i)) for i in range(22)]
    bad = make_sample("k005x", 12, 10, seed=99)
    bad["label.png"] = make_sample("rgb", 12, 10, seed=98)["image.png"]  # an RGB label map
    samples = sorted(samples + [("k005x", bad)])  # 23 samples: odd
    write_tar(shards / "odd-train-000000.tar", samples)
    manifest = write_manifest(shards, "odd", {"train": [("odd-train-000000.tar", [k for k, _ in samples])]})
    run_dir = tmp_path / "run"
    proc = run_cli(train_cmd("--resume", "none", f"data.shards={manifest}", f"train.run_dir={run_dir}", *TOY_LABELS,
                             "data.max_corrupt_fraction=0.5", "train.max_steps=22", "train.log_keys=true",
                             "train.sample_every=100", "checkpoint.every_steps=100", "eval.mode=none"), timeout=600)
    out = proc.stdout + proc.stderr
    assert json.loads((run_dir / "DONE").read_text())["step"] == 22 and "Traceback" not in out
    assert "k005x" in out  # the skip is logged
    records = [json.loads(line) for line in (run_dir / "logs" / "keys-rank0.jsonl").read_text().splitlines()]
    by_epoch: dict[int, Counter] = {}
    for record in records:
        by_epoch.setdefault(record["epoch"], Counter()).update(audited_keys(record))
    assert sorted(by_epoch) == [0, 1]
    for keys in by_epoch.values():  # 22 good samples trained + the corrupt one retired, each once
        assert sorted(keys) == sorted(k for k, _ in samples) and set(keys.values()) == {1}, keys


# ------------------------------------------------------------------------------------------------
# row 9: a small PNG of many pixels; peak memory of one decode, measured in a fresh process
# ------------------------------------------------------------------------------------------------

_PEAK_PROBE = """
import sys
from pathlib import Path
from spade_dist.serve.inputs import decode_label_upload
from spade_dist.visualize import label_palette
data = Path(sys.argv[1]).read_bytes()
def status_kb(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field + ':')).split()[1])
# VmHWM is this address space's peak; getrusage's ru_maxrss would also count the parent's peak
# (Linux carries it over a fork + exec), i.e. the size of the test process that started this one.
before = status_kb('VmRSS')
label = decode_label_upload(data, 'big.png', (32, 32), 8, True)
assert label.shape == (1, 1, 32, 32) and int(label.max()) == 3, label.unique()
print((status_kb('VmHWM') - before) * 1024)
"""


def test_row9_peak_memory_of_a_large_colour_upload_is_bounded(tmp_path: Path) -> None:
    from PIL import Image

    from spade_dist.serve.inputs import MAX_UPLOAD_PIXELS
    from spade_dist.visualize import label_palette

    side = 8000  # 64 M pixels: just under the pixel cap, a few hundred kB as a PNG
    assert side * side <= MAX_UPLOAD_PIXELS
    colour = tuple(int(c) for c in label_palette(8)[3])
    Image.new("RGB", (side, side), colour).save(tmp_path / "big.png", compress_level=1)
    proc = subprocess.run([PYTHON, "-c", _PEAK_PROBE, str(tmp_path / "big.png")], cwd=REPO_ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    # Pillow's decoded image is 4 bytes a pixel, plus its decoder's buffers; the request adds only bands
    # of rows (the full-size id and colour-code arrays it used to build took several times more).
    assert peak < 8 * side * side, f"one decode peaked {peak} bytes above the process's start"


# ------------------------------------------------------------------------------------------------
# row 19: SIGTERM to the local services wrapper stops Prometheus and the Pushgateway
# ------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_row19_sigterm_to_the_services_wrapper_stops_its_children(tmp_path: Path) -> None:
    import signal
    import socket

    from tests.dist_utils import free_port

    prom_port, gateway_port = free_port(), free_port()
    (tmp_path / "sd").mkdir()
    proc = subprocess.Popen([PYTHON, "-m", "spade_dist.monitoring.services", "--sd-dir", str(tmp_path / "sd"),
                             "--workdir", str(tmp_path / "w"), "--port", str(prom_port), "--pushgateway",
                             "--pushgateway-port", str(gateway_port)], cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # "pushgateway: ..." then "prometheus: ..." once both answer
        lines.append(line)
        if line.startswith("prometheus:"):
            break
    assert lines and lines[-1].startswith("prometheus:"), "".join(lines)
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(children) == 2
    try:
        proc.send_signal(signal.SIGTERM)
        out = proc.stdout.read()
        assert proc.wait(timeout=60) == 0 and "Traceback" not in out, out
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
    finally:  # a failing wrapper must not leave its services running
        for pid in children:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    for port in (prom_port, gateway_port):  # the ports are free again
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
            sock.bind(("127.0.0.1", port))
