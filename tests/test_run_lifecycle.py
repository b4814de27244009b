"""Run directory lifecycle: layout (RunDir / spade-run), lineage + retention, the owner lock."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from spade_dist.checkpoint import CheckpointManager, ExistingCheckpointsError, find_latest, read_marker
from spade_dist.checkpoint.layout import prune, write_marker
from spade_dist.config import CheckpointConfig
from spade_dist.files import read_jsonl
from spade_dist.run_dir import PATH_NAMES, RunDir, RunDirBusy, RunLock
from tests.checkpoint_toy_loop import ToyTrainState
from tests.dist_utils import process_alive
from tests.kit import PYTHON, REPO_ROOT, cli_env, wait_for


def _cfg(**kw) -> CheckpointConfig:
    base = dict(every_steps=0, keep_last=3, async_save=False, resume="auto")
    base.update(kw)
    return CheckpointConfig(**base)


def _run_toy(run_dir: Path, steps: list[int], resume: str, **cfg) -> CheckpointManager:
    """A trainer's checkpoint life: restore per ``resume``, then save ``steps``."""
    state = ToyTrainState()
    mgr = CheckpointManager(run_dir, _cfg(**cfg), install_signal_handlers=False)
    try:
        mgr.restore({"train": state}, resume=resume)
        for s in steps:
            state.step = s
            mgr.save(s, {"train": state}, blocking=True)
    finally:
        mgr.close()
    return mgr


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------


def test_spade_run_answers_paths_and_outcome(tmp_path):
    run = RunDir(tmp_path / "r")
    out = subprocess.run([PYTHON, "-m", "spade_dist.cli.run", "path", "--run-dir", str(run.root), *PATH_NAMES],
                         capture_output=True, text=True, env=cli_env(), check=True).stdout.split()
    assert out == [str(run.path(n)) for n in PATH_NAMES]
    assert out[PATH_NAMES.index("stop")] == str(run.root / "STOP")

    def outcome() -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "spade_dist.cli.run", "outcome", "--run-dir", str(run.root)],
                              capture_output=True, text=True, env=cli_env())

    missing = outcome()  # a typo must not look like a resumable run
    assert missing.returncode == 2 and missing.stderr.startswith("spade-run: error: run directory not found")
    with RunLock(run):  # what a trainer's first moment leaves
        pass
    assert outcome().stdout.strip() == "incomplete"
    run.request_requeue(7, "stop-file", 75)
    assert outcome().stdout.strip() == "requeue 7"
    run.clear_start_markers()
    run.mark_done(9)
    assert outcome().stdout.strip() == "done 9"
    assert oct(run.done.stat().st_mode & 0o777) == "0o644"
    bad = subprocess.run([PYTHON, "-m", "spade_dist.cli.run", "path", "--run-dir", str(run.root), "nope"],
                         capture_output=True, text=True, env=cli_env())
    assert bad.returncode == 2 and "unknown entry 'nope'" in bad.stderr


# ----------------------------------------------------------------------------------------------
# lineage + retention (issue case 1)
# ----------------------------------------------------------------------------------------------


def test_fresh_start_over_another_runs_checkpoints_refuses_then_archives(tmp_path):
    """A `--resume none` rerun into a longer run's directory used to prune its own new checkpoints
    (the old run's higher steps filled keep_last) and leave the old run's step for spade-export."""
    _run_toy(tmp_path, [10, 20, 29], resume="none")
    with pytest.raises(ExistingCheckpointsError, match=r"holds another run \(3 checkpoint\(s\), newest step-000000029"):
        _run_toy(tmp_path, [4, 8, 12], resume="none")
    assert _steps(tmp_path) == [10, 20, 29]  # refused before touching anything

    _run_toy(tmp_path, [4, 8, 12], resume="none", existing="archive", keep_last=2)
    assert _steps(tmp_path) == [8, 12]
    assert find_latest(tmp_path).name == "step-000000012"
    archived = sorted(p.name for p in (tmp_path / "archive").glob("*-previous-run/checkpoints/step-*"))
    assert archived == ["step-000000010", "step-000000020", "step-000000029"]

    _run_toy(tmp_path, [5], resume="none", existing="delete")
    assert _steps(tmp_path) == [5]


def _earlier_run_outputs(run: RunDir, tag: str) -> None:
    """What a trainer, its FID watcher and spade-report leave beside the checkpoints."""
    for folder, name in ((run.logs, "train_metrics.jsonl"), (run.samples, "step-000000010.png"),
                         (run.tensorboard, "events.out.tfevents.1"), (run.eval, "metrics.jsonl")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(tag)
    for path in (run.report, run.config, run.done, run.speed_paths):
        path.write_text(tag)


def test_a_fresh_start_moves_the_whole_earlier_run_aside_and_bounds_the_archive(tmp_path, caplog):
    """Not only checkpoints: logs, samples, TensorBoard, FID results, report and markers of the earlier
    run go with it (issue: a rerun mixed two runs); archive/ keeps checkpoint.keep_archives folders."""
    run = RunDir(tmp_path)
    _run_toy(tmp_path, [10, 20], resume="none")
    _earlier_run_outputs(run, "first")
    _run_toy(tmp_path, [4], resume="none", existing="archive", keep_archives=2)
    (first,) = run.archive.glob("*-previous-run")
    assert sorted(p.name for p in first.iterdir()) == sorted(
        ["checkpoints", "logs", "samples", "tensorboard", "eval", "report.html", "config.yaml", "DONE",
         "speed_paths.json"])
    assert (first / "logs" / "train_metrics.jsonl").read_text() == "first"
    assert run.previous_run() == [run.checkpoints]  # only the new run's step-4 is left
    assert "moved the earlier run in" in caplog.text and " kB)" in caplog.text  # with its size

    # An earlier run without checkpoints (stopped before its first one) is moved aside even under
    # refuse: there is nothing to resume, and its logs must not mix with the new run's.
    _earlier_run_outputs(run, "second")
    _run_toy(tmp_path, [], resume="none", existing="archive")
    _earlier_run_outputs(run, "third")
    caplog.clear()
    _run_toy(tmp_path, [], resume="auto")
    slots = sorted(run.archive.iterdir())
    assert len(slots) == 2 and first not in slots  # keep_archives=2: the oldest went, and the log says so
    assert (slots[-1] / "logs" / "train_metrics.jsonl").read_text() == "third"
    assert f"deleted older archive(s) {slots[0].name}" not in caplog.text
    assert "deleted older archive(s)" in caplog.text and "checkpoint.keep_archives=2" in caplog.text

    _earlier_run_outputs(run, "fourth")
    _run_toy(tmp_path, [2], resume="none", existing="delete")
    assert run.previous_run() == [run.checkpoints] and _steps(tmp_path) == [2]
    assert len(list(run.archive.iterdir())) == 2  # delete archives nothing


def test_fallback_past_corrupt_checkpoints_keeps_new_ones(tmp_path):
    """After a resume falls back past corrupt checkpoints, the new ones used to be pruned at once
    (the corrupt higher steps counted toward keep_last)."""
    _run_toy(tmp_path, [2, 4, 6], resume="none", keep_last=3)
    for step in (4, 6):
        data = next((tmp_path / "checkpoints" / f"step-{step:09d}").glob("*.distcp"))
        data.write_bytes(data.read_bytes()[:-5])
    mgr = _run_toy(tmp_path, [3], resume="auto", keep_last=1)
    assert _steps(tmp_path) == [3]  # step 2 pruned by retention; 4 and 6 moved aside
    assert read_marker(tmp_path / "checkpoints" / "step-000000003")["lineage"] == mgr.lineage
    assert sorted(p.name for p in (tmp_path / "archive").glob("*-invalid/step-*")) == ["step-000000004", "step-000000006"]


def test_explicit_rewind_moves_the_abandoned_future_aside(tmp_path):
    _run_toy(tmp_path, [2, 4, 6], resume="none")
    _run_toy(tmp_path, [3], resume=str(tmp_path / "checkpoints" / "step-000000002"))
    assert _steps(tmp_path) == [2, 3] and find_latest(tmp_path).name == "step-000000003"
    assert sorted(p.name for p in (tmp_path / "archive").glob("*-superseded/step-*")) == ["step-000000004", "step-000000006"]


def test_prune_touches_only_older_checkpoints_of_the_lineage(tmp_path):
    ckpts = tmp_path / "checkpoints"

    def commit(step: int, lineage: str) -> None:
        d = ckpts / f"step-{step:09d}"
        d.mkdir(parents=True)
        (d / "x.distcp").write_bytes(b"x")
        write_marker(d, step, 1, {"lineage": lineage})

    for step in (20, 30):
        commit(step, "old")
    for step in (4, 8, 12):
        commit(step, "new")
    commit(16, "new")  # a higher step of the same lineage (a rewound run's future): not older, kept
    removed = prune(ckpts, keep_last=1, keep_every=0, lineage="new", committed_step=12)
    assert sorted(p.name for p in removed) == ["step-000000004", "step-000000008"]
    assert _steps(tmp_path) == [12, 16, 20, 30]


# ----------------------------------------------------------------------------------------------
# the owner lock (issue case 2)
# ----------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from spade_dist.run_dir import RunDir, RunLock
RunLock(RunDir(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(run_dir: Path, seconds: float, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-c", HOLDER, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env=cli_env(**env), cwd=REPO_ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_owner_refuses_naming_the_owner_and_dead_owner_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "2002")
    holder = _holder(tmp_path, 600, SLURM_JOB_ID="1001")
    try:
        started = time.monotonic()
        with pytest.raises(RunDirBusy) as err:
            RunLock(RunDir(tmp_path)).acquire()
        assert time.monotonic() - started < 15
        text = str(err.value)
        assert f"pid {holder.pid}" in text and "Slurm job 1001" in text and "scancel 1001" in text
        assert "\n" not in text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 released the lock: the next job takes over and records itself.
    with RunLock(RunDir(tmp_path)) as lock:
        owner = RunDir(tmp_path).read_owner()
        assert owner == lock.owner and owner.pid == os.getpid() and owner.slurm_job_id == "2002"
    assert RunDir(tmp_path).read_owner() is None  # released: no stale owner record


@pytest.mark.parametrize("var", ["SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"])
def test_restart_of_the_same_job_waits_for_its_previous_incarnation(tmp_path, monkeypatch, var):
    """A Slurm requeue or an elastic worker restart must not be refused by its own previous rank 0."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv(var, "job-42")
    holder = _holder(tmp_path, 2.0, **{var: "job-42"})
    try:
        with RunLock(RunDir(tmp_path)) as lock:
            assert holder.poll() is not None  # acquired only once the old holder was gone
            assert lock.owner.pid == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_spade_train_on_an_owned_run_dir_exits_2_in_one_line(tmp_path):
    holder = _holder(tmp_path / "run", 600)
    try:
        proc = subprocess.run([PYTHON, "-m", "spade_dist.cli.train", "--config", "configs/quickstart.yaml",
                               f"train.run_dir={tmp_path / 'run'}", "data.shards=unused.tar"],
                              capture_output=True, text=True, env=cli_env(), cwd=REPO_ROOT, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("spade-train: error: run directory") and f"pid {holder.pid}" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before writing anything


# ----------------------------------------------------------------------------------------------
# no orphans (issue case 2, second half)
# ----------------------------------------------------------------------------------------------

def test_die_with_parent_kills_the_child_when_its_parent_is_killed(tmp_path):
    """The parent-death signal itself, any launcher: an intermediate process (the launcher) is
    killed with -9; its child (the worker) must not survive it."""
    pid_file = tmp_path / "child.pid"
    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys, time\nfrom spade_dist.workers import die_with_parent\ndie_with_parent()\n"
                      "open(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    launcher = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(worker)!r}, {str(pid_file)!r}])\n"
                "time.sleep(600)\n")
    proc = subprocess.Popen([PYTHON, "-c", launcher], env=cli_env(), cwd=REPO_ROOT)
    wait_for(lambda: pid_file.exists() and bool(pid_file.read_text()), 120, "the child to start", poll=0.1)
    child = int(pid_file.read_text())
    proc.kill()
    proc.wait()
    _assert_gone([child], 30)


def _pids_of(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (the test's unique run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def _assert_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if process_alive(p)]
        if not alive:
            return
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"processes outlived their launcher: {alive}")


@pytest.mark.e2e
@pytest.mark.dist
@pytest.mark.parametrize("how", ["sigusr1", "kill9"])
def test_accelerate_workers_die_with_their_launcher(tmp_path, how):
    """kill -9 of `accelerate launch` or an (unhandled) SIGUSR1 to it used to leave both workers
    running as orphans that kept checkpointing into the run directory."""
    from tests.kit import accelerate_launcher, synthetic_shards, train_cmd

    manifest = synthetic_shards(tmp_path / "data", count=8, val_count=2)
    run_dir = tmp_path / f"run-{how}"
    cmd = train_cmd("--resume", "none", f"data.shards={manifest}", f"train.run_dir={run_dir}", "train.max_steps=100000",
                    "checkpoint.every_steps=2", "checkpoint.async_save=false", launcher=accelerate_launcher())
    launcher = subprocess.Popen(cmd, env=cli_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_for((run_dir / "checkpoints" / "step-000000002" / "COMMITTED").exists, 400, "training to reach step 2",
                 procs=[launcher])
        workers = [p for p in _pids_of(str(run_dir)) if p != launcher.pid]
        assert len(workers) >= 2, workers
        if how == "kill9":
            os.killpg(launcher.pid, signal.SIGKILL)
        else:
            launcher.send_signal(signal.SIGUSR1)
        launcher.wait(timeout=60)
        _assert_gone(workers, 60)
    finally:
        for pid in _pids_of(str(run_dir)):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    # Nobody holds the run any more: a new trainer could take over at once.
    with RunLock(RunDir(run_dir), busy_wait_s=0):
        pass


# ----------------------------------------------------------------------------------------------
# the requeue protocol (issue case 3)
# ----------------------------------------------------------------------------------------------

def _verdict(run_dir: Path, rc: int, preempted: bool = False) -> list[str]:
    cmd = [PYTHON, "-m", "spade_dist.cli.run", "verdict", str(run_dir), "--rc", str(rc), "--requeue-exit-code", "75"]
    out = subprocess.run(cmd + (["--preempted"] if preempted else []), capture_output=True, text=True,
                         env=cli_env(), check=True).stdout.strip()
    return out.split(" ", 2)


def test_batch_script_verdict_follows_the_markers_not_the_exit_code(tmp_path):
    """The script used to requeue whenever its USR1 trap fired (whatever happened), to miss a requeue
    when accelerate turned 75 into 1, and to log "failed with exit code 0" for rc 0 without DONE."""
    run = RunDir(tmp_path)
    assert _verdict(tmp_path, 0) == ["failed", "1", "training failed: the launcher exited 0 but the run wrote neither DONE nor REQUEUE"]
    action, code, text = _verdict(tmp_path, 1, preempted=True)
    assert (action, code) == ("failed", "1") and "not requeueing" in text
    run.request_requeue(12, "stop-file:STOP", 75)
    action, code, text = _verdict(tmp_path, 1)  # accelerate's translation of the worker's 75
    assert (action, code) == ("requeue", "75") and "step 12" in text and "exit code 1" in text
    run.clear_launch_markers()
    run.mark_done(20)
    assert _verdict(tmp_path, 0) == ["finished", "0", "training finished at step 20"]
    assert _verdict(tmp_path, 137)[:2] == ["failed", "137"]


def test_checkpoint_and_stop_writes_the_requeue_marker(tmp_path):
    """The manager's stop path (signal / STOP file) leaves REQUEUE with the committed step."""
    state = ToyTrainState()
    mgr = CheckpointManager(tmp_path, _cfg(), install_signal_handlers=False)
    try:
        mgr.restore({"train": state}, resume="none")
        RunDir(tmp_path).stop.touch()
        state.step = 3
        assert mgr.should_stop()
        mgr.save(3, {"train": state}, blocking=True)
        mgr.request_requeue(3)
    finally:
        mgr.close()
    request = RunDir(tmp_path).requeue_request()
    assert request["step"] == 3 and request["exit_code"] == 75 and request["reason"].startswith("stop-file:")
    assert RunDir(tmp_path).outcome() == ("requeue", 3)


def test_spade_train_fresh_start_over_old_checkpoints_is_one_line_exit_2(tmp_path):
    """What launch/quickstart.sh did on every rerun (`--resume none` into the same run directory)."""
    from tests.kit import synthetic_shards, train_cmd

    manifest = synthetic_shards(tmp_path / "data", count=8, val_count=2)
    run_dir = tmp_path / "run"
    _run_toy(run_dir, [29], resume="none")
    proc = subprocess.run(train_cmd("--resume", "none", f"data.shards={manifest}", f"train.run_dir={run_dir}",
                                    "train.max_steps=2"),
                          capture_output=True, text=True, env=cli_env(), cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("spade-train: error:") and "step-000000029" in last and "checkpoint.existing=archive" in last
    assert not (run_dir / "config.yaml").exists() and _steps(run_dir) == [29]


# ----------------------------------------------------------------------------------------------
# a user's rerun: the quickstart twice into one run directory
# ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow  # three / two spade-train runs
def test_a_rerun_into_the_same_directory_never_mixes_two_runs(tmp_path):
    """``QUICKSTART_STEPS=... ./launch/quickstart.sh`` twice: the second run's report, samples, logs and
    TensorBoard events are its own; the first run is in archive/ whole, its size printed."""
    from spade_dist.monitoring.report import latest_samples, run_summary
    from tests.kit import run_cli, synthetic_shards, train_cmd

    manifest = synthetic_shards(tmp_path / "data", count=8, val_count=2)
    run = RunDir(tmp_path / "run")
    common = ["--resume", "none", f"data.shards={manifest}", f"train.run_dir={run.root}", "train.log_every=2",
              "train.sample_every=2", "checkpoint.every_steps=2", "train.trackers=[tensorboard]",
              "checkpoint.existing=archive"]
    run_cli(train_cmd(*common, "train.max_steps=6"), timeout=600)
    second = run_cli(train_cmd(*common, "train.max_steps=4"), timeout=600)
    assert re.search(r"moved the earlier run in .* to .*-previous-run \(\d+\.\d [kMG]B\)", second.stderr), second.stderr

    summary = dict(run_summary(run.root))
    assert summary["Last logged step"].startswith("4 ") and summary["Status"] == "finished at step 4"
    assert sorted(step for step, _ in latest_samples(run.root, 10)) == [2, 4]
    assert [r["step"] for r in read_jsonl(run.train_metrics_log)] == [2, 4]
    (archived,) = run.archive.glob("*-previous-run")
    events = sorted(run.tensorboard.rglob("events.out.tfevents.*"))  # one run's event files, not two runs'
    assert events and len(events) == len(list((archived / "tensorboard").rglob("events.out.tfevents.*")))
    assert sorted(step for step, _ in latest_samples(archived, 10)) == [2, 4, 6]
    assert _steps(archived)[-1] == 6 and json.loads((archived / "DONE").read_text())["step"] == 6
