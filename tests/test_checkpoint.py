"""CheckpointManager: exact resume, world-size changes, preemption, torn checkpoints, retention, async."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from spade_dist.checkpoint import (
    CheckpointManager,
    ExistingCheckpointsError,
    InvalidCheckpoint,
    find_latest,
    list_step_dirs,
    read_marker,
    validate_step_dir,
)
from spade_dist.checkpoint.layout import select_prunable
from spade_dist.config import CheckpointConfig
from tests.checkpoint_toy_loop import NUM_SAMPLES, ToySampler, ToyTrainState, run
from tests.dist_utils import run_distributed
from tests.kit import wait_for

TOY_LOOP = Path(__file__).resolve().parent / "checkpoint_toy_loop.py"  # also runs under torchrun by hand


def _cfg(**kw) -> CheckpointConfig:
    base = dict(every_steps=0, keep_last=10, async_save=True, resume="auto")
    base.update(kw)
    return CheckpointConfig(**base)


def _run_ranks(rank: int, world_size: int, run_dir: str, steps: int, cfg: CheckpointConfig, stop_at: int = -1,
               final_save: bool = True):
    return run(Path(run_dir), steps, rank, world_size, cfg, stop_at_step=stop_at, final_save=final_save)


def _assert_same_params(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


# ----------------------------------------------------------------------------------------------
# exact resume, same world size
# ----------------------------------------------------------------------------------------------


@pytest.mark.dist
def _same_world_size_legs(rank: int, world_size: int, tmp: str) -> dict:
    """Uninterrupted run, interrupted run, resumed run: in the same processes (spawning is slow)."""
    import torch.distributed as dist

    tmp_path = Path(tmp)
    full = run(tmp_path / "full", 10, rank, world_size, _cfg(resume="none"))
    # A stop requested on rank 0 only must stop both ranks at step 5 after a committed save.
    first = run(tmp_path / "cut", 10, rank, world_size, _cfg(every_steps=4), stop_at_step=5)
    stop_committed = (tmp_path / "cut" / "checkpoints" / "step-000000005" / "COMMITTED").exists()
    dist.barrier()
    if rank == 0:  # throw the preemption checkpoint away so resume uses the asynchronous one at 4
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000000005")
    dist.barrier()
    second = run(tmp_path / "cut", 10, rank, world_size, _cfg(every_steps=4))
    return {"full": full, "first": first, "second": second, "stop_committed": stop_committed}


@pytest.mark.dist
def test_resume_same_world_size_equals_uninterrupted(tmp_path):
    """2 ranks: save at k=4 (async periodic save), stop, resume, run to 10 == uninterrupted 10."""
    results = run_distributed(_same_world_size_legs, 2, args=(str(tmp_path),))
    for r in results:
        assert r["first"]["stopped"] and r["first"]["step"] == 5 and r["stop_committed"]
        assert r["second"]["restored"] == 4
        _assert_same_params(r["full"]["params"], r["second"]["params"])
        assert r["full"]["lr"] == pytest.approx(r["second"]["lr"], abs=1e-12)
        assert r["full"]["opt"]["state"][0]["step"] == r["second"]["opt"]["state"][0]["step"]


# ----------------------------------------------------------------------------------------------
# world-size changes: state equality and exactly-once data
# ----------------------------------------------------------------------------------------------


def _epoch0_ids(results_list: list[list[dict]]) -> Counter:
    ids: Counter = Counter()
    for results in results_list:
        for r in results:
            ids.update(i for epoch, i in r["delivered"] if epoch == 0)
    return ids


def _check_world_size_change(tmp_path: Path, ws_before: int, stop_at: int, ws_after: int, steps_after: int) -> None:
    run_dir = str(tmp_path / "run")
    before = run_distributed(_run_ranks, ws_before, args=(run_dir, 100, _cfg(), stop_at)) if ws_before > 1 else \
        [run(Path(run_dir), 100, 0, 1, _cfg(), stop_at_step=stop_at)]
    assert all(r["stopped"] for r in before)
    saved_dir = list_step_dirs(Path(run_dir) / "checkpoints")[-1]
    assert read_marker(saved_dir)["world_size"] == ws_before
    # What was saved, read back in one process: the model weights must reach every new rank.
    from spade_dist.checkpoint import StepReader

    saved = StepReader(saved_dir).read_trees(["train"])["train"]
    after = run_distributed(_run_ranks, ws_after, args=(run_dir, steps_after, _cfg(), -1, False)) if ws_after > 1 else \
        [run(Path(run_dir), steps_after, 0, 1, _cfg(), final_save=False)]
    assert [r["restored"] for r in after] == [stop_at] * ws_after
    assert [r["restored_from_ws"] for r in after] == [ws_before] * ws_after
    # Every sample of epoch 0 exactly once across the interruption.
    ids = _epoch0_ids([before, after])
    assert sorted(ids) == list(range(NUM_SAMPLES)) and set(ids.values()) == {1}, ids
    # Training continued from the saved state: a fresh process restoring the checkpoint has
    # the saved weights, optimizer moments and scheduler position.
    probe = ToyTrainState(seed=99)
    probe.load_state_dict(saved)
    assert probe.step == stop_at and probe.sched.last_epoch == stop_at
    assert probe.opt.state_dict()["state"][0]["exp_avg_sq"].abs().sum() > 0
    # All new ranks end with identical parameters (same restored state + all-reduced grads).
    for r in after[1:]:
        _assert_same_params(after[0]["params"], r["params"], tol=0)


@pytest.mark.dist
def test_resume_two_to_one_rank_mid_epoch(tmp_path):
    # 2 ranks x batch 2: stop after 2 steps (8 of 24 samples); 1 rank needs 8 steps for the other 16.
    _check_world_size_change(tmp_path, ws_before=2, stop_at=2, ws_after=1, steps_after=10)


@pytest.mark.dist
def test_resume_one_to_three_ranks_mid_epoch(tmp_path):
    # 1 rank: stop after 3 steps (6 samples); 3 ranks x batch 2 take the other 18 in 3 steps.
    _check_world_size_change(tmp_path, ws_before=1, stop_at=3, ws_after=3, steps_after=6)


def test_restore_identical_optimizer_state_single_process(tmp_path):
    """Saved and restored optimizer / scheduler / model state are bit-identical."""
    state = ToyTrainState()
    sampler = ToySampler(0, 1, 2)
    for _ in range(3):
        from tests.checkpoint_toy_loop import train_step

        train_step(state, sampler.next_batch()[1], 1)
    mgr = CheckpointManager(tmp_path, _cfg(), install_signal_handlers=False)
    mgr.save(3, {"train": state, "extra": {"lr_table": torch.arange(3.0), "note": "x"}}, blocking=True)
    mgr.close()
    fresh = ToyTrainState(seed=5)
    app = {"train": fresh, "extra": None}
    mgr2 = CheckpointManager(tmp_path, _cfg(), install_signal_handlers=False)
    result = mgr2.restore(app)
    assert result.step == 3
    assert app["extra"]["note"] == "x" and torch.equal(app["extra"]["lr_table"], torch.arange(3.0))
    _assert_same_params(state.model.state_dict(), fresh.model.state_dict(), tol=0)
    a, b = state.opt.state_dict(), fresh.opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for k in a["state"][idx]:
            assert torch.equal(a["state"][idx][k], b["state"][idx][k])
    assert fresh.sched.state_dict()["last_epoch"] == 3


# ----------------------------------------------------------------------------------------------
# torn checkpoints
# ----------------------------------------------------------------------------------------------


def _save_steps(run_dir: Path, steps: list[int]) -> ToyTrainState:
    state = ToyTrainState()
    mgr = CheckpointManager(run_dir, _cfg(), install_signal_handlers=False)
    for s in steps:
        state.step = s
        mgr.save(s, {"train": state}, blocking=True)
    mgr.close()
    return state


def test_truncated_and_markerless_newest_are_skipped(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2, 3])
    ckpts = tmp_path / "checkpoints"
    newest, middle = ckpts / "step-000000003", ckpts / "step-000000002"
    (newest / "COMMITTED").unlink()  # save interrupted before the commit
    data_file = next(p for p in middle.iterdir() if p.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:-7])  # truncated file
    fresh = ToyTrainState(seed=3)
    mgr = CheckpointManager(tmp_path, _cfg(), install_signal_handlers=False)
    with caplog.at_level(logging.WARNING, logger="spade_dist.checkpoint"):
        result = mgr.restore({"train": fresh})
    assert result.step == 1 and fresh.step == 1
    text = caplog.text
    assert "step-000000003" in text and "no COMMITTED marker" in text
    assert "step-000000002" in text and "truncated" in text
    assert [Path(p).name for p in result.skipped] == ["step-000000003", "step-000000002"]
    assert find_latest(tmp_path).name == "step-000000001"


def test_corrupt_bytes_same_size_detected_by_sha256(tmp_path):
    _save_steps(tmp_path, [4])
    step_dir = tmp_path / "checkpoints" / "step-000000004"
    data_file = next(p for p in step_dir.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(InvalidCheckpoint, match="sha256"):
        validate_step_dir(step_dir)
    mgr = CheckpointManager(tmp_path, _cfg(), install_signal_handlers=False)
    assert mgr.restore({"train": ToyTrainState()}) is None  # nothing valid left: fresh start


def test_explicit_resume_path_must_be_valid(tmp_path):
    _save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step-000000002" / "COMMITTED").unlink()
    mgr = CheckpointManager(tmp_path, _cfg(), install_signal_handlers=False)
    with pytest.raises(InvalidCheckpoint, match="step-000000002"):
        mgr.restore({"train": ToyTrainState()}, resume=str(tmp_path / "checkpoints" / "step-000000002"))
    with pytest.raises(InvalidCheckpoint, match="does not exist"):
        mgr.restore({"train": ToyTrainState()}, resume=str(tmp_path / "nowhere"))
    state = ToyTrainState()
    assert mgr.restore({"train": state}, resume=str(tmp_path)).step == 1  # a run dir: newest valid
    # The marker-less step 2 this resume fell back past is moved aside, not left to shadow step 1.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000001"]
    assert [p.name for p in (tmp_path / "archive").glob("*-invalid/*")] == ["step-000000002"]
    with pytest.raises(ExistingCheckpointsError, match="checkpoint.existing=archive"):
        mgr.restore({"train": state}, resume="none")  # a fresh start over this run's step 1


def test_missing_state_name_is_a_clear_error(tmp_path):
    _save_steps(tmp_path, [1])
    mgr = CheckpointManager(tmp_path, _cfg(), install_signal_handlers=False)
    with pytest.raises(ValueError, match=r"no state named \['encoder'\]"):
        mgr.restore({"train": ToyTrainState(), "encoder": ToyTrainState()})


# ----------------------------------------------------------------------------------------------
# retention
# ----------------------------------------------------------------------------------------------


def test_select_prunable_keeps_last_and_milestones():
    assert select_prunable([1, 2, 3, 4, 5, 6], keep_last=2, keep_every=0) == [1, 2, 3, 4]
    assert select_prunable([2, 4, 6, 8, 10, 12], keep_last=2, keep_every=4) == [2, 6]


def test_retention_prunes_only_committed_older(tmp_path):
    state = ToyTrainState()
    mgr = CheckpointManager(tmp_path, _cfg(keep_last=2, keep_every=4), install_signal_handlers=False)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-000000001").mkdir(parents=True)  # torn leftover, not committed: never pruned
    for s in [2, 3, 4, 5, 6, 7]:
        state.step = s
        mgr.save(s, {"train": state}, blocking=False)
    mgr.close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000001", "step-000000004", "step-000000006", "step-000000007"]
    for name in ["step-000000004", "step-000000006", "step-000000007"]:
        validate_step_dir(ckpts / name)


# ----------------------------------------------------------------------------------------------
# async save
# ----------------------------------------------------------------------------------------------


def test_async_save_equals_sync_save_and_stages_a_copy(tmp_path):
    big = torch.nn.Linear(512, 512)
    state_a = {"m": big}
    mgr = CheckpointManager(tmp_path / "a", _cfg(), install_signal_handlers=False)
    expected = {k: v.clone() for k, v in big.state_dict().items()}
    mgr.save(1, state_a, blocking=False)
    with torch.no_grad():  # training goes on and mutates the parameters in place
        big.weight.add_(1.0)
    mgr.wait()
    mgr_b = CheckpointManager(tmp_path / "b", _cfg(), install_signal_handlers=False)
    big.load_state_dict(expected)
    mgr_b.save(1, state_a, blocking=True)
    from spade_dist.checkpoint import StepReader

    got_a = StepReader(tmp_path / "a" / "checkpoints" / "step-000000001").read_trees(["m"])["m"]
    got_b = StepReader(tmp_path / "b" / "checkpoints" / "step-000000001").read_trees(["m"])["m"]
    for k in expected:
        assert torch.equal(got_a[k], expected[k]) and torch.equal(got_b[k], expected[k])


def test_async_write_error_is_reraised(tmp_path):
    blocker = tmp_path / "run" / "checkpoints"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the checkpoints directory should be")
    mgr = CheckpointManager(tmp_path / "run", _cfg(), install_signal_handlers=False)
    mgr.save(1, {"m": torch.nn.Linear(2, 2)}, blocking=False)
    with pytest.raises(RuntimeError, match="asynchronous checkpoint save failed"):
        mgr.wait()


# ----------------------------------------------------------------------------------------------
# signals and preemption
# ----------------------------------------------------------------------------------------------


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "keys-rank0.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def test_sigusr1_commits_and_exits_with_requeue_code_then_resume_continues(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(TOY_LOOP), str(tmp_path), "--steps", "12", "--every", "100", "--sleep", "0.1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: _steps_logged(tmp_path) >= 3, 60, "3 training steps", poll=0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == CheckpointConfig().requeue_exit_code, out
    committed = [p for p in list_step_dirs(tmp_path / "checkpoints") if (p / "COMMITTED").exists()]
    assert len(committed) == 1
    stop_step = read_marker(committed[0])["step"]
    assert 3 <= stop_step < 12
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    done = json.loads((tmp_path / "DONE").read_text())
    assert done == {"step": 12, "restored": stop_step}
    # Samples: 12 steps x 2 = 24 = exactly one epoch, each sample once across the requeue.
    records = [json.loads(line) for line in (tmp_path / "keys-rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    ids = Counter(i for r in records for i in r["ids"])
    assert sorted(ids) == list(range(NUM_SAMPLES)) and set(ids.values()) == {1}


def test_every_minutes_trigger_and_no_double_save(tmp_path):
    state = ToyTrainState()
    mgr = CheckpointManager(tmp_path, _cfg(every_steps=0, every_minutes=0.5 / 60), install_signal_handlers=False)
    assert not mgr.maybe_save(1, {"train": state})  # 0.5 s not yet elapsed since start
    time.sleep(0.6)
    assert mgr.maybe_save(2, {"train": state})
    assert not mgr.maybe_save(2, {"train": state})  # same step: never saved twice
    mgr.close()
    assert [p.name for p in list_step_dirs(tmp_path / "checkpoints")] == ["step-000000002"]


def test_unknown_signal_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="SIGNOPE"):
        CheckpointManager(tmp_path, _cfg(signals=["SIGNOPE"]))


# ----------------------------------------------------------------------------------------------
# rank-partitioned state (DeepSpeed ZeRO optimizer shards)
# ----------------------------------------------------------------------------------------------


class _RankShard:
    """Same keys on every rank, different values: what a ZeRO-partitioned optimizer state is."""

    def __init__(self, value: float) -> None:
        self.shard = torch.full((3,), value)

    def state_dict(self):
        return {"shard": self.shard}

    def load_state_dict(self, state):
        self.shard = state["shard"]


def _locked_leg(rank: int, world_size: int, run_dir: str, save: bool):
    mgr = CheckpointManager(run_dir, _cfg(), rank=rank, world_size=world_size, install_signal_handlers=False,
                            world_size_locked="test ZeRO partitions")
    obj = _RankShard(float(rank + 1) if save else -1.0)
    if save:  # save, then restore into a fresh object on the same world size
        mgr.save(1, {"opt": obj}, blocking=False)
        mgr.wait()
        obj = _RankShard(-1.0)
    try:
        mgr.restore({"opt": obj})
        return obj.shard.tolist()
    except ValueError as exc:
        return str(exc)
    finally:
        mgr.close()


@pytest.mark.dist
def test_world_size_locked_state_is_stored_per_rank_and_refuses_resharding(tmp_path):
    assert run_distributed(_locked_leg, 2, args=(str(tmp_path), True)) == [[1.0] * 3, [2.0] * 3]
    (message,) = run_distributed(_locked_leg, 1, args=(str(tmp_path), False))
    assert "world size 2" in message and "test ZeRO partitions" in message and "step-000000001" in message


def _hung_peer(rank: int, world_size: int, run_dir: str) -> dict:
    from datetime import timedelta

    ckpt = CheckpointManager(run_dir, CheckpointConfig(every_steps=0), rank=rank, world_size=world_size,
                             install_signal_handlers=False, timeout=timedelta(seconds=2))
    if rank == 1:
        time.sleep(8)  # alive with its sockets open, but never joins the collective (a hung node)
        return {}
    started = time.monotonic()
    try:
        ckpt.should_stop()
    except RuntimeError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - started}
    return {"error": None}


@pytest.mark.dist
def test_control_collectives_fail_after_the_configured_timeout_not_torchs_default(tmp_path):
    """train.collective_timeout_s reaches the manager's private groups: a survivor waiting for a hung
    peer fails after 2 s (torch's default would be 30 minutes), so a launcher can re-form the group."""
    rank0, _ = run_distributed(_hung_peer, 2, args=(str(tmp_path / "run"),))
    assert rank0["error"] is not None and "imed out" in rank0["error"], rank0
    assert rank0["seconds"] < 7, rank0  # before the peer would have joined (8 s)
