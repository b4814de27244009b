"""Files shipped with the package: config presets, class maps and monitoring configs (``spade_dist.configs``).

In the repository they are the top-level ``configs/`` directory; ``setup.py`` installs it as the
package ``spade_dist.configs``, so the same lookup works from a source checkout, an editable install
and a wheel.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional

from spade_dist.config import ConfigError


def configs_dir() -> Path:
    """The directory of the presets (``configs/`` in a checkout)."""
    root = importlib.resources.files("spade_dist.configs")
    if not isinstance(root, Path):  # e.g. a zipped install: presets inherit each other by file path
        raise ConfigError(f"spade_dist.configs is not a directory on disk ({root}); install spade-dist unzipped")
    return root


def monitoring_dir() -> Path:
    """Prometheus, alert and Grafana files (``configs/monitoring``)."""
    return configs_dir() / "monitoring"


def preset_names() -> list[str]:
    """Names usable with ``--preset`` (every ``configs/*.yaml`` except the shared ``base``)."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml") if p.stem != "base")


def shipped_config(name: str) -> Optional[Path]:
    """A shipped config file by bare name (``tiny``, ``coco_stuff.yaml``, ``base``), or None.

    Only a plain file name is looked up (no directory part), so a path that does not exist never
    turns into a preset by accident, and a name like ``../x`` never leaves the configs directory."""
    if not name or Path(name).name != name or name in (".", ".."):
        return None
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = configs_dir() / f"{stem}.yaml"
    return path if path.is_file() else None


def preset_path(name: str) -> Path:
    """``coco_stuff`` -> ``configs/coco_stuff.yaml``; an unknown name lists the known presets."""
    names = preset_names()
    if name not in names:  # also keeps a name like "../x" from becoming a path
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(names)}; looked in {configs_dir()})")
    return configs_dir() / f"{name}.yaml"


def class_map_names() -> list[str]:
    """Shipped class maps for ``eval.segmenter.class_map`` (``configs/class_maps/*.yaml``)."""
    return sorted(p.stem for p in (configs_dir() / "class_maps").glob("*.yaml"))


def class_map_path(name: str) -> Path:
    """``cityscapes-19`` -> ``configs/class_maps/cityscapes-19.yaml`` (a name from :func:`class_map_names`)."""
    if name not in class_map_names():
        raise ConfigError(f"unknown class map '{name}' (shipped: {', '.join(class_map_names())})")
    return configs_dir() / "class_maps" / f"{name}.yaml"
