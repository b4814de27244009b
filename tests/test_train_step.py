"""The distributed step is the global-batch step.

- SPADE layer with synchronized BN: 2 gloo ranks x B == 1 process x 2B (outputs, input gradients,
  summed parameter gradients, running stats; float64, 1e-10).
- One full official iteration (G step with GAN + feature matching + VGG from a random weights file,
  then D step; SyncBN generator, multiscale spectral-instance D): parameters after 2 ranks x B equal
  those after 1 process x 2B (float64, 1e-8), for the ddp and the deepspeed backend.
- A non-finite loss skips the update and is counted; fp16 keeps working through its GradScalers.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spade_dist.losses import VGGLoss, save_random_vgg19_weights
from spade_dist.models.spade import SPADE
from tests import kit
from tests.dist_utils import run_distributed

B, CROP = 2, 32  # configs/tiny.yaml's batch and crop, which tiny_config below keeps
LABEL_NC = 4


# ---------------------------------------------------------------------------- SPADE layer SyncBN


def _spade_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * B, 6, 8, 8, generator=g, dtype=torch.float64) * 2 + 0.5
    seg = torch.nn.functional.one_hot(torch.randint(0, 3, (2 * B, 16, 16), generator=g), 3).permute(0, 3, 1, 2).double()
    w = torch.randn(2 * B, 6, 8, 8, generator=g, dtype=torch.float64)
    return x, seg, w


def _spade_layer() -> SPADE:
    torch.manual_seed(0)
    return SPADE("spadesyncbatch3x3", 6, 3).double()


def _spade_rank(rank: int, world: int) -> dict:
    x, seg, w = _spade_inputs()
    per = x.shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    xs = x[sl].clone().requires_grad_(True)
    layer = _spade_layer()
    out = layer(xs, seg[sl])
    (out * w[sl]).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for g in grads.values():  # what DDP would do (sum here, the reference loss is a sum)
        dist.all_reduce(g)
    bn = layer.param_free_norm
    return {"out": out.detach(), "grad": xs.grad, "param_grads": grads, "rm": bn.running_mean.clone(), "rv": bn.running_var.clone()}


@pytest.mark.dist
def test_spade_layer_syncbn_matches_global_batch():
    reference = run_distributed(_spade_rank, world_size=1)[0]
    ranks = run_distributed(_spade_rank, world_size=2)
    tol = dict(atol=1e-10, rtol=0)
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), reference["out"], **tol)
    assert torch.allclose(torch.cat([r["grad"] for r in ranks]), reference["grad"], **tol)
    for r in ranks:
        for name, g in reference["param_grads"].items():
            assert torch.allclose(r["param_grads"][name], g, **tol), name
        assert torch.allclose(r["rm"], reference["rm"], **tol)
        assert torch.allclose(r["rv"], reference["rv"], **tol)
        assert r["rv"].abs().sum() > 0  # running stats really moved


# ---------------------------------------------------------------------------- full step


def tiny_config(*extra: str):
    """The tiny preset (32 px, batch 2, ngf 8) with :func:`global_batch`'s labels and instance maps and the
    official step: VGG loss on, the official learning rate."""
    return kit.tiny_config(f"data.label_nc={LABEL_NC}", "data.no_instance=false", "loss.no_vgg_loss=false",
                           "optim.lr=0.0002", *extra)


def global_batch(n: int, crop: int = CROP) -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "image": torch.randint(0, 256, (n, 3, crop, crop), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, LABEL_NC, (n, 1, crop, crop), generator=g),
        "instance": torch.randint(0, 3, (n, 1, crop, crop), generator=g),
        "key": [f"k{i}" for i in range(n)],
    }


def _deepspeed_float64_backend() -> type:
    """The deepspeed backend for float64 verification runs: DeepSpeed all-reduces gradients in fp32
    unless told otherwise and its config parser accepts no fp64, so fp64 gradients would be rounded
    to fp32 on the wire. This subclass asks for fp64 communication and lets the parser map it to
    torch.float64 while the engines are built."""
    import deepspeed.runtime.config as ds_config

    from spade_dist.train.backends import DeepSpeedBackend

    class Float64DeepSpeedBackend(DeepSpeedBackend):
        def ds_config(self, per_rank_batch: int) -> dict:
            config = super().ds_config(per_rank_batch)
            config["communication_data_type"] = "fp64"
            config["zero_optimization"]["reduce_scatter"] = False  # ZeRO-2 reduce-scatter takes <= fp32
            return config

        def wrap(self, *args, **kwargs) -> None:
            original = ds_config.get_communication_data_type

            def parse(param_dict: dict, *rest, **options):
                if str(param_dict.get("communication_data_type", "")).lower() == "fp64" and not rest and not options:
                    return torch.float64
                return original(param_dict, *rest, **options)

            ds_config.get_communication_data_type = parse
            try:
                super().wrap(*args, **kwargs)
            finally:
                ds_config.get_communication_data_type = original

    return Float64DeepSpeedBackend


def float64_rank_state(backend_name: str, zero_stage: int, vgg_path: str, per_rank: int, *extra: str):
    """(cfg, backend, state) of this rank for the float64 step comparisons: seed 0, wrapped."""
    from spade_dist.train.backends import DDPBackend
    from spade_dist.train.state import build_train_state

    cfg = tiny_config(f"train.backend={backend_name}", f"train.zero_stage={zero_stage}", f"loss.vgg_weights={vgg_path}",
                      *extra)
    torch.manual_seed(0)
    backend = (_deepspeed_float64_backend() if backend_name == "deepspeed" else DDPBackend).setup(cfg)
    state = build_train_state(cfg, backend.device, fused_adam=backend_name == "ddp", dtype=torch.float64)
    if backend_name == "deepspeed":
        backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, per_rank)
    else:
        backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, None, None)
    return cfg, backend, state


def _step_rank(rank: int, world: int, backend_name: str, vgg_path: str, zero_stage: int) -> dict:
    from spade_dist.train.step import LossSet, prepare_batch, train_step

    per = 2 * B // world
    cfg, backend, state = float64_rank_state(backend_name, zero_stage, vgg_path, per)
    vgg = VGGLoss.from_file(vgg_path).double()
    losses = LossSet.from_config(cfg, vgg)
    full = global_batch(2 * B)
    mine = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
    result = train_step(backend, losses, [prepare_batch(mine, cfg, backend.device, torch.float64)], 0, cfg)
    assert result.ran_G and float(result.skipped_G) == 0 and float(result.skipped_D) == 0
    return {
        "G": {k: v.detach().clone() for k, v in state.generator.state_dict().items()},
        "D": {k: v.detach().clone() for k, v in state.discriminator.state_dict().items()},
    }


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    return save_random_vgg19_weights(tmp_path_factory.mktemp("vgg") / "vgg19.pth", seed=3)


def _assert_same(ref: dict, got: dict, tol: float) -> None:
    for net in ("G", "D"):
        for key, value in ref[net].items():
            if not torch.is_floating_point(value):
                assert torch.equal(value, got[net][key]), f"{net}.{key}"
                continue
            diff = (value - got[net][key]).abs().max().item()
            assert diff <= tol, f"{net}.{key} differs by {diff}"


def _initial_params(backend_name: str) -> dict:
    from spade_dist.train.state import build_train_state

    cfg = tiny_config()
    torch.manual_seed(0)
    state = build_train_state(cfg, torch.device("cpu"), fused_adam=False, dtype=torch.float64)
    return {"G": state.generator.state_dict(), "D": state.discriminator.state_dict()}


@pytest.mark.dist
@pytest.mark.parametrize("backend_name,zero_stage", [("ddp", 0), ("deepspeed", 2)])
def test_distributed_step_equals_global_batch_step(vgg_file, backend_name, zero_stage):
    reference = run_distributed(_step_rank, 1, (backend_name, str(vgg_file), zero_stage))[0]
    ranks = run_distributed(_step_rank, 2, (backend_name, str(vgg_file), zero_stage))
    for r in ranks:
        _assert_same(reference, r, 1e-8)
    # The step really moved both networks (a no-op step would pass the comparison trivially).
    start = _initial_params(backend_name)
    moved_G = max((reference["G"][k] - v).abs().max().item() for k, v in start["G"].items() if torch.is_floating_point(v))
    moved_D = max((reference["D"][k] - v).abs().max().item() for k, v in start["D"].items() if torch.is_floating_point(v))
    assert moved_G > 1e-5 and moved_D > 1e-5


# ---------------------------------------------------------------------------- non-finite & AMP


def _single_backend(*extra: str):
    from spade_dist.train.backends import DDPBackend
    from spade_dist.train.state import build_train_state
    from spade_dist.train.step import LossSet

    cfg = tiny_config("loss.no_vgg_loss=true", *extra)
    torch.manual_seed(0)
    backend = DDPBackend.setup(cfg)
    state = build_train_state(cfg, backend.device, fused_adam=True)
    backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, state.scaler_G, state.scaler_D)
    return cfg, backend, state, LossSet.from_config(cfg, None)


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_nonfinite_loss_is_skipped_and_counted(precision):
    from spade_dist.train.step import prepare_batch, train_step

    cfg, backend, state, losses = _single_backend(f"train.mixed_precision='{precision}'")
    mb = prepare_batch(global_batch(B), cfg, backend.device)
    before_G = [p.detach().clone() for p in state.generator_side.parameters()]
    before_D = [p.detach().clone() for p in state.discriminator.parameters()]

    def poison_G(which: str, loss: torch.Tensor):
        return loss * float("nan") if which == "G" else None

    result = train_step(backend, losses, [mb], 0, cfg, loss_hook=poison_G)
    assert float(result.skipped_G) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before_G, state.generator_side.parameters()))
    assert all(float(s["step"]) == 0 for s in state.opt_G.state.values())  # Adam's step count untouched
    if precision == "no":
        # fp32: the clean D update went through. (fp16: GradScaler's first steps may overflow and be
        # skipped too, while it backs off from its initial scale - also correct.)
        assert float(result.skipped_D) == 0.0
        assert any(not torch.equal(a, b) for a, b in zip(before_D, state.discriminator.parameters()))
    # Clean steps afterwards apply normally (the poisoned one left no stale gradients).
    for step in range(1, 20):
        clean = train_step(backend, losses, [mb], step, cfg)
        if float(clean.skipped_G) == 0.0:
            break
    assert float(clean.skipped_G) == 0.0
    assert all(torch.isfinite(p).all() for p in state.generator_side.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_G, state.generator_side.parameters()))


def test_bf16_autocast_step_runs():
    from spade_dist.train.step import prepare_batch, train_step

    cfg, backend, state, losses = _single_backend("train.mixed_precision=bf16")
    result = train_step(backend, losses, [prepare_batch(global_batch(B), cfg, backend.device)], 0, cfg)
    assert all(torch.isfinite(v) for v in result.losses.values())
    assert set(result.losses) == {"GAN", "GAN_Feat", "D_Fake", "D_real"}
    assert all(p.dtype == torch.float32 for p in state.generator_side.parameters())  # fp32 master weights


def test_d_steps_per_g_skips_generator_on_off_steps():
    from spade_dist.train.step import prepare_batch, train_step

    cfg, backend, state, losses = _single_backend("optim.D_steps_per_G=2")
    mb = prepare_batch(global_batch(B), cfg, backend.device)
    assert train_step(backend, losses, [mb], 0, cfg).ran_G
    before = [p.detach().clone() for p in state.generator_side.parameters()]
    off = train_step(backend, losses, [mb], 1, cfg)
    assert not off.ran_G and "GAN" not in off.losses
    assert all(torch.equal(a, b) for a, b in zip(before, state.generator_side.parameters()))


def _accumulated_vs_big_batch(*extra: str) -> float:
    """Largest difference of any parameter or buffer after one step of 2 micro-batches of B and one
    of a single batch of 2B (float64, 64 px: a 2x2 latent map)."""
    from spade_dist.train.step import prepare_batch, train_step

    results = []
    for accum in (1, 2):
        cfg, backend, state, losses = _single_backend(*extra, f"train.grad_accum={accum}", "data.crop_size=64",
                                                      "data.load_size=64")
        state.generator_side.double()
        state.discriminator.double()
        full = global_batch(2 * B, crop=64)
        if accum == 1:
            micro = [prepare_batch(full, cfg, backend.device, torch.float64)]
        else:
            micro = [prepare_batch({k: v[i * B:(i + 1) * B] for k, v in full.items()}, cfg, backend.device, torch.float64) for i in range(2)]
        train_step(backend, losses, micro, 0, cfg)
        results.append([t.detach().clone() for net in (state.generator_side, state.discriminator)
                        for t in (*net.parameters(), *(b for b in net.buffers() if torch.is_floating_point(b)))])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def test_grad_accumulation_equals_big_batch():
    """2 micro-batches of B == 1 batch of 2B where nothing couples the samples of a forward:
    instance norm instead of BN and no spectral norm."""
    assert _accumulated_vs_big_batch("model.norm_G=spadeinstance3x3", "model.norm_D=instance") <= 1e-8


@pytest.mark.parametrize("coupling", [("model.norm_G=spadesyncbatch3x3", "model.norm_D=instance"),
                                      ("model.norm_G=spectralspadeinstance3x3", "model.norm_D=spectralinstance")],
                         ids=["batch-norm", "spectral-norm"])
def test_grad_accumulation_differs_from_big_batch_where_docs_say(coupling):
    """docs/TRAINING.md ("Gradient accumulation"): BN statistics come from each micro-batch (B
    samples, not 2B, and running statistics move once per micro-batch), and every forward runs one
    spectral-norm power iteration (2 per update instead of 1). 2 gloo ranks x B equal 1 x 2B even
    with synchronized BN (test_distributed_step_equals_global_batch_step); accumulation does not."""
    assert _accumulated_vs_big_batch(*coupling) > 1e-6


# ---------------------------------------------------------------------------- G step's real pass


def _one_step_float64(vgg_path: str, *extra: str) -> tuple[dict, list[str]]:
    """One full iteration in float64 from seed 0; returns the state dicts and which D calls ran
    (grad / no_grad, train / eval) in order."""
    from spade_dist.train.backends import DDPBackend
    from spade_dist.train.state import build_train_state
    from spade_dist.train.step import LossSet, prepare_batch, train_step

    cfg = tiny_config(f"loss.vgg_weights={vgg_path}", *extra)
    torch.manual_seed(0)
    backend = DDPBackend.setup(cfg)
    state = build_train_state(cfg, backend.device, fused_adam=True, dtype=torch.float64)
    backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, None, None)
    losses = LossSet.from_config(cfg, None if cfg.loss.no_vgg_loss else VGGLoss.from_file(vgg_path).double())
    calls: list[str] = []
    state.discriminator.register_forward_pre_hook(
        lambda m, _args: calls.append(("grad" if torch.is_grad_enabled() else "no_grad") + ("/train" if m.training else "/eval")))
    result = train_step(backend, losses, [prepare_batch(global_batch(B), cfg, backend.device, torch.float64)], 0, cfg)
    assert result.ran_G and all(m.training for m in state.discriminator.modules())  # modes restored
    return {"G": {k: v.detach().clone() for k, v in state.generator.state_dict().items()},
            "D": {k: v.detach().clone() for k, v in state.discriminator.state_dict().items()}}, calls


def test_separate_real_pass_equals_the_joint_pass(vgg_file):
    """speed.g_step_real_pass=separate (default): the same update as the official single pass over
    cat(fake, real), spectral-norm u/v included (one power iteration per G step), float64."""
    joint, joint_calls = _one_step_float64(str(vgg_file), "speed.g_step_real_pass=joint")
    separate, separate_calls = _one_step_float64(str(vgg_file))
    assert joint_calls == ["grad/train", "grad/train"]  # G step, D step
    assert separate_calls == ["grad/train", "no_grad/eval", "grad/train"]
    _assert_same(joint, separate, 1e-10)
    start = _initial_params("ddp")
    assert max((joint["D"][k] - v).abs().max().item() for k, v in start["D"].items() if k.endswith("weight_u")) > 1e-6


def test_separate_real_pass_is_skipped_or_refused_where_it_would_change_the_step(vgg_file):
    from spade_dist.models.discriminator import MultiscaleDiscriminator
    from spade_dist.train.step import judges_images_independently

    # Without feature matching the G step never needs the real images' features.
    _, calls = _one_step_float64(str(vgg_file), "loss.no_ganFeat_loss=true", "loss.no_vgg_loss=true")
    assert calls == ["grad/train", "grad/train"]
    # Batch statistics couple the images: such a D keeps the joint pass.
    assert judges_images_independently(MultiscaleDiscriminator(8, ndf=4, norm_D="spectralinstance"))
    for norm_D in ("spectralbatch", "spectralsyncbatch", "batch"):
        assert not judges_images_independently(MultiscaleDiscriminator(8, ndf=4, norm_D=norm_D))
    _, calls = _one_step_float64(str(vgg_file), "model.norm_D=spectralbatch", "loss.no_vgg_loss=true")
    assert calls == ["grad/train", "grad/train"]
