"""SyncBN on gloo equals BatchNorm over the global batch (outputs, input grads, running stats)."""
import torch
from torch import nn

from spade_dist.models.sync_bn import SyncBatchNorm2d
from tests.dist_utils import run_distributed

B, C, H, W = 3, 5, 4, 4


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * B, C, H, W, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(2 * B, C, H, W, generator=g, dtype=torch.float64)
    return x, w


def _rank_fn(rank: int, world: int) -> dict:
    x, w = _global_batch()
    xs = x[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    bn = SyncBatchNorm2d(C, affine=False).double()
    out = bn(xs)
    # Loss = sum over the global batch: each rank's share.
    (out * w[rank * B : (rank + 1) * B]).sum().backward()
    return {"out": out.detach(), "grad": xs.grad, "rm": bn.running_mean, "rv": bn.running_var}


def test_sync_bn_matches_global_batch_norm():
    x, w = _global_batch()
    xr = x.clone().requires_grad_(True)
    ref = nn.BatchNorm2d(C, affine=False).double()
    out = ref(xr)
    (out * w).sum().backward()
    results = run_distributed(_rank_fn, world_size=2)
    got_out = torch.cat([r["out"] for r in results])
    got_grad = torch.cat([r["grad"] for r in results])
    assert torch.allclose(got_out, out.detach(), atol=1e-10, rtol=0)
    assert torch.allclose(got_grad, xr.grad, atol=1e-10, rtol=0)
    for r in results:
        assert torch.allclose(r["rm"], ref.running_mean, atol=1e-10, rtol=0)
        assert torch.allclose(r["rv"], ref.running_var, atol=1e-10, rtol=0)


def test_single_process_is_batch_norm():
    x, _ = _global_batch()
    bn, ref = SyncBatchNorm2d(C, affine=False).double(), nn.BatchNorm2d(C, affine=False).double()
    assert torch.allclose(bn(x), ref(x))
    assert set(bn.state_dict()) == set(ref.state_dict())
