"""speed.activation_checkpointing: the step with the generator's blocks (and with ``all`` the G step's
VGG slices and D) recomputed is the step without.

One full official iteration (G step with GAN + feature matching + VGG, then D step, then EMA) in
float64: losses, every parameter and buffer of G and D after the update (BN running statistics,
spectral-norm u / v) and the EMA generator agree to 1e-10 with checkpointing off and on, on the
reference layers and on the speed paths, in 1 process and on 2 gloo ranks with synchronized BN
(DDP and DeepSpeed). The blocks really are recomputed (each runs twice in the G step), and with
``all`` VGG's slices and D's stages.
"""
from __future__ import annotations

import pytest
import torch

from spade_dist.losses import VGGLoss, save_random_vgg19_weights
from tests.dist_utils import run_distributed
from tests.test_train_step import B, float64_rank_state, global_batch, tiny_config


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    return save_random_vgg19_weights(tmp_path_factory.mktemp("vgg") / "vgg19.pth", seed=3)


def _iteration(vgg_path: str, backend_name: str, rank: int, world: int, *extra: str) -> dict:
    """One iteration (+ EMA update) of the 2B global batch, this rank's share; what it produced."""
    from spade_dist.train.step import LossSet, prepare_batch, train_step

    zero_stage = 2 if backend_name == "deepspeed" else 0  # test_train_step's float64 DeepSpeed setting
    per = 2 * B // world
    cfg, backend, state = float64_rank_state(backend_name, zero_stage, vgg_path, per, *extra)
    # Forwards of one SPADE layer's norm (the G step's, its recomputations, the D step's), of a VGG
    # slice and of the convolution of a D stage with instance norm.
    calls = {"norm": 0, "top": 0, "head": 0, "vgg": 0, "D": 0}

    def count(name: str):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)
    vgg = VGGLoss.from_file(vgg_path).double()
    # up_1: a block at >= 1/8 of the output width (8 of 32 px); up_3: the full-resolution block; head_0: below 1/8.
    state.generator.up_1.norm_0.param_free_norm.register_forward_pre_hook(count("norm"))
    state.generator.up_3.norm_0.param_free_norm.register_forward_pre_hook(count("top"))
    state.generator.head_0.norm_0.param_free_norm.register_forward_pre_hook(count("head"))
    vgg.vgg.slices[1].register_forward_pre_hook(count("vgg"))
    state.discriminator.discriminator_0.model1[0].register_forward_pre_hook(count("D"))
    losses = LossSet.from_config(cfg, vgg)
    full = global_batch(2 * B)
    mine = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
    result = train_step(backend, losses, [prepare_batch(mine, cfg, backend.device, torch.float64)], 0, cfg)
    assert result.ran_G and float(result.skipped_G) == 0 and float(result.skipped_D) == 0
    state.ema.update(state.generator, 1)
    clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
    return {"losses": {k: v.detach().clone() for k, v in result.losses.items()},
            "G": clone(state.generator.state_dict()), "D": clone(state.discriminator.state_dict()),
            "EMA": clone(state.ema.model.state_dict()), "calls": calls}


# Extra forwards in the G step: of a SPADE layer in a block at >= 1/8 of the output width (recomputed
# with its block), in the full-resolution block (generator_spade / all: recomputed once more, nested)
# and in head_0 (below 1/8: recomputed with all only), of a VGG slice, of a D stage (all: D recomputed,
# and each of its stages once more inside the recomputation).
RECOMPUTED = {"generator": {"norm": 1, "top": 1, "head": 0, "vgg": 0, "D": 0},
              "generator_spade": {"norm": 1, "top": 2, "head": 0, "vgg": 0, "D": 0},
              "all": {"norm": 1, "top": 2, "head": 1, "vgg": 1, "D": 2}}


def _assert_equal_steps(off: dict, on: dict, setting: str) -> None:
    assert off["losses"].keys() == on["losses"].keys() == {"GAN", "GAN_Feat", "VGG", "D_Fake", "D_real"}
    for name, value in off["losses"].items():
        assert abs(value.item() - on["losses"][name].item()) <= 1e-10, name
    for part in ("G", "D", "EMA"):
        assert off[part].keys() == on[part].keys()
        for key, value in off[part].items():
            if not torch.is_floating_point(value):  # num_batches_tracked: counted once per forward
                assert torch.equal(value, on[part][key]), f"{part}.{key}"
                continue
            diff = (value - on[part][key]).abs().max().item()
            assert diff <= 1e-10, f"{part}.{key} differs by {diff}"
    # G step forward (+ its recomputations when on) and the D step's no-grad fake; VGG on fake and
    # real; D in the G step (one joint pass, or the fake and then the real images) and the D step.
    assert off["calls"]["norm"] == off["calls"]["top"] == off["calls"]["head"] == 2
    assert off["calls"]["vgg"] == 2 and off["calls"]["D"] in (2, 3)
    assert on["calls"] == {k: off["calls"][k] + extra for k, extra in RECOMPUTED[setting].items()}


@pytest.mark.parametrize("setting", ["generator", "generator_spade", "all"])
@pytest.mark.parametrize("paths", [("speed.fused_modulation=false", "speed.g_step_real_pass=joint"),
                                   ("speed.region_modulation=on",)], ids=["reference", "fast"])
def test_checkpointed_iteration_equals_the_plain_one(vgg_file, paths, setting):
    off = _iteration(str(vgg_file), "ddp", 0, 1, *paths)
    on = _iteration(str(vgg_file), "ddp", 0, 1, *paths, f"speed.activation_checkpointing={setting}")
    _assert_equal_steps(off, on, setting)
    assert any(k.endswith("running_mean") for k in on["G"])  # the BN statistics were compared


def _both_rank(rank: int, world: int, backend_name: str, vgg_path: str) -> tuple[dict, dict]:
    off = _iteration(vgg_path, backend_name, rank, world)
    on = _iteration(vgg_path, backend_name, rank, world, "speed.activation_checkpointing=all")
    return off, on


@pytest.mark.dist
@pytest.mark.parametrize("backend_name", ["ddp", "deepspeed"])
def test_checkpointed_iteration_on_two_ranks_with_sync_bn(vgg_file, backend_name):
    """2 gloo ranks, synchronized BN in G: the recomputations' all-gathers line up on both ranks
    (all: the blocks' and, nested, the SPADE layers' recomputations, then VGG's and D's)."""
    for off, on in run_distributed(_both_rank, 2, (backend_name, str(vgg_file))):
        _assert_equal_steps(off, on, "all")


def test_checkpointing_needs_the_spade_generator():
    from spade_dist.config import ConfigError

    with pytest.raises(ConfigError, match="activation_checkpointing"):
        tiny_config("model.netG=pix2pixhd", "speed.activation_checkpointing=generator")
    tiny_config("speed.compile=true", "speed.activation_checkpointing=generator_spade")  # with compile: tests/test_compile.py
