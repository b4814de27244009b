"""``model.onehot_gather`` / ``region_modulation: auto``: per-layer choice by timing, exact either way.

Equality (fp64, 1e-10, as tests/test_fast_path.py): every path a layer can take, and a mixed plan,
give the dense reference's image and parameter gradients. The choice itself is tested with an
injected timer (a fake measurement), so it does not depend on this machine's load.
"""
from __future__ import annotations

import json

import pytest
import torch

from spade_dist.config import ConfigError, load_config
from spade_dist.models.spade import SPEED_PATHS
from spade_dist.run_dir import SPEED_PATHS_NAME as PLAN_FILE
from spade_dist.models.speed_paths import candidates, choose_speed_paths, spade_layers
from tests.dist_utils import run_distributed
from tests.test_fast_path import _generators, _semantics, assert_same_outputs_and_gradients


def _fake_timer(fastest_by_resolution: dict[int, str], calls: list | None = None):
    """Seconds: 1 for the path named for that layer's resolution, 2 for every other."""

    def timer(key: str, path: str, run) -> float:
        run()  # the candidate must really run (its errors would show)
        if calls is not None:
            calls.append((key, path))
        height = int(key.split("x")[1])
        return 1.0 if fastest_by_resolution.get(height) == path else 2.0

    return timer


def test_candidates_follow_the_switches():
    assert candidates("auto", "auto") == ("dense", "gather", "region")
    assert candidates("auto", "off") == ("dense", "gather")
    assert candidates("on", "auto") == ("gather", "region")
    assert candidates("on", "off") == ("gather",)
    assert candidates("off", "off") == candidates("off", "auto") == ("dense",)
    assert candidates("auto", "on") == candidates("on", "on") == ("region",)


def test_config_default_is_auto_and_booleans_read_as_on_off(tmp_path):
    cfg = load_config(None)
    assert cfg.model.onehot_gather == "auto" and cfg.model.region_modulation == "auto"
    assert load_config(None, ["model.onehot_gather=false", "model.region_modulation=off"]).model.onehot_gather == "off"
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model:\n  onehot_gather: on\n  region_modulation: false\n")  # YAML 1.1 booleans
    cfg = load_config(yaml)
    assert (cfg.model.onehot_gather, cfg.model.region_modulation) == ("on", "off")
    with pytest.raises(ConfigError, match="model.region_modulation=on needs model.onehot_gather"):
        load_config(None, ["model.onehot_gather=off", "model.region_modulation=on"])
    with pytest.raises(ConfigError, match="model.onehot_gather: invalid value 'fast'"):
        load_config(None, ["model.onehot_gather=fast"])


@pytest.mark.parametrize("path", SPEED_PATHS)
def test_every_path_equals_the_dense_reference(path):
    ref, fast = _generators()
    for layer in spade_layers(fast).values():
        layer.path = path
    assert_same_outputs_and_gradients(ref, fast, _semantics(2, 64, 64))


def test_fake_timing_takes_both_choices_and_the_mixed_plan_stays_exact(tmp_path):
    ref, fast = _generators()
    seg = _semantics(2, 64, 64)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    # Low resolutions: dense is "faster"; high ones: region; 16 x 16: gather.
    timer = _fake_timer({2: "dense", 4: "dense", 8: "dense", 16: "gather", 32: "region", 64: "region"})
    plan, source = choose_speed_paths([fast], seg, "auto", "auto", tmp_path / PLAN_FILE, is_main=True, timer=timer)
    assert source == "measured"
    layers = spade_layers(fast)
    assert {layer.path for layer in layers.values()} == {"dense", "gather", "region"}, plan.layers
    assert all(layer.path == plan.layers[name] for name, layer in layers.items())
    assert plan.layers["head_0.norm_0"] == "dense" and plan.layers["up_3.norm_0"] == "region"
    # Measuring left the training state alone: same weights and buffers, no gradients, train mode.
    assert all(torch.equal(v, fast.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in fast.parameters()) and fast.training
    assert_same_outputs_and_gradients(ref, fast, seg)
    # The opposite timing flips the choice: the decision follows the measurement.
    _, fast2 = _generators()
    plan2, _ = choose_speed_paths([fast2], seg, "auto", "off", None, is_main=True,
                                  timer=_fake_timer({h: "gather" if h < 16 else "dense" for h in (2, 4, 8, 16, 32, 64)}))
    assert plan2.layers["head_0.norm_0"] == "gather" and plan2.layers["up_3.norm_0"] == "dense"


def test_layers_of_one_shape_share_one_measurement():
    _, fast = _generators()
    calls: list = []
    choose_speed_paths([fast], _semantics(2, 64, 64), "auto", "auto", None, is_main=True,
                       timer=_fake_timer({}, calls))
    keys = [k for k, _ in calls]
    assert len(set(keys)) < len(spade_layers(fast))  # e.g. head_0 / G_middle_* share a shape
    assert len(calls) == 3 * len(set(keys))  # every candidate once per shape


def test_plan_is_recorded_and_a_resume_keeps_it(tmp_path):
    seg = _semantics(2, 64, 64)
    _, first = _generators()
    plan, _ = choose_speed_paths([first], seg, "auto", "auto", tmp_path / PLAN_FILE, is_main=True,
                                 timer=_fake_timer({h: "dense" for h in (2, 4, 8, 16, 32, 64)}))
    recorded = json.loads((tmp_path / PLAN_FILE).read_text())
    assert recorded["device_type"] == "cpu" and set(recorded["layers"].values()) == {"dense"}

    def must_not_measure(key, path, run):
        raise AssertionError("a resumed run must not measure again")

    _, resumed = _generators()
    again, source = choose_speed_paths([resumed], seg, "auto", "auto", tmp_path / PLAN_FILE, is_main=True, timer=must_not_measure)
    assert source == "recorded" and again.layers == plan.layers
    assert {layer.path for layer in spade_layers(resumed).values()} == {"dense"}
    # Forced switches win over the record, without measuring.
    forced, source = choose_speed_paths([resumed], seg, "on", "off", tmp_path / PLAN_FILE, is_main=True, timer=must_not_measure)
    assert source == "forced" and set(forced.layers.values()) == {"gather"}
    # A record from another device type is measured again.
    (tmp_path / PLAN_FILE).write_text(json.dumps({**recorded, "device_type": "cuda"}))
    _, other = _generators()
    _, source = choose_speed_paths([other], seg, "auto", "auto", tmp_path / PLAN_FILE, is_main=True,
                                   timer=_fake_timer({h: "region" for h in (2, 4, 8, 16, 32, 64)}))
    assert source == "measured"


def test_deterministic_runs_do_not_time(tmp_path):
    def must_not_measure(key, path, run):
        raise AssertionError("train.deterministic: no timing")

    _, fast = _generators()
    plan, source = choose_speed_paths([fast], _semantics(2, 64, 64), "auto", "auto", tmp_path / PLAN_FILE, is_main=True,
                                      timer=must_not_measure, deterministic=True)
    assert source == "deterministic" and set(plan.layers.values()) == {"region"}
    plan, _ = choose_speed_paths([fast], _semantics(2, 64, 64), "auto", "off", None, is_main=True,
                                 timer=must_not_measure, deterministic=True)
    assert set(plan.layers.values()) == {"gather"}


def _broadcast_rank(rank: int, world: int) -> dict:
    _, fast = _generators()
    seg = _semantics(2, 64, 64, seed=rank)  # ranks see different batches; rank 0's decides

    def timer(key, path, run):
        if rank != 0:
            raise AssertionError("only rank 0 measures")
        return _fake_timer({h: "gather" for h in (2, 4, 8, 16)} | {32: "region", 64: "region"})(key, path, run)

    plan, _ = choose_speed_paths([fast], seg, "auto", "auto", None, is_main=rank == 0, timer=timer)
    return {name: layer.path for name, layer in spade_layers(fast).items()} | {"_plan": plan.layers}


@pytest.mark.dist
def test_rank0_decides_and_every_rank_applies_its_choice():
    r0, r1 = run_distributed(_broadcast_rank, 2)
    assert r0 == r1
    assert set(r0["_plan"].values()) == {"gather", "region"}
