"""``train.deepspeed_config``: a user JSON merged into the generated DeepSpeed config, bad keys named."""
from __future__ import annotations

import json

import pytest

from spade_dist.config import Config, ConfigError, load_config
from spade_dist.distributed import DistInfo
from spade_dist.train.backends import DeepSpeedBackend, merge_deepspeed_config


def _backend(tmp_path, user: dict | str) -> DeepSpeedBackend:
    path = tmp_path / "ds.json"
    path.write_text(user if isinstance(user, str) else json.dumps(user))
    cfg = load_config(None, ["train.backend=deepspeed", "train.zero_stage=1", f"train.deepspeed_config={path}"])
    return DeepSpeedBackend(cfg, device=None, info=DistInfo(0, 1, 0, 1))  # type: ignore[arg-type]


def test_user_tuning_is_merged(tmp_path):
    user = {"zero_optimization": {"reduce_bucket_size": 1234, "allgather_bucket_size": 4321},
            "steps_per_print": 10, "wall_clock_breakdown": True, "train_micro_batch_size_per_gpu": 3}
    config = _backend(tmp_path, user).ds_config(per_rank_batch=3)
    assert config["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1234, "allgather_bucket_size": 4321}
    assert config["steps_per_print"] == 10 and config["wall_clock_breakdown"] is True
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["bf16"] == {"enabled": False}


@pytest.mark.parametrize("user,key", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage"),
    ({"zero_optimization": {"reduce_bucket_sise": 1}}, "zero_optimization.reduce_bucket_sise"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_unknown_or_conflicting_keys_are_named(tmp_path, user, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        _backend(tmp_path, user).ds_config(per_rank_batch=3)


def test_bad_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train.deepspeed_config.*invalid JSON"):
        _backend(tmp_path, "{not json").ds_config(per_rank_batch=1)
    missing = load_config(None, ["train.backend=deepspeed", f"train.deepspeed_config={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match="train.deepspeed_config: cannot read .*missing.json"):
        DeepSpeedBackend(missing, device=None, info=DistInfo(0, 1, 0, 1)).ds_config(1)  # type: ignore[arg-type]


def test_merge_keeps_the_generated_config_unchanged():
    generated = {"zero_optimization": {"stage": 0}, "steps_per_print": 5}
    merged = merge_deepspeed_config(generated, {"zero_optimization": {"overlap_comm": True}})
    assert merged["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    assert generated == {"zero_optimization": {"stage": 0}, "steps_per_print": 5}


def test_deepspeed_config_needs_the_deepspeed_backend(tmp_path):
    with pytest.raises(ConfigError, match="train.deepspeed_config .* needs train.backend=deepspeed"):
        load_config(None, [f"train.deepspeed_config={tmp_path / 'ds.json'}"])
    assert Config().train.deepspeed_config == ""
