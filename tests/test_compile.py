"""``speed.compile``: the compiled training step equals the eager one; checkpoints keep their format.

One full iteration (G step, then D step, Adam, fp32) from the same weights on the same batch.
Tolerances, stated per quantity: losses 1e-4 absolute; gradients (Adam's ``exp_avg``, which is
the gradient itself with the default ``optim.beta1=0``) 1e-3 of the network's largest gradient;
buffers (BN running statistics, spectral-norm vectors) 1e-3: the D step's fresh G forward runs a
power iteration on the updated weights, which may differ as described next. Inductor fuses and reorders float32
reductions, so bit equality is not expected. Parameters: Adam's first update is lr * g / (|g| + eps),
about lr * sign(g), so a gradient that is zero up to rounding may flip sign and move that element
by 2 lr the other way; the test allows that where the gradient is below 1e-3 of the network's
largest and requires equality to 1e-6 everywhere else. A wrong graph (a lost spectral-norm update, D trained in the G step) breaks these bounds
by orders of magnitude.

With ``speed.activation_checkpointing`` the compiled step is compared in float64 instead (the
checkpointed blocks run eagerly; everything else compiled): 1e-10 against the eager steps.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_train_step import B, global_batch, tiny_config

pytestmark = pytest.mark.slow  # compiling a whole (tiny) GAN step takes minutes on 2 cores

TOLERANCE = 1e-4


def _train(compile_: bool):
    from spade_dist.train.backends import DDPBackend
    from spade_dist.train.state import build_train_state
    from spade_dist.train.step import LossSet, prepare_batch, train_step

    # Dense SPADE paths: the gather / region paths run eager under compile anyway (graph breaks).
    cfg = tiny_config("loss.no_vgg_loss=true", "model.num_D=1", "speed.onehot_gather=off", "speed.region_modulation=off",
                      f"speed.compile={str(compile_).lower()}")
    torch.manual_seed(0)
    backend = DDPBackend.setup(cfg)
    state = build_train_state(cfg, backend.device, fused_adam=True)
    if compile_:
        state.compile(cfg.speed.compile_mode)
    backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, state.scaler_G, state.scaler_D)
    mb = prepare_batch(global_batch(B), cfg, backend.device)
    initial = {k: v.clone() for k, v in state.generator.state_dict().items()}
    result = train_step(backend, LossSet.from_config(cfg, None), [mb], 0, cfg)
    state.step += 1
    state.ema.update(state.generator, state.step)
    return cfg, state, result, initial


def _grads_by_name(module: torch.nn.Module, opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Parameter name (as in the network's state dict) -> the step's gradient (Adam exp_avg, beta1=0)."""
    names = [n.removeprefix(prefix) for n, _ in module.named_parameters()]
    return {names[i]: state["exp_avg"] for i, state in opt.state_dict()["state"].items()}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"{what} differs by {diff} (tolerance {tol})"


def test_compiled_step_equals_eager_and_checkpoint_format_is_unchanged():
    cfg, eager, eager_result, initial = _train(False)
    _, compiled, compiled_result, _ = _train(True)
    # The compiled path really ran compiled code (not silently eager).
    assert compiled.generator_side._compiled_call_impl is not None
    assert compiled.discriminator._compiled_call_impl is not None
    assert set(eager_result.losses) == set(compiled_result.losses)
    for name, value in eager_result.losses.items():
        _close(value, compiled_result.losses[name], 1e-4, f"loss {name}")
    assert cfg.optim.beta1 == 0.0  # so exp_avg is the step's gradient
    for which in ("opt_G", "opt_D"):
        ref_opt, got_opt = getattr(eager, which).state_dict()["state"], getattr(compiled, which).state_dict()["state"]
        assert ref_opt.keys() == got_opt.keys()
        # Scale: the network's largest gradient (a bias followed by BN has a gradient that is zero
        # up to rounding; a per-tensor scale would compare rounding noise with itself).
        scale = max(state["exp_avg"].abs().max().item() for state in ref_opt.values())
        for idx in ref_opt:
            _close(ref_opt[idx]["exp_avg"], got_opt[idx]["exp_avg"], 1e-3 * scale, f"{which} gradient {idx}")
    ref, got = eager.state_dict(), compiled.state_dict()
    lr = max(eager.lrs())
    grads = {"generator": _grads_by_name(eager.generator_side, eager.opt_G, "netG."),
             "discriminator": _grads_by_name(eager.discriminator, eager.opt_D, "")}
    for part in ("generator", "discriminator"):
        assert list(ref[part]) == list(got[part]), part  # same keys, no "_orig_mod." prefix
        scale = max(g.abs().max().item() for g in grads[part].values())
        for key, value in ref[part].items():
            if not torch.is_floating_point(value):
                assert torch.equal(value, got[part][key]), f"{part}.{key}"
            elif key in grads[part]:
                diff = (value - got[part][key]).abs()
                significant = grads[part][key].abs() > 1e-3 * scale
                assert diff.max().item() <= 2 * lr + 1e-6, f"{part}.{key}"
                assert not significant.any() or diff[significant].max().item() <= 1e-6, f"{part}.{key}"
            else:
                _close(value, got[part][key], 1e-3, f"{part} buffer {key}")
    # EMA copy: an eager module with the same keys, following the compiled generator.
    assert list(ref["ema"]["model"]) == list(got["ema"]["model"])
    assert not hasattr(compiled.ema.model, "_compiled_call_impl") or compiled.ema.model._compiled_call_impl is None
    # And the step moved the weights (equality of two no-ops would prove nothing).
    moved = max((ref["generator"][k] - v).abs().max().item() for k, v in initial.items() if torch.is_floating_point(v))
    assert moved > 1e-5


def _float64_iteration(compile_: bool, setting: str) -> dict:
    """One float64 iteration (+ EMA) of the compile test's tiny GAN: losses, G / D / EMA state, and
    how often a SPADE layer's norm of the full-resolution block ran (G step forward, its
    recomputations, the D step)."""
    from spade_dist.train.step import LossSet, prepare_batch, train_step
    from tests.test_train_step import float64_rank_state

    cfg, backend, state = float64_rank_state(
        "ddp", 0, "", 2 * B, "loss.no_vgg_loss=true", "model.num_D=1", "speed.onehot_gather=off",
        "speed.region_modulation=off", f"speed.compile={str(compile_).lower()}", f"speed.activation_checkpointing={setting}")
    calls = [0]
    state.generator.up_3.norm_0.param_free_norm.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    if compile_:
        state.compile(cfg.speed.compile_mode)
        assert state.generator_side._compiled_call_impl is not None
    batch = prepare_batch(global_batch(2 * B), cfg, backend.device, torch.float64)
    result = train_step(backend, LossSet.from_config(cfg, None), [batch], 0, cfg)
    state.ema.update(state.generator, 1)
    clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
    return {"losses": {k: v.item() for k, v in result.losses.items()}, "G": clone(state.generator.state_dict()),
            "D": clone(state.discriminator.state_dict()), "EMA": clone(state.ema.model.state_dict()),
            "norm_calls": calls[0]}


def test_compiled_step_with_activation_checkpointing_equals_the_eager_steps():
    """speed.compile with speed.activation_checkpointing=generator_spade, float64: the same iteration
    (losses, every parameter and buffer of G and D after the update, EMA) as eager with and without
    checkpointing, to 1e-10 (compiled vs eager float64 differ by ~1e-11: inductor reorders
    reductions), integer buffers (BN's num_batches_tracked) equal. The checkpointed blocks run outside
    the compiled graphs (models/fast/checkpointing.py), each recomputed in the backward. One compiled
    run only (a second, compiled without checkpointing, would double the test's minutes); the test
    above compares the compiled and the eager step without checkpointing (fp32)."""
    from tests.test_activation_checkpointing import RECOMPUTED

    on = _float64_iteration(True, "generator_spade")
    references = {"eager, off": _float64_iteration(False, "off"),
                  "eager, generator_spade": _float64_iteration(False, "generator_spade")}
    # G step forward + 2 recomputations (the block, then the SPADE layer inside it) + the D step's no-grad G.
    assert on["norm_calls"] == references["eager, generator_spade"]["norm_calls"] == 2 + RECOMPUTED["generator_spade"]["top"]
    for name, off in references.items():
        assert off["losses"].keys() == on["losses"].keys()
        for loss, value in off["losses"].items():
            assert abs(value - on["losses"][loss]) <= 1e-10, (name, loss)
        for part in ("G", "D", "EMA"):
            assert off[part].keys() == on[part].keys()
            for key, value in off[part].items():
                if not torch.is_floating_point(value):
                    assert torch.equal(value, on[part][key]), (name, part, key)
                else:
                    diff = (value - on[part][key]).abs().max().item()
                    assert diff <= 1e-10, f"{name}: {part}.{key} differs by {diff}"
    assert any(k.endswith("running_mean") for k in on["G"])  # the BN statistics were compared
