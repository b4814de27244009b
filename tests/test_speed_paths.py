"""``speed.onehot_gather`` / ``region_modulation: auto``: per-layer-shape choice by timing, exact either way.

Equality (fp64, 1e-10, as tests/test_fast_path.py): every path a layer can take, and a mixed plan,
give the dense reference's image and parameter gradients. The choice itself is tested with an
injected timer (a fake measurement), so it does not depend on this machine's load.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from spade_dist.config import SPADE_PATHS, ConfigError, SpeedConfig, load_config
from spade_dist.models.fast.choice import choose_speed_paths, layer_inputs, spade_layers
from spade_dist.models.fast.label_maps import shape_key
from spade_dist.run_dir import SPEED_PATHS_NAME as PLAN_FILE
from tests.dist_utils import run_distributed
from tests.test_fast_path import _generators, _semantics, assert_same_outputs_and_gradients

AUTO = SpeedConfig()  # onehot_gather / region_modulation: auto


def _fake_timer(fastest_by_resolution: dict[int, str], calls: list | None = None):
    """Seconds: 1 for the path named for that layer's resolution, 2 for every other."""

    def timer(key: str, path: str, run) -> float:
        run()  # the candidate must really run (its errors would show)
        if calls is not None:
            calls.append((key, path))
        height = int(key.split("x")[1])
        return 1.0 if fastest_by_resolution.get(height) == path else 2.0

    return timer


def candidates(onehot_gather: str, region_modulation: str) -> tuple[str, ...]:
    return SpeedConfig(onehot_gather=onehot_gather, region_modulation=region_modulation).spade_paths


def test_candidates_follow_the_switches():
    assert candidates("auto", "auto") == ("dense", "gather", "region")
    assert candidates("auto", "off") == ("dense", "gather")
    assert candidates("on", "auto") == ("gather", "region")
    assert candidates("on", "off") == ("gather",)
    assert candidates("off", "off") == candidates("off", "auto") == ("dense",)
    assert candidates("auto", "on") == candidates("on", "on") == ("region",)
    assert SpeedConfig(fused_modulation=False).spade_paths == ("dense",)  # the official layer


def test_config_default_is_auto_and_booleans_read_as_on_off(tmp_path):
    cfg = load_config(None)
    assert cfg.speed.onehot_gather == "auto" and cfg.speed.region_modulation == "auto"
    assert load_config(None, ["speed.onehot_gather=false", "speed.region_modulation=off"]).speed.onehot_gather == "off"
    yaml = tmp_path / "c.yaml"
    yaml.write_text("speed:\n  onehot_gather: on\n  region_modulation: false\n")  # YAML 1.1 booleans
    cfg = load_config(yaml)
    assert (cfg.speed.onehot_gather, cfg.speed.region_modulation) == ("on", "off")
    with pytest.raises(ConfigError, match="speed.region_modulation=on needs speed.onehot_gather"):
        load_config(None, ["speed.onehot_gather=off", "speed.region_modulation=on"])
    with pytest.raises(ConfigError, match="speed.onehot_gather: invalid value 'fast'"):
        load_config(None, ["speed.onehot_gather=fast"])
    with pytest.raises(ConfigError, match="need speed.fused_modulation=true"):
        load_config(None, ["speed.fused_modulation=false", "speed.onehot_gather=on"])


def _applied_paths(generator, semantics) -> dict[str, str]:
    """The path each SPADE layer takes (by module name) under the generator's plan."""
    return {name: generator.modulation.path_for(shape_key(*x.shape[1:])) for name, (x, _) in
            layer_inputs(generator, semantics).items()}


@pytest.mark.parametrize("path", SPADE_PATHS)
def test_every_path_equals_the_dense_reference(path):
    ref, fast = _generators()
    fast.use_modulation(dataclasses.replace(fast.modulation, default=path))
    assert set(_applied_paths(fast, _semantics(2, 64, 64)).values()) == {path}
    assert_same_outputs_and_gradients(ref, fast, _semantics(2, 64, 64))


def test_fake_timing_takes_both_choices_and_the_mixed_plan_stays_exact(tmp_path):
    ref, fast = _generators()
    seg = _semantics(2, 64, 64)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    # Low resolutions: dense is "faster"; high ones: region; 16 x 16: gather.
    timer = _fake_timer({2: "dense", 4: "dense", 8: "dense", 16: "gather", 32: "region", 64: "region"})
    plan, source = choose_speed_paths([fast], seg, AUTO, tmp_path / PLAN_FILE, is_main=True, timer=timer)
    assert source == "measured"
    applied = _applied_paths(fast, seg)
    assert set(applied.values()) == {"dense", "gather", "region"}, plan.layers
    assert applied == plan.layers and set(applied) == set(spade_layers(fast))
    assert plan.layers["head_0.norm_0"] == "dense" and plan.layers["up_3.norm_0"] == "region"
    # Measuring left the training state alone: same weights and buffers, no gradients, train mode.
    assert all(torch.equal(v, fast.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in fast.parameters()) and fast.training
    assert_same_outputs_and_gradients(ref, fast, seg)
    # The opposite timing flips the choice: the decision follows the measurement.
    _, fast2 = _generators()
    plan2, _ = choose_speed_paths([fast2], seg, SpeedConfig(region_modulation="off"), None, is_main=True,
                                  timer=_fake_timer({h: "gather" if h < 16 else "dense" for h in (2, 4, 8, 16, 32, 64)}))
    assert plan2.layers["head_0.norm_0"] == "gather" and plan2.layers["up_3.norm_0"] == "dense"


def test_layers_of_one_shape_share_one_measurement():
    _, fast = _generators()
    calls: list = []
    choose_speed_paths([fast], _semantics(2, 64, 64), AUTO, None, is_main=True,
                       timer=_fake_timer({}, calls))
    keys = [k for k, _ in calls]
    assert len(set(keys)) < len(spade_layers(fast))  # e.g. head_0 / G_middle_* share a shape
    assert len(calls) == 3 * len(set(keys))  # every candidate once per shape


def test_plan_is_recorded_and_a_resume_keeps_it(tmp_path):
    seg = _semantics(2, 64, 64)
    _, first = _generators()
    plan, _ = choose_speed_paths([first], seg, AUTO, tmp_path / PLAN_FILE, is_main=True,
                                 timer=_fake_timer({h: "dense" for h in (2, 4, 8, 16, 32, 64)}))
    recorded = json.loads((tmp_path / PLAN_FILE).read_text())
    assert recorded["device_type"] == "cpu" and set(recorded["layers"].values()) == {"dense"}
    assert set(recorded["paths"].values()) == {"dense"}

    def must_not_measure(key, path, run):
        raise AssertionError("a resumed run must not measure again")

    _, resumed = _generators()
    again, source = choose_speed_paths([resumed], seg, AUTO, tmp_path / PLAN_FILE, is_main=True, timer=must_not_measure)
    assert source == "recorded" and again.layers == plan.layers
    assert set(_applied_paths(resumed, seg).values()) == {"dense"}
    # Forced switches win over the record, without measuring.
    forced, source = choose_speed_paths([resumed], seg, SpeedConfig(onehot_gather="on", region_modulation="off"),
                                        tmp_path / PLAN_FILE, is_main=True, timer=must_not_measure)
    assert source == "forced" and set(forced.layers.values()) == {"gather"}
    # A record of the earlier format (paths per layer name, timings per shape) is read back.
    (tmp_path / PLAN_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != "paths"}))
    _, earlier = _generators()
    again, source = choose_speed_paths([earlier], seg, AUTO, tmp_path / PLAN_FILE, is_main=True, timer=must_not_measure)
    assert source == "recorded" and again.paths == plan.paths
    # A record from another device type is measured again.
    (tmp_path / PLAN_FILE).write_text(json.dumps({**recorded, "device_type": "cuda"}))
    _, other = _generators()
    _, source = choose_speed_paths([other], seg, AUTO, tmp_path / PLAN_FILE, is_main=True,
                                   timer=_fake_timer({h: "region" for h in (2, 4, 8, 16, 32, 64)}))
    assert source == "measured"


def test_deterministic_runs_do_not_time(tmp_path):
    def must_not_measure(key, path, run):
        raise AssertionError("train.deterministic: no timing")

    _, fast = _generators()
    plan, source = choose_speed_paths([fast], _semantics(2, 64, 64), AUTO, tmp_path / PLAN_FILE, is_main=True,
                                      timer=must_not_measure, deterministic=True)
    assert source == "deterministic" and set(plan.layers.values()) == {"region"}
    plan, _ = choose_speed_paths([fast], _semantics(2, 64, 64), SpeedConfig(region_modulation="off"), None, is_main=True,
                                 timer=must_not_measure, deterministic=True)
    assert set(plan.layers.values()) == {"gather"}


def _broadcast_rank(rank: int, world: int) -> dict:
    _, fast = _generators()
    seg = _semantics(2, 64, 64, seed=rank)  # ranks see different batches; rank 0's decides

    def timer(key, path, run):
        if rank != 0:
            raise AssertionError("only rank 0 measures")
        return _fake_timer({h: "gather" for h in (2, 4, 8, 16)} | {32: "region", 64: "region"})(key, path, run)

    plan, _ = choose_speed_paths([fast], seg, AUTO, None, is_main=rank == 0, timer=timer)
    return _applied_paths(fast, seg) | {"_plan": plan.layers}


@pytest.mark.dist
def test_rank0_decides_and_every_rank_applies_its_choice():
    r0, r1 = run_distributed(_broadcast_rank, 2)
    assert r0 == r1
    assert set(r0["_plan"].values()) == {"gather", "region"}
