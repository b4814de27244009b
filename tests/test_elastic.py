"""Elastic membership with real torchrun agents (launch/elastic.sh, c10d rendezvous, --nnodes=1:2) on
one machine: a node (agent + its worker) is killed mid-epoch and the survivor finishes at world size 1;
a second node joins a running one-node job and the run goes on at world size 2. Both check, over the
committed history, that every sample of every epoch was trained exactly once, that the checkpoint
steps follow each other and that the lr schedule followed the epochs (docs/ELASTIC.md)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from spade_dist.checkpoint import find_latest, read_marker
from spade_dist.config import OptimConfig
from spade_dist.train.schedule import decay_factor, lr_and_betas
from spade_dist.workers import child_pids
from tests.dist_utils import free_port
from tests.kit import TINY, TOY_LABELS, audited_keys, cli_env, wait_for, write_shards

SHARDS = [6, 6, 6, 6]
NUM_SAMPLES = sum(SHARDS)  # 24: 6 steps per epoch on 2 ranks, 12 on 1 (batch 2 per rank)
BATCH = 2
OPTIM = OptimConfig(lr=0.002, niter=0, niter_decay=2)  # 2 epochs; epoch 1 trains at half the lr


def _overrides(manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.shards={manifest}", "data.val_shards=", *TOY_LABELS, f"data.batch_size={BATCH}", "model.num_D=1",
        f"optim.lr={OPTIM.lr}", f"optim.niter={OPTIM.niter}", f"optim.niter_decay={OPTIM.niter_decay}",
        "train.max_steps=0", "train.log_every=1", "train.sample_every=100000", "train.log_keys=true",
        "train.collective_timeout_s=30", "checkpoint.every_steps=2", "checkpoint.keep_last=50",
        "metrics.enabled=false", f"train.run_dir={run_dir}", *extra,
    ]


class Agent:
    """One `launch/elastic.sh` (torchrun agent + its worker) in its own process group, like a node."""

    def __init__(self, repo_root: Path, tmp_path: Path, name: str, endpoint: str, args: list[str],
                 last_call_s: int = 2) -> None:
        self.log = tmp_path / f"agent-{name}.log"
        env = cli_env(SPADE_RDZV_ENDPOINT=endpoint, SPADE_NNODES="1:2", SPADE_RDZV_ID=f"elastic-test-{tmp_path.name}",
                      SPADE_MAX_RESTARTS="2", SPADE_LAST_CALL_S=str(last_call_s), SPADE_MONITOR_S="0.5")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([str(repo_root / "launch" / "elastic.sh"), *args], cwd=repo_root, env=env,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_node(self) -> None:
        """The node goes away: the agent and its workers die at once. (torchrun starts each worker in
        a session of its own: killing the agent's process group alone would leave them running.)"""
        workers = child_pids(self.proc.pid)
        assert workers, "the agent has no worker to kill"
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _wait_until(what: str, ready, agents: list[Agent], timeout: float) -> None:
    wait_for(ready, timeout, what, poll=0.2, procs=[a.proc for a in agents],
             log=lambda: "\n---\n".join(a.text()[-3000:] for a in agents))


def _listening(endpoint: str) -> bool:
    host, port = endpoint.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def _committed(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step:09d}" / "COMMITTED").exists()


def committed_history(run_dir: Path) -> list[dict]:
    """The key-audit records that belong to the committed history, one per (step, rank).

    Every (re)start writes ``resumed_from`` (its checkpoint step) into its records. The starts, in
    increasing ``resumed_from`` order, each continue from a checkpoint of the previous one: a record
    is committed when its step is <= the step the next start resumed from (the last start's all).
    """
    records = [json.loads(line) for path in sorted((run_dir / "logs").glob("keys-rank*.jsonl"))
               for line in path.read_text().splitlines()]
    starts = sorted({r["resumed_from"] for r in records})
    next_start = dict(zip(starts, starts[1:] + [None]))
    return [r for r in records if next_start[r["resumed_from"]] is None or r["step"] <= next_start[r["resumed_from"]]]


def _audit(run_dir: Path, expected_worlds: list[int]) -> list[dict]:
    history = committed_history(run_dir)
    starts = sorted({r["resumed_from"] for r in history})
    worlds = [next(r["world_size"] for r in history if r["resumed_from"] == s) for s in starts]
    assert worlds == expected_worlds, (starts, worlds)
    # Each committed step was trained once by every rank of its start's world, and steps follow each other.
    per_step = Counter(r["step"] for r in history)
    final = json.loads((run_dir / "DONE").read_text())["step"]
    assert sorted(per_step) == list(range(1, final + 1)), sorted(per_step)
    for r in history:
        assert per_step[r["step"]] == r["world_size"], (r["step"], per_step[r["step"]], r["world_size"])
    # Every sample of every epoch exactly once, both epochs complete.
    by_epoch: dict[int, Counter] = {}
    for r in history:
        by_epoch.setdefault(r["epoch"], Counter()).update(audited_keys(r))
    assert sorted(by_epoch) == [0, 1], sorted(by_epoch)
    for epoch, keys in by_epoch.items():
        assert len(keys) == NUM_SAMPLES and set(keys.values()) == {1}, (epoch, keys)
    # Checkpoints: every resume point is a committed checkpoint of the previous world size, the last one is DONE's.
    for start, world in zip(starts[1:], worlds):
        assert read_marker(run_dir / "checkpoints" / f"step-{start:09d}")["world_size"] == world
    assert read_marker(find_latest(run_dir))["step"] == final
    return history


def _check_lr_schedule(text: str) -> None:
    """Every logged step's lr is the schedule's value for the epoch it logged (epoch 1: half)."""
    lr_G, lr_D, _ = lr_and_betas(OPTIM)
    seen = set()
    for line in text.splitlines():
        if "[spade-train] step " not in line or " lr G " not in line:
            continue
        epoch = int(line.split(" epoch ")[1].split()[0])
        logged_G, logged_D = (float(v) for v in line.split(" lr G ")[1].split(" | ")[0].split(" D "))
        factor = decay_factor(epoch, OPTIM.niter, OPTIM.niter_decay)
        assert logged_G == pytest.approx(lr_G * factor, rel=1e-2) and logged_D == pytest.approx(lr_D * factor, rel=1e-2), line
        seen.add(epoch)
    assert seen == {0, 1}, seen


def _start_pair(repo_root: Path, tmp_path: Path, *extra: str):
    manifest = write_shards(tmp_path / "shards", SHARDS, size=(32, 32))
    run_dir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["--config", str(TINY), *_overrides(manifest, run_dir, *extra)]
    return run_dir, endpoint, args


@pytest.mark.parametrize("env, message", [
    ({}, "SPADE_RDZV_ENDPOINT=: expected host:port"),
    ({"SPADE_RDZV_ENDPOINT": "head:29400", "SPADE_NNODES": "2-4"}, "SPADE_NNODES=2-4: expected MIN:MAX"),
    ({"SPADE_RDZV_ENDPOINT": "head:29400", "SPADE_MAX_RESTARTS": "many"}, "SPADE_MAX_RESTARTS=many: expected a whole number"),
    ({"SPADE_RDZV_ENDPOINT": "head:29400", "SPADE_TORCHRUN": "/nonexistent/torchrun"}, "torchrun not found at /nonexistent/torchrun"),
])
def test_launch_script_rejects_bad_settings_with_exit_2(repo_root, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPADE_")}
    proc = subprocess.run([str(repo_root / "launch" / "elastic.sh"), "--config", "x.yaml"], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.e2e
@pytest.mark.dist
def test_node_killed_mid_epoch_survivor_finishes_at_world_size_one(repo_root, tmp_path):
    """Default batch policy: the per-rank batch is kept, the global batch halves with the world."""
    run_dir, endpoint, args = _start_pair(repo_root, tmp_path)
    # The first agent hosts the rendezvous store (it must survive). Once it has a node it waits
    # last_call_s for more, long enough for the second agent to start, so both train from step 0.
    host = Agent(repo_root, tmp_path, "host", endpoint, args, last_call_s=20)
    _wait_until("the rendezvous store", lambda: _listening(endpoint), [host], 120)
    other = Agent(repo_root, tmp_path, "other", endpoint, args, last_call_s=20)
    agents = [host, other]
    # Step 2 of 6 in epoch 0 on 2 ranks, committed: the node goes away mid-epoch.
    _wait_until("a committed checkpoint at step 2", lambda: _committed(run_dir, 2), agents, 240)
    other.kill_node()
    rc = host.wait(timeout=400)
    text = host.text()
    assert rc == 0, text[-5000:]
    assert "on 1 x cpu | global batch 2 (2 per rank x 1 accumulation) | SyncBN over 1 rank(s)" in text
    history = _audit(run_dir, expected_worlds=[2, 1])
    resumed = sorted({r["resumed_from"] for r in history})[1]
    assert 2 <= resumed < 6, resumed  # mid-epoch 0 (6 steps per epoch on 2 ranks)
    assert f"step-{resumed:09d} (step {resumed}, epoch 0)" in text
    _check_lr_schedule(text + other.text())


@pytest.mark.e2e
@pytest.mark.dist
def test_node_joins_and_the_run_goes_on_at_world_size_two(repo_root, tmp_path):
    """train.global_batch_size=4 kept by gradient accumulation: 2 per rank x 2 on one node, x 1 on two."""
    run_dir, endpoint, args = _start_pair(repo_root, tmp_path, "train.global_batch_size=4", "train.elastic_batch=grad_accum",
                                          "checkpoint.every_steps=1")
    first = Agent(repo_root, tmp_path, "first", endpoint, args)
    _wait_until("a committed checkpoint at step 1", lambda: _committed(run_dir, 1), [first], 240)
    second = Agent(repo_root, tmp_path, "second", endpoint, args)
    rc_first, rc_second = first.wait(timeout=400), second.wait(timeout=100)
    text = first.text() + second.text()
    assert (rc_first, rc_second) == (0, 0), text[-5000:]
    assert "on 1 x cpu | global batch 4 (2 per rank x 2 accumulation) | SyncBN over 1 rank(s) | 6 steps/epoch" in text
    assert "on 2 x cpu | global batch 4 (2 per rank x 1 accumulation) | SyncBN over 2 rank(s) | 6 steps/epoch" in text
    history = _audit(run_dir, expected_worlds=[1, 2])
    resumed = sorted({r["resumed_from"] for r in history})[1]
    assert 1 <= resumed < 12, resumed  # the join came before the end of the run (2 epochs x 6 steps)
    assert all(len(r["keys"]) * r["world_size"] == 4 for r in history)  # the global batch stayed 4
    # The agent stopped the one-node worker with SIGTERM: it checkpointed that very step before the restart.
    assert "stopped by SIGTERM" in text
    _check_lr_schedule(text)
