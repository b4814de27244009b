"""An independent, purely functional re-implementation of the official SPADE generator forward.

It reads an official-format state dict directly (no nn.Module of the project involved) and follows
the facts of the official checkpoint format (docs/MODELS.md, "Official compatibility"):
- spectral norm in eval: W = weight_orig / (u^T W_mat v) with the STORED u, v (no power iteration);
- SPADE: BatchNorm with running stats (no affine), label map resized with nearest, then
  relu(conv(mlp_shared.0)), gamma = conv(mlp_gamma), beta = conv(mlp_beta), norm * (1 + gamma) + beta;
- block: shortcut (conv_s(norm_s(x)) when fin != fout), conv_0(lrelu(norm_0(x))), conv_1(lrelu(norm_1(.)));
- generator: fc from the resized label map (or Linear from z), head_0, up, G_middle_0, [up], G_middle_1,
  up+up_0 .. up+up_3, [up+up_4], leaky_relu(0.2), conv_img, tanh.

It also builds random official-format state dicts from the key/shape rules, with non-trivial BN
running statistics and spectral-norm u/v vectors that are unit vectors but not converged ones.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

HIDDEN = 128
BN_EPS = 1e-5
N_UP = {"normal": 5, "more": 6, "most": 7}


def latent_hw(crop_size: int, aspect_ratio: float, mode: str) -> tuple[int, int]:
    sw = crop_size // (2 ** N_UP[mode])
    return round(sw / aspect_ratio), sw


def block_widths(ngf: int, mode: str) -> dict[str, tuple[int, int]]:
    nf = ngf
    widths = {
        "head_0": (16 * nf, 16 * nf), "G_middle_0": (16 * nf, 16 * nf), "G_middle_1": (16 * nf, 16 * nf),
        "up_0": (16 * nf, 8 * nf), "up_1": (8 * nf, 4 * nf), "up_2": (4 * nf, 2 * nf), "up_3": (2 * nf, nf),
    }
    if mode == "most":
        widths["up_4"] = (nf, nf // 2)
    return widths


def official_shapes(semantic_nc: int, ngf: int, mode: str = "normal", crop_size: int = 256,
                    aspect_ratio: float = 1.0, use_vae: bool = False, z_dim: int = 256, k: int = 3) -> dict[str, list[int]]:
    """Every key and shape of an official generator state dict (spectral + syncbatch SPADE)."""
    shapes: dict[str, list[int]] = {}
    nf = ngf
    if use_vae:
        sh, sw = latent_hw(crop_size, aspect_ratio, mode)
        shapes["fc.weight"] = [16 * nf * sh * sw, z_dim]
        shapes["fc.bias"] = [16 * nf * sh * sw]
    else:
        shapes["fc.weight"] = [16 * nf, semantic_nc, 3, 3]
        shapes["fc.bias"] = [16 * nf]

    def spade(prefix: str, c: int) -> None:
        shapes[f"{prefix}.param_free_norm.running_mean"] = [c]
        shapes[f"{prefix}.param_free_norm.running_var"] = [c]
        shapes[f"{prefix}.param_free_norm.num_batches_tracked"] = []
        shapes[f"{prefix}.mlp_shared.0.weight"] = [HIDDEN, semantic_nc, k, k]
        shapes[f"{prefix}.mlp_shared.0.bias"] = [HIDDEN]
        shapes[f"{prefix}.mlp_gamma.weight"] = [c, HIDDEN, k, k]
        shapes[f"{prefix}.mlp_gamma.bias"] = [c]
        shapes[f"{prefix}.mlp_beta.weight"] = [c, HIDDEN, k, k]
        shapes[f"{prefix}.mlp_beta.bias"] = [c]

    def sn_conv(prefix: str, cin: int, cout: int, ks: int, bias: bool) -> None:
        if bias:
            shapes[f"{prefix}.bias"] = [cout]
        shapes[f"{prefix}.weight_orig"] = [cout, cin, ks, ks]
        shapes[f"{prefix}.weight_u"] = [cout]
        shapes[f"{prefix}.weight_v"] = [cin * ks * ks]

    for name, (fin, fout) in block_widths(ngf, mode).items():
        fmid = min(fin, fout)
        sn_conv(f"{name}.conv_0", fin, fmid, 3, True)
        sn_conv(f"{name}.conv_1", fmid, fout, 3, True)
        if fin != fout:
            sn_conv(f"{name}.conv_s", fin, fout, 1, False)
        spade(f"{name}.norm_0", fin)
        spade(f"{name}.norm_1", fmid)
        if fin != fout:
            spade(f"{name}.norm_s", fin)
    final = nf // 2 if mode == "most" else nf
    shapes["conv_img.weight"] = [3, final, 3, 3]
    shapes["conv_img.bias"] = [3]
    return shapes


def random_official_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, Tensor]:
    """Random weights (fan-in scaled), BN running stats away from (0, 1), unit but unconverged u/v."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(int(torch.randint(1, 10_000, (1,), generator=g)), dtype=torch.long)
        elif key.endswith("running_mean"):
            sd[key] = torch.randn(shape, generator=g) * 0.3
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) * 1.5 + 0.5
        elif key.endswith("weight_u") or key.endswith("weight_v"):
            continue  # made below from weight_orig
        elif key.endswith("bias"):
            sd[key] = torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    for key in shapes:
        if key.endswith("weight_u"):
            base = key[: -len("weight_u")]
            w = sd[base + "weight_orig"].reshape(shapes[key][0], -1)
            # One power-iteration step from a random v: unit vectors with a positive, not-exact sigma.
            v0 = F.normalize(torch.randn(w.shape[1], generator=g), dim=0)
            u = F.normalize(w @ v0, dim=0)
            v = F.normalize(w.t() @ u, dim=0)
            sd[base + "weight_u"], sd[base + "weight_v"] = u, v
    return sd


# --------------------------------------------------------------------------------------------
# Functional forward
# --------------------------------------------------------------------------------------------


def _sn_weight(sd: dict[str, Tensor], prefix: str) -> Tensor:
    w = sd[f"{prefix}.weight_orig"]
    u, v = sd[f"{prefix}.weight_u"], sd[f"{prefix}.weight_v"]
    sigma = torch.dot(u, w.reshape(w.shape[0], -1) @ v)
    return w / sigma


def _spade(sd: dict[str, Tensor], prefix: str, x: Tensor, seg: Tensor) -> Tensor:
    normalized = F.batch_norm(x, sd[f"{prefix}.param_free_norm.running_mean"],
                              sd[f"{prefix}.param_free_norm.running_var"], None, None, False, 0.0, BN_EPS)
    seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
    w = sd[f"{prefix}.mlp_shared.0.weight"]
    actv = F.relu(F.conv2d(seg, w, sd[f"{prefix}.mlp_shared.0.bias"], padding=w.shape[-1] // 2))
    gw, bw = sd[f"{prefix}.mlp_gamma.weight"], sd[f"{prefix}.mlp_beta.weight"]
    gamma = F.conv2d(actv, gw, sd[f"{prefix}.mlp_gamma.bias"], padding=gw.shape[-1] // 2)
    beta = F.conv2d(actv, bw, sd[f"{prefix}.mlp_beta.bias"], padding=bw.shape[-1] // 2)
    return normalized * (1 + gamma) + beta


def _block(sd: dict[str, Tensor], name: str, x: Tensor, seg: Tensor) -> Tensor:
    if f"{name}.conv_s.weight_orig" in sd:
        x_s = F.conv2d(_spade(sd, f"{name}.norm_s", x, seg), _sn_weight(sd, f"{name}.conv_s"))
    else:
        x_s = x
    dx = F.conv2d(F.leaky_relu(_spade(sd, f"{name}.norm_0", x, seg), 0.2), _sn_weight(sd, f"{name}.conv_0"),
                  sd[f"{name}.conv_0.bias"], padding=1)
    dx = F.conv2d(F.leaky_relu(_spade(sd, f"{name}.norm_1", dx, seg), 0.2), _sn_weight(sd, f"{name}.conv_1"),
                  sd[f"{name}.conv_1.bias"], padding=1)
    return x_s + dx


def official_forward(sd: dict[str, Tensor], seg: Tensor, ngf: int, mode: str = "normal", crop_size: int = 256,
                     aspect_ratio: float = 1.0, use_vae: bool = False, z: Optional[Tensor] = None) -> Tensor:
    """The official generator's eval-mode output for state dict ``sd`` and semantic input ``seg``."""
    sh, sw = latent_hw(crop_size, aspect_ratio, mode)
    if use_vae:
        if z is None:
            raise ValueError("pass z explicitly to compare VAE generators")
        x = F.linear(z, sd["fc.weight"], sd["fc.bias"]).view(-1, 16 * ngf, sh, sw)
    else:
        x = F.conv2d(F.interpolate(seg, size=(sh, sw), mode="nearest"), sd["fc.weight"], sd["fc.bias"], padding=1)

    def up(t: Tensor) -> Tensor:
        return F.interpolate(t, scale_factor=2, mode="nearest")

    x = _block(sd, "head_0", x, seg)
    x = _block(sd, "G_middle_0", up(x), seg)
    if mode in ("more", "most"):
        x = up(x)
    x = _block(sd, "G_middle_1", x, seg)
    for name in ["up_0", "up_1", "up_2", "up_3"] + (["up_4"] if mode == "most" else []):
        x = _block(sd, name, up(x), seg)
    x = F.conv2d(F.leaky_relu(x, 0.2), sd["conv_img.weight"], sd["conv_img.bias"], padding=1)
    return torch.tanh(x)
