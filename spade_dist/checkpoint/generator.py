"""Single-process access to the generator inside a checkpoint step directory.

Reached through :func:`spade_dist.generation.load_model`, the one generator loader of export, FID,
generate and serve: no process group, and only the generator's tensors are read (not the discriminator or
the optimizer moments, which are most of a checkpoint's bytes). Where the generators sit inside the saved state is recorded by the trainer in
the COMMITTED marker (``generator_paths``), so this module does not depend on the TrainState layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
import yaml
from torch import nn

from spade_dist.checkpoint import layout
from spade_dist.checkpoint.store import StepReader
from spade_dist.config import Config, config_from_dict


def resolve_step_dir(path: Union[str, Path]) -> Path:
    """A step directory as is (it must be committed and intact), or the newest committed one under a
    run directory / its ``checkpoints`` directory. Every file is checked against the size and sha256
    its marker records before anything is unpickled or loaded from it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if layout.step_of(path) is not None:
        layout.validate_step_dir(path, check_sha256=True)
        return path
    return layout.find_latest(path, check_sha256=True)


def read_checkpoint_config(step_dir: Path) -> Config:
    path = Path(step_dir) / layout.CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint has no resolved config")
    mapping = yaml.safe_load(path.read_text())
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: resolved config is not a mapping")
    return config_from_dict(mapping, source=str(path))


def _select(path: list[str], step_dir: Path):
    def cut(skeleton: Any) -> Any:
        node = skeleton
        for part in path[1:]:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{step_dir}: no '{'.'.join(path)}' in the saved state (marker generator_paths)")
            node = node[part]
        return node
    return cut


def read_generator_state(step_dir: Union[str, Path], use_ema: bool = True) -> tuple[dict[str, torch.Tensor], Config, Path]:
    """(generator state dict on CPU, resolved config, the step directory actually read)."""
    step_dir = resolve_step_dir(step_dir)
    marker = layout.read_marker(step_dir)
    paths = marker.get("generator_paths") or {}
    which = "ema" if use_ema else "raw"
    if which not in paths:
        raise KeyError(f"{step_dir}: {layout.MARKER_NAME} names no '{which}' generator (has {sorted(paths)})")
    gen_path = list(paths[which])
    # Rank-partitioned checkpoints (world_size_locked) hold one copy per rank; generators are
    # replicated, so rank 0's is the one.
    tree_name = f"{gen_path[0]}__rank0" if marker.get("world_size_locked") else gen_path[0]
    state = StepReader(step_dir).read_tree(tree_name, select=_select(gen_path, step_dir))
    return state, read_checkpoint_config(step_dir), step_dir


def load_generator_from_checkpoint(step_dir: Union[str, Path], use_ema: bool = True,
                                   device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, Config]:
    """The EMA (default) or raw generator of a step directory (or of the newest checkpoint of a run
    directory), built from the checkpoint's own config, in eval mode on ``device``."""
    from spade_dist.models import build_generator

    state, cfg, read_dir = read_generator_state(step_dir, use_ema=use_ema)
    G = build_generator(cfg, init=False)
    try:
        G.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{read_dir}: generator weights do not fit the checkpoint's config: {exc}") from exc
    return G.to(device).eval(), cfg
