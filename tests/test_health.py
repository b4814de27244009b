"""Run health (train.health, docs/HEALTH.md): each injected fault is noticed, its policy acts once and the
run finishes (DONE after a warning, exit 76 with a one-line verdict after a stop); a normal run fires nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from spade_dist.checkpoint.layout import MARKER_NAME, step_dir_name
from spade_dist.exit_codes import EXIT_UNHEALTHY, requeue_code_problem
from spade_dist.run_dir import RunDir
from spade_dist.train.health import differing_ranks, last_healthy_checkpoint, robust_band, state_checksum
from tests.kit import PYTHON, accelerate_launcher, audited_keys, run_cli, synthetic_shards, tiny_config, train_cmd


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("synth"), count=16, val_count=2)


def _events(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).health_events
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train(run_dir: Path, manifest: Path, *overrides: str, launcher=None, expect_rc: int = 0):
    cmd = train_cmd("--resume", "none", f"data.shards={manifest}", f"train.run_dir={run_dir}", *overrides,
                    **({"launcher": launcher} if launcher else {}))
    proc = run_cli(cmd, check=False, timeout=600)
    assert proc.returncode == expect_rc, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    # A launcher prints its own traceback for a worker's non-zero exit; no spade_dist frame may be in it.
    assert ("Traceback" not in proc.stderr) if not launcher else ('spade_dist/' not in proc.stderr), proc.stderr[-3000:]
    return proc


def _health_line(run_dir: Path) -> str:
    return run_cli([PYTHON, "-m", "spade_dist.cli.run", "health", "--run-dir", str(run_dir)]).stdout.strip()


def _assert_stopped_once(run_dir: Path, proc, signal: str, healthy_step) -> None:
    """One stop event for ``signal``, the verdict naming it and the last healthy checkpoint, no DONE."""
    events = _events(run_dir)
    assert [(e["signal"], e["action"]) for e in events] == [(signal, "stop")], events
    line = [x for x in proc.stderr.splitlines() if x.startswith("spade-train: error: stopped by the run-health monitor: ")]
    assert len(line) == 1, proc.stderr[-3000:]
    expected = (str(run_dir / "checkpoints" / step_dir_name(healthy_step)) if healthy_step is not None
                else "none (no committed checkpoint before it)")
    assert f"health: {signal} at step" in line[0] and f"last healthy checkpoint: {expected}" in line[0], line[0]
    assert _health_line(run_dir).startswith(f"health: {signal} at step")
    assert not RunDir(run_dir).done.exists()


# ------------------------------------------------------------------------------------ pieces


def test_robust_band_is_median_and_scaled_mad():
    median, scale = robust_band([1.0, 2.0, 3.0, 4.0, 100.0])
    assert median == 3.0 and scale == pytest.approx(1.4826 * 1.0)
    assert robust_band([5.0] * 10) == (5.0, pytest.approx(5e-3))  # a flat history: floored deviation


def test_differing_ranks_are_the_minority_and_rank_0_breaks_ties():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])
    assert differing_ranks([a, a, b, a]) == [2]
    assert differing_ranks([b, a, a]) == [0]
    assert differing_ranks([a, b]) == [1]
    assert differing_ranks([a, a]) == []


def test_state_checksum_sees_a_perturbation_and_a_shifted_value_but_not_a_copy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    copy = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    copy.load_state_dict(net.state_dict())
    assert torch.equal(state_checksum([net], [True]), state_checksum([copy], [True]))
    with torch.no_grad():
        copy[0].weight[0, 0] += 1e-3
    assert not torch.equal(state_checksum([net], [False]), state_checksum([copy], [False]))
    copy.load_state_dict(net.state_dict())
    with torch.no_grad():  # the module's total unchanged: moved from one tensor to another
        copy[0].weight[0, 0] += 0.5
        copy[0].bias[0] -= 0.5
    assert not torch.equal(state_checksum([net], [False]), state_checksum([copy], [False]))
    copy.load_state_dict(net.state_dict())
    copy[1].running_mean += 1e-3
    assert torch.equal(state_checksum([net], [False]), state_checksum([copy], [False]))  # buffers not asked
    assert not torch.equal(state_checksum([net], [True]), state_checksum([copy], [True]))


def test_last_healthy_checkpoint_is_the_newest_committed_one_checked_clean(tmp_path):
    for step, committed in ((10, True), (20, True), (30, False), (40, True)):
        step_dir = tmp_path / "checkpoints" / step_dir_name(step)
        step_dir.mkdir(parents=True)
        if committed:
            (step_dir / MARKER_NAME).write_text("{}")
    assert last_healthy_checkpoint(tmp_path, 35).name == step_dir_name(20)
    assert last_healthy_checkpoint(tmp_path, 40).name == step_dir_name(40)
    assert last_healthy_checkpoint(tmp_path, 5) is None


@pytest.mark.parametrize("override, key", [
    ("train.health.on_spike=retry", "train.health.on_spike"),
    ("train.health.rewind_lr_factor_G=0", "train.health.rewind_lr_factor_G"),
    ("train.health.spike_window=2", "train.health.spike_window"),
    ("train.health.collapse_ratio=1.5", "train.health.collapse_ratio"),
    ("train.health.saturation_d_loss=30", "train.health.saturation_d_loss"),
    ("train.health.debug_fault=meteor", "train.health.debug_fault"),
])
def test_bad_health_values_are_config_errors(override, key):
    from spade_dist.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(override)


def test_the_unhealthy_exit_code_cannot_be_the_requeue_code():
    assert requeue_code_problem(EXIT_UNHEALTHY)


# ------------------------------------------------------------------------------------ faults


def test_nonfinite_streak_stops_naming_the_checkpoint_before_it(tmp_path, manifest):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, manifest, "train.health.debug_fault=nan", "train.health.debug_fault_step=12",
                  "train.health.nonfinite_streak=4", expect_rc=EXIT_UNHEALTHY)
    _assert_stopped_once(run_dir, proc, "nonfinite", healthy_step=10)


def test_absurd_learning_rate_ends_with_a_divergence_verdict(tmp_path, manifest):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, manifest, "optim.lr=5", "train.health.d_loss_steps=10", expect_rc=EXIT_UNHEALTHY)
    # Diverged within the first steps. How fast depends on the speed paths timed on this machine
    # (lr=5 amplifies their rounding): the D loss may dip below 20 once before step 10, and then the
    # checkpoint of step 10 counts as healthy; otherwise none does.
    (event,) = _events(run_dir)
    healthy = event["last_healthy_checkpoint"]
    assert healthy in (None, str(run_dir / "checkpoints" / step_dir_name(10))), healthy
    _assert_stopped_once(run_dir, proc, "divergence", healthy_step=None if healthy is None else 10)


def test_rewind_restores_the_healthy_checkpoint_with_a_lower_lr_and_the_audit_stays_exactly_once(tmp_path, manifest):
    """A non-finite streak under policy rewind: back to step 10 once, D's lr halved, the run finishes;
    replaying the steps after 10, the committed history still has every sample of each epoch once."""
    run_dir = tmp_path / "run"
    proc = _train(run_dir, manifest, "train.health.debug_fault=nan", "train.health.debug_fault_step=12",
                  "train.health.nonfinite_streak=4", "train.health.on_nonfinite=rewind",
                  "train.health.rewind_lr_factor_D=0.5", "train.log_keys=true", "train.max_steps=24")
    events = _events(run_dir)
    healthy = str(run_dir / "checkpoints" / step_dir_name(10))
    assert [(e["signal"], e["action"], e["step"], e["last_healthy_checkpoint"]) for e in events] == [
        ("nonfinite", "rewind", 16, healthy)], events
    assert f"rewound to {healthy} (step 10); lr G 1.00e-03 D 2.00e-03" in proc.stdout, proc.stdout[-3000:]
    assert json.loads(RunDir(run_dir).done.read_text())["step"] == 24
    assert _health_line(run_dir) == f"health: no stopping signal up to step 24 (1 warning / rewind event(s) in {RunDir(run_dir).health_events})"
    # The key audit: the last record of each step is the committed one (the rewind replayed 11..16).
    records = [json.loads(x) for x in (run_dir / "logs" / "keys-rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17)) + list(range(11, 25))
    assert {r["resumed_from"] for r in records if r["step"] > 10 and records.index(r) >= 16} == {10}
    committed = {r["step"]: r for r in records}
    by_epoch: dict[int, list[str]] = {}
    for step in sorted(committed):
        by_epoch.setdefault(committed[step]["epoch"], []).extend(audited_keys(committed[step]))
    for epoch in (0, 1):  # 16 samples, 8 steps of 2 per epoch; epoch 2 is partial at step 24
        assert sorted(by_epoch[epoch]) == sorted(set(by_epoch[epoch])) and len(by_epoch[epoch]) == 16, epoch


def test_saturated_discriminator_stops(tmp_path, manifest):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, manifest, "train.health.debug_fault=d_saturate", "train.health.debug_fault_step=12",
                  "train.health.d_loss_steps=4", "train.health.on_saturation=stop", expect_rc=EXIT_UNHEALTHY)
    _assert_stopped_once(run_dir, proc, "saturation", healthy_step=10)


def test_learning_rate_jump_is_a_spike_warning_and_the_run_finishes(tmp_path, manifest):
    run_dir = tmp_path / "run"
    _train(run_dir, manifest, "train.health.debug_fault=lr_jump", "train.health.debug_fault_step=10",
           "train.health.on_divergence=warn")
    spikes = [e for e in _events(run_dir) if e["signal"] == "spike"]
    assert len(spikes) == 1 and spikes[0]["action"] == "warn" and spikes[0]["step"] > 10, spikes
    assert RunDir(run_dir).done.exists()
    assert _health_line(run_dir).startswith("health: no stopping signal up to step 20")


def test_exploding_gradients_stop_the_run(tmp_path, manifest):
    """Losses x 1e4 from step 18 (after 9 logging steps of gradient-norm history): the gradient norms
    jump 1e4-fold, far past train.health.grad_norm_ratio (100)."""
    run_dir = tmp_path / "run"
    proc = _train(run_dir, manifest, "train.health.debug_fault=grad_scale", "train.health.debug_fault_step=18",
                  "train.max_steps=24", "train.health.on_grad_norm=stop", "checkpoint.every_steps=16",
                  expect_rc=EXIT_UNHEALTHY)
    _assert_stopped_once(run_dir, proc, "grad_norm", healthy_step=16)


def test_constant_generator_is_a_collapse_warning_once(tmp_path, manifest):
    run_dir = tmp_path / "run"
    _train(run_dir, manifest, "train.health.debug_fault=g_constant", "train.health.debug_fault_step=6",
           "train.health.collapse_every=5", "train.max_steps=20")
    events = _events(run_dir)
    assert [(e["signal"], e["action"], e["step"]) for e in events] == [("collapse", "warn", 10)], events
    assert RunDir(run_dir).done.exists()


@pytest.mark.slow
def test_normal_run_fires_nothing(tmp_path, manifest):
    """False positives: the tiny preset for 60 steps (3x its CI length), every check at its most frequent
    (judged every 2 steps, collapse every 5), the default thresholds."""
    run_dir = tmp_path / "run"
    _train(run_dir, manifest, "train.max_steps=60", "train.health.collapse_every=5", "checkpoint.every_steps=30")
    assert _events(run_dir) == []
    signals = [json.loads(x) for x in RunDir(run_dir).health_signals.read_text().splitlines()]
    # A line per check: 30 logging steps, 6 collapse checks between them (steps 5, 15, ..., 55).
    assert len(signals) == 36 and sum("diversity" in s for s in signals) == 12
    assert _health_line(run_dir) == f"health: no stopping signal up to step 60 (0 warning / rewind event(s) in {RunDir(run_dir).health_events})"


@pytest.mark.dist
def test_perturbed_rank_is_named_and_the_run_stops(tmp_path, manifest):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, manifest, "train.health.debug_fault=perturb_rank1", "train.health.debug_fault_step=4",
                  "train.health.consistency_every=4", "checkpoint.every_steps=4", "train.max_steps=12",
                  launcher=accelerate_launcher(), expect_rc=1)  # accelerate launch reports 1 for a worker's 76
    events = _events(run_dir)
    assert [(e["signal"], e["action"], e["step"]) for e in events] == [("drift", "stop", 8)], events
    assert "rank(s) 1 differ" in events[0]["detail"]
    assert events[0]["last_healthy_checkpoint"] == str(run_dir / "checkpoints" / step_dir_name(4))
    assert _health_line(run_dir).startswith("health: drift at step 8")
    assert "spade-train: error: stopped by the run-health monitor: health: drift at step 8" in proc.stderr


def test_batch_script_verdict_names_a_health_stop_whatever_the_launcher_reports(tmp_path):
    from spade_dist.run_dir import launch_verdict

    run = RunDir(tmp_path)
    run.health.mkdir()
    run.checkpoints.mkdir()  # a run directory (spade-run health refuses a path that is none)
    line = "health: drift at step 8: ...; last healthy checkpoint: X"
    run.health_verdict.write_text(json.dumps({"status": "stopped", "line": line}))
    for rc in (1, EXIT_UNHEALTHY):  # accelerate launch reports 1 for a worker's 76
        v = launch_verdict(run, rc, False, 75)
        assert (v.action, v.exit_code, v.message) == ("failed", EXIT_UNHEALTHY, f"stopped by the run-health monitor: {line}")
    run.clear_start_markers()  # a restart has no verdict until it ends
    assert _health_line(tmp_path) == "none"
