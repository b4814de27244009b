"""CUDA-only code paths: NCCL SyncBN, bf16/fp16 steps, speed paths, GPU checkpoints, FID features.

Marked ``cuda`` and skipped, with the reason, on machines without a CUDA device (the one allowed
skip). ``bench/gpu_check.sh`` runs them on a GPU machine (``pytest -m cuda``).

Tolerances: float64 comparisons 1e-10 (summation order only); float32 on the GPU with TF32 off
1e-4 relative to the values' scale (cuDNN picks different algorithms than the CPU); mixed precision
vs fp32 after a few steps: see the test.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

NO_CUDA = "no CUDA device: the cuda tests run on a GPU machine (bench/gpu_check.sh)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact-ish fp32 on the GPU: TF32 would round matmul / conv inputs to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------- NCCL SyncBN


def _syncbn_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64)
    return x, w


def _syncbn_rank(rank: int, world: int, device_type: str = "cuda") -> dict:
    from spade_dist.models.sync_bn import SyncBatchNorm2d

    x, w = _syncbn_inputs(world)
    per = x.shape[0] // world
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    xs = x[rank * per:(rank + 1) * per].to(device).requires_grad_(True)
    bn = SyncBatchNorm2d(6).double().to(device).train()
    out = bn(xs)
    (out * w[rank * per:(rank + 1) * per].to(device)).sum().backward()
    return {"out": out.detach().cpu(), "grad": xs.grad.cpu(), "rm": bn.running_mean.cpu(), "rv": bn.running_var.cpu()}


def _global_batch_bn() -> dict:
    x, w = _syncbn_inputs(1)
    x = x.clone().requires_grad_(True)
    bn = torch.nn.BatchNorm2d(6).double().train()
    out = bn(x)
    (out * w).sum().backward()
    return {"out": out.detach(), "grad": x.grad, "rm": bn.running_mean, "rv": bn.running_var}


def _assert_matches_global_batch(ranks: list[dict]) -> None:
    ref = _global_batch_bn()
    per = ref["out"].shape[0] // len(ranks)
    for r, got in enumerate(ranks):
        sl = slice(r * per, (r + 1) * per)
        assert (got["out"] - ref["out"][sl]).abs().max().item() < 1e-10
        assert (got["grad"] - ref["grad"][sl]).abs().max().item() < 1e-10
        assert (got["rm"] - ref["rm"]).abs().max().item() < 1e-10
        assert (got["rv"] - ref["rv"]).abs().max().item() < 1e-10


def test_nccl_syncbn_world_size_one_equals_batchnorm():
    """NCCL forbids two ranks on one GPU: a group of one rank runs torch's CUDA SyncBN kernel path."""
    _assert_matches_global_batch(run_distributed(_syncbn_rank, 1, backend="nccl"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one NCCL rank per GPU)")
def test_nccl_syncbn_two_gpus_equals_batchnorm_on_the_global_batch():
    _assert_matches_global_batch(run_distributed(_syncbn_rank, 2, backend="nccl"))


def test_gloo_reference_agrees_with_nccl():
    """The CPU/gloo SyncBN on 2 ranks and the NCCL one (1 rank, the whole batch) agree."""
    gloo = run_distributed(_syncbn_rank, 2, ("cpu",))
    (nccl,) = run_distributed(_syncbn_rank, 1, ("cuda",), backend="nccl")
    _assert_matches_global_batch(gloo)
    for key in ("out", "grad"):
        assert (torch.cat([r[key] for r in gloo]) - nccl[key]).abs().max().item() < 1e-10
    assert (gloo[0]["rv"] - nccl["rv"]).abs().max().item() < 1e-10


# ------------------------------------------------------------------------ mixed precision steps


def _steps(precision: str, steps: int = 3, device: str = "cuda") -> tuple[dict, list]:
    """(generator weights, step results) after ``steps`` steps from seed 0 on one batch."""
    from spade_dist.train.backends import DDPBackend
    from spade_dist.train.state import build_train_state
    from spade_dist.train.step import LossSet, prepare_batch, train_step
    from tests.test_train_step import B, global_batch, tiny_config

    cfg = tiny_config("loss.no_vgg_loss=true", f"train.device={device}", f"train.mixed_precision='{precision}'")
    torch.manual_seed(0)
    backend = DDPBackend.setup(cfg)
    state = build_train_state(cfg, backend.device, fused_adam=True)
    backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, state.scaler_G, state.scaler_D)
    mb = prepare_batch(global_batch(B), cfg, backend.device)
    losses = LossSet.from_config(cfg, None)
    results = [train_step(backend, losses, [mb], step, cfg) for step in range(steps)]
    return {k: v.detach().float().cpu() for k, v in state.generator.state_dict().items()}, results


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite_and_close_to_fp32(precision):
    """3 steps from the same weights and batch: every loss and master weight finite, fp32 master
    weights kept, and each loss term within 5% + 0.02 of fp32's at the same step. (Weights are not
    compared: Adam's first steps are ~lr * sign(grad), and rounding flips the sign of near-zero
    gradients, so weight differences say little; losses are what the run sees.) fp16 may skip
    updates while GradScaler backs off from its initial scale: the loss comparison stops at the
    first skipped update, after which the two runs hold different weights."""
    _, ref = _steps("no")
    weights, got = _steps(precision)
    assert all(torch.isfinite(v).all() for r in got for v in r.losses.values())
    assert all(torch.isfinite(v).all() for v in weights.values())
    for step, (a, b) in enumerate(zip(ref, got)):
        for name in a.losses:
            fp32, mixed = float(a.losses[name]), float(b.losses[name])
            assert abs(mixed - fp32) <= 0.05 * abs(fp32) + 0.02, (step, name, fp32, mixed)
        if float(b.skipped_G) or float(b.skipped_D):
            assert precision == "fp16"  # bf16 has no scaler and must not skip
            break


# --------------------------------------------------------------------------------- speed paths


@pytest.mark.parametrize("path", ["gather", "region"])
def test_speed_paths_equal_dense_on_cuda(path):
    import dataclasses

    from tests.test_fast_path import _generators, _semantics, assert_same_outputs_and_gradients

    ref, fast = _generators()
    ref, fast = ref.cuda(), fast.cuda()
    fast.use_modulation(dataclasses.replace(fast.modulation, default=path))
    assert_same_outputs_and_gradients(ref, fast, _semantics(2, 64, 64).cuda())


def test_auto_measures_on_cuda_and_records_the_device(tmp_path):
    from spade_dist.config import SpeedConfig
    from spade_dist.models.fast.choice import choose_speed_paths
    from tests.test_fast_path import _generators, _semantics

    _, fast = _generators()
    plan, source = choose_speed_paths([fast.cuda()], _semantics(2, 64, 64).cuda(), SpeedConfig(), tmp_path / "speed_paths.json",
                                      is_main=True)
    assert source == "measured" and plan.device_type == "cuda"
    assert all(set(t) == {"dense", "gather", "region"} and min(t.values()) > 0 for t in plan.timings.values())


# ------------------------------------------------------------------------- checkpoints from GPU


def test_gpu_checkpoint_async_staging_save_and_restore(tmp_path):
    from spade_dist.checkpoint import CheckpointManager
    from spade_dist.config import CheckpointConfig

    cfg = CheckpointConfig(every_steps=0, keep_last=3, async_save=True, resume="auto")
    model = torch.nn.Linear(1024, 1024).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 1024, device="cuda")).sum().backward()
    opt.step()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(tmp_path, cfg, install_signal_handlers=False)
    mgr.save(1, {"m": model, "opt": opt}, blocking=False)
    with torch.no_grad():  # training goes on: the staged copy must not see this
        model.weight.add_(1.0)
    mgr.wait()
    mgr.close()
    fresh = torch.nn.Linear(1024, 1024).cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    app = {"m": fresh, "opt": fresh_opt}
    assert CheckpointManager(tmp_path, cfg, install_signal_handlers=False).restore(app).step == 1
    for k, v in fresh.state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), expected[k]), k
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"].cpu(), opt.state_dict()["state"][0]["exp_avg"].cpu())


# --------------------------------------------------------------------------------- FID features


def test_fid_features_on_gpu_equal_cpu(tmp_path):
    from spade_dist.eval.inception import build_inception, extract_features, make_test_inception_weights

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=g, dtype=torch.uint8)
    weights = make_test_inception_weights(tmp_path / "inception.pth", images, seed=0)
    cpu = extract_features(build_inception(weights, "cpu"), images)
    gpu = extract_features(build_inception(weights, "cuda"), images)
    scale = cpu.abs().max().item()
    assert scale > 0 and (gpu - cpu).abs().max().item() <= 1e-4 * scale
