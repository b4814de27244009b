"""Chaos: a seeded random sequence of disruptions of a 2-process run, each followed by the documented
recovery, with the run's invariants checked after every step.

The run is the checkpoint toy loop under torchrun (2 gloo ranks, async saves, the real
CheckpointManager with its owner lock, lineage, retention and REQUEUE marker): the lifecycle code is
exactly spade-train's, and a launch costs seconds, not a model build. Disruptions: kill -9 of a rank, of
the launcher, of everything during an async save; the STOP file; SIGUSR1 to a rank; truncation of the
newest checkpoint; a second trainer on the run. Recovery is what a batch script does: clear stale markers
(spade-run prepare) and start again with --resume auto.

Invariants after each recovery:
- the newest valid checkpoint is never older than the newest one reported committed (commits.jsonl),
  except for checkpoints the test destroyed itself;
- no committed checkpoint of the lineage is lost except by retention (keep_last=2);
- the key audit shows every sample of each completed epoch used exactly once over the committed history;
- at the end DONE's step equals the newest checkpoint's step; no process outlives the test.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from spade_dist.checkpoint import find_latest, read_marker
from spade_dist.run_dir import RunDir
from tests.checkpoint_toy_loop import NUM_SAMPLES
from tests.dist_utils import process_alive
from tests.kit import PYTHON, REPO_ROOT, cli_env, wait_for

TOY_LOOP = Path(__file__).resolve().parent / "checkpoint_toy_loop.py"
TORCHRUN = Path(PYTHON).parent / "torchrun"
STEPS = 120  # 20 epochs of 6 steps (24 samples / (2 ranks x batch 2))
STEPS_PER_EPOCH = NUM_SAMPLES // 4
KEEP_LAST = 2  # the toy loop's retention
KINDS = ["kill_rank", "kill_launcher", "kill_all_during_save", "stop_file", "sigusr1", "truncate_newest",
         "second_trainer"]


def _worker_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the toy loop workers of ``run_dir`` (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not process_alive(int(entry.name)) or str(run_dir).encode() not in cmd or not any(c.endswith(b"checkpoint_toy_loop.py") for c in cmd[:3]):
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = int(entry.name)
    return found


class Chaos:
    def __init__(self, run_dir: Path, log_dir: Path) -> None:
        self.run_dir, self.log_dir = run_dir, log_dir
        self.run = RunDir(run_dir)
        self.proc: subprocess.Popen | None = None
        self.destroyed: set[int] = set()  # committed steps the test truncated itself
        self.launches = 0

    # ----------------------------------------------------------------- launching
    def start(self, sleep: float = 0.25) -> subprocess.Popen:
        subprocess.run([PYTHON, "-m", "spade_dist.cli.run", "prepare", "--run-dir", str(self.run_dir)], check=True, env=cli_env())
        self.launches += 1
        log = open(self.log_dir / f"launch-{self.launches}.log", "w")
        cmd = [str(TORCHRUN), "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
               str(TOY_LOOP), str(self.run_dir), "--steps", str(STEPS), "--every", "2", "--sleep", str(sleep),
               "--ballast-mb", "24"]
        proc = subprocess.Popen(cmd, env=cli_env(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        return proc

    def launch(self) -> None:
        self.proc = self.start()

    def wait_for_progress(self, timeout: float = 90) -> None:
        """Until the live run committed a checkpoint newer than any before its start."""
        start = max(self.commits(), default=0)
        assert self.proc is not None
        wait_for(lambda: max(self.commits(), default=0) > start and len(_worker_pids(self.run_dir)) == 2, timeout,
                 "a new committed checkpoint", poll=0.05, procs=[self.proc], log=self.tail)

    def finish(self, proc: subprocess.Popen, timeout: float = 90) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher did not exit: {self.tail()}") from None

    def tail(self) -> str:
        return (self.log_dir / f"launch-{self.launches}.log").read_text()[-3000:]

    def no_processes_left(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while _worker_pids(self.run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _worker_pids(self.run_dir)
        for pid in left.values():
            os.kill(pid, signal.SIGKILL)
        assert not left, f"workers outlived their launcher: {left}"

    # ----------------------------------------------------------------- disruptions
    def kill_rank(self) -> None:
        os.kill(_worker_pids(self.run_dir)[1], signal.SIGKILL)
        assert self.finish(self.proc) != 0

    def kill_launcher(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def kill_all_during_save(self) -> None:
        """kill -9 of the launcher and both ranks while a step directory has no COMMITTED marker yet."""
        deadline = time.monotonic() + 30
        torn: list[Path] = []
        while not torn and time.monotonic() < deadline:
            torn = [p for p in self.run.checkpoints.glob("step-*") if not (p / "COMMITTED").exists()]
            time.sleep(0.005)
        for pid in _worker_pids(self.run_dir).values():
            os.kill(pid, signal.SIGKILL)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        print(f"kill_all_during_save: torn step directory at the kill: {[p.name for p in torn]}", flush=True)

    def _expect_requeue(self) -> None:
        self.finish(self.proc)  # torchrun reports its own code: the marker is what counts
        assert self.run.outcome()[0] == "requeue", self.tail()
        assert self.run.requeue_request()["step"] == max(self.commits())

    def stop_file(self) -> None:
        self.run.stop.touch()
        self._expect_requeue()

    def sigusr1(self) -> None:
        os.kill(_worker_pids(self.run_dir)[0], signal.SIGUSR1)
        self._expect_requeue()

    def truncate_newest(self) -> None:
        """Stop the run cleanly, then truncate a data file of its newest checkpoint (a filesystem fault)."""
        self.stop_file()
        newest = find_latest(self.run_dir)
        data = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        self.destroyed.add(read_marker(newest)["step"])

    def second_trainer(self) -> None:
        started = time.monotonic()
        second = self.start()
        rc = self.finish(second, timeout=120)
        assert rc != 0 and "is owned by" in self.tail(), self.tail()
        assert time.monotonic() - started < 60
        self.launches -= 1  # the live run's log is the previous one
        assert self.proc.poll() is None, "the second trainer disturbed the first"
        self.kill_launcher()  # then the first goes away too (recovery as usual)

    # ----------------------------------------------------------------- invariants
    def commits(self) -> list[int]:
        path = self.run_dir / "commits.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    def check(self) -> None:
        records = [json.loads(line) for line in (self.run_dir / "commits.jsonl").read_text().splitlines()]
        reported = [r["step"] for r in records if r["step"] not in self.destroyed]
        newest = read_marker(find_latest(self.run_dir))["step"]
        assert newest >= max(reported), (newest, reported)
        present = {int(p.name[5:]) for p in self.run.checkpoints.glob("step-*") if (p / "COMMITTED").exists()}
        for i, rec in enumerate(records):
            later_same_lineage = {r["step"] for r in records[i + 1:] if r["lineage"] == rec["lineage"] and r["step"] > rec["step"]}
            lost = rec["step"] not in present and rec["step"] not in self.destroyed
            assert not lost or len(later_same_lineage) >= KEEP_LAST - 0, (rec, present, records)
        self.check_keys()

    def check_keys(self) -> None:
        """Every sample of each completed epoch exactly once over the committed history."""
        by_epoch: dict[int, Counter] = {}
        for path in sorted(self.run_dir.glob("keys-rank*.jsonl")):
            history: list[dict] = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by kill -9
                while history and history[-1]["step"] >= rec["step"]:
                    history.pop()  # steps after the checkpoint a restart resumed from: not committed history
                history.append(rec)
            resumed_from = read_marker(find_latest(self.run_dir))["step"]
            for rec in history:
                if rec["step"] <= resumed_from:
                    by_epoch.setdefault(rec["epoch"], Counter()).update(rec["ids"])
        complete = read_marker(find_latest(self.run_dir))["step"] // STEPS_PER_EPOCH
        for epoch in range(complete):
            counts = by_epoch.get(epoch, Counter())
            assert sorted(counts) == list(range(NUM_SAMPLES)) and set(counts.values()) == {1}, (epoch, counts)


@pytest.mark.dist
@pytest.mark.timeout(600)  # ~1.5 min on a quiet 2-core machine; generous for a loaded one
def test_seeded_disruptions_keep_the_run_invariants(tmp_path):
    rng = random.Random(19)
    plan = KINDS + rng.sample(KINDS, 1)
    rng.shuffle(plan)
    assert len(plan) >= 8 and set(plan) == set(KINDS)
    chaos = Chaos(tmp_path / "run", tmp_path)
    try:
        for kind in plan:
            t0 = time.monotonic()
            chaos.launch()
            chaos.wait_for_progress()
            t1 = time.monotonic()
            getattr(chaos, kind)()
            chaos.no_processes_left()
            chaos.check()
            print(f"{kind}: launch+progress {t1 - t0:.1f}s, disruption+recovery checks {time.monotonic() - t1:.1f}s", flush=True)
        chaos.proc = chaos.start(sleep=0.0)
        assert chaos.finish(chaos.proc, timeout=180) == 0, chaos.tail()
        chaos.no_processes_left()
        chaos.check()
        done = json.loads(chaos.run.done.read_text())
        assert done["step"] == STEPS == read_marker(find_latest(chaos.run_dir))["step"]
    finally:
        for pid in _worker_pids(chaos.run_dir).values():
            os.kill(pid, signal.SIGKILL)
        if chaos.proc is not None and chaos.proc.poll() is None:
            os.killpg(chaos.proc.pid, signal.SIGKILL)
