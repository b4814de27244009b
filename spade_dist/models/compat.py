"""Official NVlabs/SPADE generator checkpoints in and out, and the project's single-file format.

Our SPADEGenerator has the official module layout, so an official ``latest_net_G.pth`` state dict
maps onto it one key to one key (spectral norm ``weight_orig/_u/_v``, BN running stats included).
What this module adds is the checking: a checkpoint that does not fit the options raises
:class:`CheckpointMismatchError` listing missing / unexpected / mis-shaped keys and naming the
option that most likely differs, read off the checkpoint's own shapes.

Project format (``save_generator_file`` / ``load_generator_file``), loadable with
``torch.load(weights_only=True)``::

    {"format": "spade-dist-generator", "version": 1, "config": Config.to_dict(), "generator": state_dict}

or, for a ``.safetensors`` path, the same as a safetensors file (nothing in it can run code on load):
tensors ``generator.<name>`` (and ``encoder.<name>``), metadata ``format``, ``version`` and ``config``
(JSON). Every weights file is read through :func:`read_weights_file`, which never unpickles objects.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from spade_dist.config import Config, SpeedConfig, config_from_dict
from spade_dist.files import atomic_output
from spade_dist.label_layout import LabelLayout
from spade_dist.models.factory import build_generator
from spade_dist.models.fast.seam import ModulationPlan
from spade_dist.models.generator import SPADEGenerator, latent_size
from spade_dist.models.norms import parse_spade_norm
from spade_dist.models.pix2pixhd import Pix2PixHDGenerator

PROJECT_FORMAT = "spade-dist-generator"
PROJECT_FORMAT_VERSION = 1
DEFAULT_NORM_G = "spectralspadesyncbatch3x3"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_OPTIONAL_SUFFIX = ".num_batches_tracked"  # absent from checkpoints written by old PyTorch

PathOrStateDict = Union[str, os.PathLike, Mapping[str, Tensor]]
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the generator the options describe."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 shape_mismatch: list[tuple[str, tuple, tuple]], likely_options: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatch = shape_mismatch
        self.likely_options = likely_options


# --------------------------------------------------------------------------------------------
# Reading state dicts
# --------------------------------------------------------------------------------------------


def is_safetensors(path: Union[str, os.PathLike]) -> bool:
    """A safetensors file, by its header (8-byte little-endian length, then a JSON object)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
        size = os.fstat(handle.fileno()).st_size
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file as :func:`read_weights_file` returns it: the project payload when its metadata
    says so, else the plain state dict."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if meta.get("format") != PROJECT_FORMAT:
        return tensors
    payload: dict[str, Any] = {"format": PROJECT_FORMAT, "version": int(meta.get("version", "0")),
                               "config": json.loads(meta.get("config", "null"))}
    for part in ("generator", "encoder"):
        prefix = f"{part}."
        entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entries or part == "generator":
            payload[part] = entries
    return payload


def read_weights_file(path: Union[str, os.PathLike], mmap: bool = False) -> Any:
    """The content of a weights file without running code from it: a safetensors file, or a PyTorch
    file through ``torch.load(weights_only=True)`` (``mmap``: memory-mapped where the format allows).
    Anything else (a junk file, pickled objects) raises ``ValueError`` naming the file."""
    path = Path(path)
    try:
        if is_safetensors(path):
            return _read_safetensors(path)
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped; retry plainly
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file, not a weights file, pickled objects
        detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        raise ValueError(f"{path}: cannot read as a PyTorch (weights_only=True) or safetensors weights file: "
                         f"{detail}") from exc


def _read_state_dict(path_or_state_dict: PathOrStateDict) -> tuple[dict[str, Tensor], str]:
    """Return (state dict with wrapper prefixes stripped, a name for messages)."""
    if isinstance(path_or_state_dict, Mapping):
        raw, source = dict(path_or_state_dict), "<state dict>"
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"generator checkpoint not found: {path}")
        raw = read_weights_file(path)
        source = str(path)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(raw).__name__}")
        if raw.get("format") == PROJECT_FORMAT:
            raise ValueError(f"{source}: this is a spade-dist generator file; use load_generator_file() "
                             "or 'spade-convert to-official' first")
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{source}: entry '{key}' is a {type(value).__name__}, not a tensor: not a generator state dict")
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state, source


# --------------------------------------------------------------------------------------------
# Diagnosis of mismatches
# --------------------------------------------------------------------------------------------


def _likely_options(got: Mapping[str, Tensor], want: Mapping[str, Tensor], opts: dict[str, Any]) -> list[str]:
    """Human-readable guesses of which option differs, read off the checkpoint's shapes."""
    hints: list[str] = []
    labels: LabelLayout = opts["labels"]
    semantic_nc = labels.semantic_nc
    fc_got, fc_want = got.get("fc.weight"), want.get("fc.weight")
    if fc_got is not None and fc_want is not None:
        if fc_got.dim() == 4 and fc_want.dim() != 4:
            hints.append("use_vae: the checkpoint starts from the label map (fc is a 3x3 conv), so use_vae=False")
        elif fc_got.dim() == 2 and fc_want.dim() != 2:
            hints.append("use_vae: the checkpoint starts from z (fc is a Linear), so use_vae=True")
        elif fc_got.dim() == 4:
            ckpt_nc = fc_got.shape[1]
            if ckpt_nc != semantic_nc:
                extra = semantic_nc - labels.label_nc  # the don't-care and instance-edge channels
                hint = (f"label_nc / contain_dontcare_label / no_instance: the checkpoint takes semantic_nc={ckpt_nc} "
                        f"input channels, the options give {semantic_nc} (label_nc {labels.label_nc} "
                        f"+ dontcare {int(labels.contain_dontcare_label)} + instance {labels.edge_channels}); "
                        f"with the same dontcare/instance settings label_nc would be {ckpt_nc - extra}")
                if abs(ckpt_nc - semantic_nc) == 1:
                    hint += "; a difference of 1 usually means contain_dontcare_label or no_instance differs"
                hints.append(hint)
            if fc_got.shape[0] != fc_want.shape[0] and fc_got.shape[0] % 16 == 0:
                hints.append(f"ngf: the checkpoint was built with ngf={fc_got.shape[0] // 16}, the options say ngf={opts['ngf']}")
        elif fc_got.dim() == 2:
            if fc_got.shape[1] != fc_want.shape[1]:
                hints.append(f"z_dim: the checkpoint's fc takes z_dim={fc_got.shape[1]}, the options say z_dim={opts['z_dim']}")
            head = got.get("head_0.conv_0.bias")
            ckpt_ngf = head.shape[0] // 16 if head is not None else opts["ngf"]
            if ckpt_ngf != opts["ngf"]:
                hints.append(f"ngf: the checkpoint was built with ngf={ckpt_ngf}, the options say ngf={opts['ngf']}")
            elif fc_got.shape[0] != fc_want.shape[0]:
                cells = fc_got.shape[0] // (16 * ckpt_ngf)
                hints.append(f"crop_size / aspect_ratio / num_upsampling_layers: the checkpoint's fc makes a latent map "
                             f"of {cells} cells, the options give {opts['sh']}x{opts['sw']}={opts['sh'] * opts['sw']}")
    has_up4_got = any(k.startswith("up_4.") for k in got)
    has_up4_want = any(k.startswith("up_4.") for k in want)
    if has_up4_got and not has_up4_want:
        hints.append("num_upsampling_layers: the checkpoint has up_4, so it was trained with 'most'")
    elif has_up4_want and not has_up4_got:
        hints.append(f"num_upsampling_layers: the checkpoint has no up_4, so it is 'normal' or 'more', not "
                     f"'{opts['num_upsampling_layers']}'")
    # norm_G: spectral prefix, param-free norm with/without running stats, SPADE kernel size.
    spectral_got = "head_0.conv_0.weight_orig" in got
    spectral_want = "head_0.conv_0.weight_orig" in want
    if spectral_got != spectral_want and ("head_0.conv_0.weight" in got or spectral_got):
        hints.append(f"norm_G: the checkpoint {'has' if spectral_got else 'has no'} spectral norm on the block convs "
                     f"(norm_G {'with' if spectral_got else 'without'} the 'spectral' prefix)")
    bn_got = "head_0.norm_0.param_free_norm.running_mean" in got
    bn_want = "head_0.norm_0.param_free_norm.running_mean" in want
    if bn_got != bn_want:
        hints.append(f"norm_G: the checkpoint's SPADE layers {'store' if bn_got else 'store no'} BatchNorm running stats "
                     f"({'batch/syncbatch' if bn_got else 'instance'} param-free norm)")
    mlp_got, mlp_want = got.get("head_0.norm_0.mlp_shared.0.weight"), want.get("head_0.norm_0.mlp_shared.0.weight")
    if mlp_got is not None and mlp_want is not None and mlp_got.dim() == 4 and mlp_got.shape[-1] != mlp_want.shape[-1]:
        k = mlp_got.shape[-1]
        hints.append(f"norm_G: the checkpoint's SPADE kernels are {k}x{k}, the options say {mlp_want.shape[-1]}x{mlp_want.shape[-1]}")
    if not hints:
        hints.append("check label_nc, contain_dontcare_label, no_instance, ngf, num_upsampling_layers, use_vae, norm_G")
    return hints


def check_and_load(G: nn.Module, state: Mapping[str, Tensor], source: str, opts: dict[str, Any]) -> None:
    """Load ``state`` into ``G`` strictly; any difference -> CheckpointMismatchError with hints."""
    want = G.state_dict()
    missing = [k for k in want if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in want]
    shapes = [(k, tuple(state[k].shape), tuple(want[k].shape))
              for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        hints = _likely_options(state, want, opts)
        lines = [f"{source}: checkpoint does not match the generator built from the options"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            shown = "; ".join(f"{k}: checkpoint {g} vs expected {w}" for k, g, w in shapes[:20])
            lines.append(f"  shape mismatches ({len(shapes)}): {shown}{' ...' if len(shapes) > 20 else ''}")
        lines.append("  likely option(s) that differ:")
        lines += [f"    - {h}" for h in hints]
        raise CheckpointMismatchError("\n".join(lines), missing, unexpected, shapes, hints)
    full = dict(state)
    for k in want:
        if k not in full:  # only optional num_batches_tracked can be absent here
            full[k] = want[k]
    G.load_state_dict(full, strict=True)


# --------------------------------------------------------------------------------------------
# Official format
# --------------------------------------------------------------------------------------------


def load_official_generator(
    path_or_state_dict: PathOrStateDict,
    label_nc: int = 182,
    contain_dontcare_label: bool = True,
    no_instance: bool = False,
    ngf: int = 64,
    crop_size: int = 256,
    aspect_ratio: float = 1.0,
    num_upsampling_layers: str = "normal",
    use_vae: bool = False,
    z_dim: int = 256,
    norm_G: str = DEFAULT_NORM_G,
    speed: Optional[SpeedConfig] = None,
) -> SPADEGenerator:
    """Build our SPADEGenerator with the official options and load an official state dict into it.

    Returned in eval mode: spectral norm then uses the stored u / v (no power iteration) and the
    SPADE BatchNorms their running statistics, as the official test script does. ``speed`` (the
    config's section; default: its defaults) says how the SPADE layers run (docs/MODELS.md,
    "Speed paths"): the same outputs up to float rounding.
    """
    state, source = _read_state_dict(path_or_state_dict)
    parse_spade_norm(norm_G)
    labels = LabelLayout(label_nc, contain_dontcare_label, no_instance)
    sh, sw = latent_size(crop_size, aspect_ratio, num_upsampling_layers)
    G = SPADEGenerator(
        semantic_nc=labels.semantic_nc, ngf=ngf, crop_size=crop_size, aspect_ratio=aspect_ratio,
        num_upsampling_layers=num_upsampling_layers, use_vae=use_vae, z_dim=z_dim, norm_G=norm_G,
        modulation=ModulationPlan.from_config(speed or SpeedConfig(), labels),
    )
    opts = {"labels": labels, "ngf": ngf, "num_upsampling_layers": num_upsampling_layers, "z_dim": z_dim,
            "sh": sh, "sw": sw}
    check_and_load(G, state, source, opts)
    return G.eval()


def _unwrap(G: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(G, "_orig_mod") and isinstance(G._orig_mod, nn.Module):
            G = G._orig_mod
        elif hasattr(G, "module") and isinstance(G.module, nn.Module):
            G = G.module
        else:
            return G


def official_state_dict(G: nn.Module) -> dict[str, Tensor]:
    """Our SPADEGenerator's weights as the official implementation names them.

    CPU copies; tensors on the ``meta`` device stay there, so shapes can be inspected without
    allocating a 97M-parameter model.
    """
    G = _unwrap(G)
    if not isinstance(G, SPADEGenerator):
        raise TypeError(f"only SPADEGenerator has an official checkpoint format, got {type(G).__name__}")
    return {k: (v.detach() if v.is_meta else v.detach().cpu().clone()) for k, v in G.state_dict().items()}


def save_official_generator(G: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``latest_net_G.pth``-style weights the official code can ``load_state_dict``."""
    with atomic_output(path) as handle:  # never a half-written file under the final name
        torch.save(official_state_dict(G), handle)


# --------------------------------------------------------------------------------------------
# Project single-file format
# --------------------------------------------------------------------------------------------


def _check_matches_config(G: nn.Module, cfg: Config) -> None:
    expected = type(G).from_config(cfg).build_kwargs() if isinstance(G, (SPADEGenerator, Pix2PixHDGenerator)) else None
    if expected is None:
        raise TypeError(f"unsupported generator type {type(G).__name__}")
    actual = G.build_kwargs()
    differ = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    if differ:
        details = ", ".join(f"{k}: generator {a!r} vs config {e!r}" for k, (a, e) in differ.items())
        raise ValueError(f"the config does not describe this generator ({details}); fix cfg.data / cfg.model first")


def save_generator_file(G: nn.Module, cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Save ``{"format", "version", "config", "generator"}``; the config must rebuild ``G`` exactly.
    A ``.safetensors`` path gets the safetensors form (module docstring)."""
    G = _unwrap(G)
    _check_matches_config(G, cfg)
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in G.state_dict().items()}
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save as safetensors_bytes

        data = safetensors_bytes({f"generator.{k}": v for k, v in weights.items()},
                                 metadata={"format": PROJECT_FORMAT, "version": str(PROJECT_FORMAT_VERSION),
                                           "config": json.dumps(cfg.to_dict())})
        with atomic_output(path) as handle:
            handle.write(data)
        return
    payload = {"format": PROJECT_FORMAT, "version": PROJECT_FORMAT_VERSION, "config": cfg.to_dict(), "generator": weights}
    with atomic_output(path) as handle:  # never a half-written file under the final name
        torch.save(payload, handle)


def load_generator_file(path: Union[str, os.PathLike]) -> tuple[nn.Module, Config]:
    """Read a project generator file (PyTorch or safetensors form) -> (generator in eval mode, its Config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator file not found: {path}")
    payload = read_weights_file(path)
    if not isinstance(payload, Mapping) or payload.get("format") != PROJECT_FORMAT:
        raise ValueError(f"{path}: not a spade-dist generator file (no format '{PROJECT_FORMAT}'); "
                         "for official weights use load_official_generator or 'spade-convert from-official'")
    if payload.get("version") != PROJECT_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported generator file version {payload.get('version')!r} "
                         f"(this code reads version {PROJECT_FORMAT_VERSION})")
    for key in ("config", "generator"):
        if key not in payload:
            raise ValueError(f"{path}: generator file lacks the '{key}' entry")
    cfg = config_from_dict(payload["config"], source=f"{path}:config")
    G = build_generator(cfg, init=False)
    state, source = _read_state_dict(payload["generator"])
    check_and_load(G, state, f"{path}:generator", _config_options(cfg, G))
    return G.eval(), cfg


def _config_options(cfg: Config, G: nn.Module) -> dict[str, Any]:
    """The options :func:`check_and_load` names in its diagnosis, from a Config."""
    m = cfg.model
    sh, sw = getattr(G, "sh", 0), getattr(G, "sw", 0)  # latent size: SPADE generator only
    return {"labels": cfg.data.label_layout, "ngf": m.ngf, "num_upsampling_layers": m.num_upsampling_layers,
            "z_dim": m.z_dim, "sh": sh, "sw": sw}


def load_encoder_state(encoder: nn.Module, state: object, source: str, cfg: Config) -> None:
    """Load an official ``net_E`` state dict (``module.`` prefixes allowed) into ``encoder``, strictly."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: encoder weights must be a state dict, got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    want = encoder.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(want[k].shape)}"
              for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source}: encoder weights do not match the encoder built from the options (ngf={cfg.model.ngf}, "
            f"crop_size={cfg.data.crop_size}, z_dim={cfg.model.z_dim}): missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}"
        )
    encoder.load_state_dict(state)


@dataclass(frozen=True)
class GeneratorInit:
    """Where a fine-tuning run's generator (and encoder) came from; recorded in the run directory."""

    path: str
    format: str  # "official" (latest_net_G.pth state dict) or "spade-dist" (generator file)
    sha256: str
    encoder: str  # the file / entry the encoder came from; "" = fresh (or no encoder)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def official_encoder_path(generator_path: Path) -> Path:
    """``latest_net_G.pth`` -> ``latest_net_E.pth``: the official code saves netE beside netG."""
    return generator_path.with_name(generator_path.name.replace("net_G", "net_E"))


def init_generator_from_file(G: nn.Module, E: "nn.Module | None", cfg: Config, path: Union[str, os.PathLike],
                             expected_sha256: str = "") -> GeneratorInit:
    """Load weights into the freshly built ``G`` (and ``E``) of ``cfg`` from an official
    ``latest_net_G.pth`` or a spade-dist generator file, checked like :func:`load_official_generator` /
    :func:`load_generator_file`. The encoder comes from ``latest_net_E.pth`` beside an official file or
    the generator file's ``encoder`` entry, when present; otherwise ``E`` keeps its fresh weights.
    ``expected_sha256`` (when given) must be the file's sha256.
    """
    from spade_dist.files import sha256_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator file not found: {path}")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ValueError(f"{path}: sha256 {digest} differs from the expected {expected_sha256}")
    payload = read_weights_file(path)
    encoder_state: object = None
    encoder_source = ""
    G = _unwrap(G)
    if isinstance(payload, Mapping) and payload.get("format") == PROJECT_FORMAT:
        file_G, file_cfg = load_generator_file(path)
        try:
            _check_matches_config(G, file_cfg)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        G.load_state_dict(file_G.state_dict())
        fmt = "spade-dist"
        if payload.get("encoder") is not None:
            encoder_state, encoder_source = payload["encoder"], f"{path}:encoder"
    else:
        if not isinstance(payload, Mapping):
            raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(payload).__name__}")
        try:
            state, _ = _read_state_dict(payload)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        check_and_load(G, state, str(path), _config_options(cfg, G))
        fmt = "official"
        sibling = official_encoder_path(path)
        if E is not None and sibling != path and sibling.is_file():
            encoder_source = str(sibling)
            encoder_state = read_weights_file(sibling)
    if E is not None and encoder_state is not None:
        load_encoder_state(_unwrap(E), encoder_state, encoder_source, cfg)
    else:
        encoder_source = ""
    return GeneratorInit(str(path), fmt, digest, encoder_source)
