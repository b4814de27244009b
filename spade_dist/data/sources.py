"""Turn a shard specification into shard URLs with their per-shard key lists (from manifest.json).

Accepted specifications (``data.shards`` / ``data.val_shards``):

* a ``manifest.json`` path, or the directory holding it: every shard of the split;
* a brace pattern ``dir/name-train-{000000..000009}.tar`` or a glob ``dir/*.tar``: those shards;
  their manifest is ``data.manifest`` when set, else ``manifest.json`` beside the shards;
* ``pipe:CMD`` URLs separated by ``::`` (object stores, e.g. ``pipe:aws s3 cp s3://b/x.tar -``):
  read through webdataset's ``gopen``; ``data.manifest`` is required and each command is matched
  to the manifest shard whose file name it contains.

The loader needs the per-shard key lists to cut the epoch into equal per-rank ranges and to
record an exact position without opening any tar; hence a missing manifest is an error.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import braceexpand

from spade_dist.files import UnsafeNameError, check_path_component

MANIFEST_NAME = "manifest.json"
PIPE_SEPARATOR = "::"


class ShardSourceError(ValueError):
    """The shard specification or the manifest is unusable; the message names the pattern/path."""


@dataclass(frozen=True)
class ShardInfo:
    url: str  # what webdataset opens (a path or a pipe: command)
    name: str  # the file name in the manifest
    keys: tuple[str, ...]  # sample keys in tar order


@dataclass(frozen=True)
class ShardSet:
    shards: tuple[ShardInfo, ...]
    manifest_path: str
    split: str
    manifest: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return sum(len(s.keys) for s in self.shards)


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ShardSourceError(f"manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardSourceError(f"manifest {path} cannot be read: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ShardSourceError(f"manifest {path} has no 'splits' mapping")
    return manifest


def _split_shards(manifest: dict[str, Any], split: str, manifest_path: Path) -> list[dict[str, Any]]:
    splits = manifest["splits"]
    if split not in splits:
        raise ShardSourceError(f"manifest {manifest_path} has no split {split!r} (has {sorted(splits)})")
    shards = splits[split].get("shards")
    if not isinstance(shards, list):
        raise ShardSourceError(f"manifest {manifest_path}: splits.{split}.shards is not a list")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or "file" not in entry or not isinstance(entry.get("keys"), list):
            raise ShardSourceError(f"manifest {manifest_path}: splits.{split}.shards[{i}] needs 'file' and 'keys'")
        if "samples" in entry and entry["samples"] != len(entry["keys"]):
            raise ShardSourceError(
                f"manifest {manifest_path}: shard {entry['file']} lists {len(entry['keys'])} keys but samples={entry['samples']}")
        try:
            check_path_component(entry["file"], f"manifest {manifest_path}: splits.{split}.shards[{i}].file")
            for key in entry["keys"]:
                check_path_component(key, f"manifest {manifest_path}: shard {entry['file']}")
        except UnsafeNameError as exc:
            raise ShardSourceError(str(exc)) from None
    return shards


def _check_unique_keys(shards: list[ShardInfo], where: str) -> None:
    seen: dict[str, str] = {}
    for shard in shards:
        for key in shard.keys:
            if key in seen:
                raise ShardSourceError(f"{where}: key {key!r} appears in {seen[key]} and {shard.name}")
            seen[key] = shard.name


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def resolve_shards(spec: str, split: str, manifest_override: str = "") -> ShardSet:
    """Resolve ``spec`` (see module doc) into shards with their key lists."""
    spec = spec.strip()
    if not spec:
        raise ShardSourceError("no shards configured (data.shards / data.val_shards is empty)")
    override = Path(manifest_override) if manifest_override else None

    if spec.startswith("pipe:"):
        if override is None:
            raise ShardSourceError(f"pipe: shards {spec!r} need data.manifest (the manifest.json of those shards)")
        manifest = read_manifest(override)
        entries = _split_shards(manifest, split, override)
        shards = []
        for command in [c.strip() for c in spec.split(PIPE_SEPARATOR) if c.strip()]:
            matches = [e for e in entries if e["file"] in command]
            if not matches:
                raise ShardSourceError(f"pipe command {command!r} names no shard of split {split!r} in {override}")
            entry = max(matches, key=lambda e: len(e["file"]))
            shards.append(ShardInfo(command, entry["file"], tuple(entry["keys"])))
        _check_unique_keys(shards, spec)
        return ShardSet(tuple(shards), str(override), split, manifest)

    path = Path(spec)
    if path.is_dir() or path.name == MANIFEST_NAME or (path.suffix == ".json" and path.is_file()):
        manifest_path = override or (path / MANIFEST_NAME if path.is_dir() else path)
        manifest = read_manifest(manifest_path)
        base = (path if path.is_dir() else path.parent)
        shards = [ShardInfo(str(base / e["file"]), e["file"], tuple(e["keys"]))
                  for e in _split_shards(manifest, split, manifest_path)]
        if not shards:
            raise ShardSourceError(f"manifest {manifest_path} lists no shards for split {split!r}")
        _check_unique_keys(shards, str(manifest_path))
        return ShardSet(tuple(shards), str(manifest_path), split, manifest)

    if _is_glob(spec):
        files = sorted(glob.glob(spec))
        if not files:
            raise ShardSourceError(f"no shards match the glob {spec!r}")
    else:
        files = list(braceexpand.braceexpand(spec))
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ShardSourceError(f"shard pattern {spec!r}: {len(missing)} file(s) do not exist, e.g. {missing[0]}")
    directories = {str(Path(f).parent) for f in files}
    if override is None and len(directories) > 1:
        raise ShardSourceError(f"shard pattern {spec!r} spans several directories {sorted(directories)}; set data.manifest")
    manifest_path = override or Path(next(iter(directories))) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ShardSourceError(
            f"no manifest for shard pattern {spec!r}: {manifest_path} does not exist "
            f"(write shards with `spade-data shard`, or set data.manifest)")
    manifest = read_manifest(manifest_path)
    by_file = {e["file"]: e for e in _split_shards(manifest, split, manifest_path)}
    shards = []
    for f in files:
        entry = by_file.get(Path(f).name)
        if entry is None:
            raise ShardSourceError(f"shard {f} (from pattern {spec!r}) is not in split {split!r} of {manifest_path}")
        shards.append(ShardInfo(f, entry["file"], tuple(entry["keys"])))
    _check_unique_keys(shards, spec)
    return ShardSet(tuple(shards), str(manifest_path), split, manifest)


def check_shard_files(shard_set: ShardSet) -> None:
    """Startup check: every local shard exists with the size its manifest records, so a deleted or
    truncated shard is named before any model is built, not met at the first batch (``pipe:`` shards
    cannot be checked without reading them; the loader skips an unreadable rest and counts it)."""
    entries = {e["file"]: e for e in shard_set.manifest["splits"][shard_set.split].get("shards", [])}
    for shard in shard_set.shards:
        if shard.url.startswith("pipe:"):
            continue
        path = Path(shard.url)
        if not path.is_file():
            raise ShardSourceError(f"shard {path} (split {shard_set.split!r} of {shard_set.manifest_path}) does not exist")
        recorded = entries.get(shard.name, {}).get("bytes")
        if isinstance(recorded, int) and path.stat().st_size != recorded:
            raise ShardSourceError(f"shard {path}: {path.stat().st_size} bytes, but {shard_set.manifest_path} records "
                                   f"{recorded} (truncated or replaced; re-run spade-data shard / verify)")


def check_label_layout(shard_set: ShardSet, label_nc: int, contain_dontcare_label: bool, no_instance: bool) -> None:
    """Startup check: the manifest's label layout (written by ``spade-data shard``) matches the
    config's, which sizes the generator's input; a mismatch would otherwise fail at the first step
    (or, worse, train on misread ids)."""
    m, where = shard_set.manifest, shard_set.manifest_path
    if "label_nc" in m and m["label_nc"] != label_nc:
        raise ShardSourceError(f"data.label_nc={label_nc} but {where} was written with label_nc={m['label_nc']}")
    if "contain_dontcare_label" in m and bool(m["contain_dontcare_label"]) != contain_dontcare_label:
        raise ShardSourceError(f"data.contain_dontcare_label={str(contain_dontcare_label).lower()} but {where} was "
                               f"written with contain_dontcare_label={str(bool(m['contain_dontcare_label'])).lower()}")
    if m.get("instance") is False and not no_instance:
        raise ShardSourceError(f"data.no_instance=false but {where} has no instance maps; set data.no_instance=true")


def eval_spec(shards: str, val_shards: str, manifest: str = "") -> Optional[str]:
    """Where validation shards come from: ``val_shards``; else ``data.manifest``; else the
    training manifest / directory, or the directory of a training pattern (the manifest beside
    the shards, whose ``val_split`` is then used). None when nothing names a manifest."""
    if val_shards.strip():
        return val_shards
    if manifest.strip():
        return manifest
    spec = shards.strip()
    if not spec or spec.startswith("pipe:"):
        return None
    path = Path(spec)
    if path.is_dir() or path.suffix == ".json":
        return str(path)
    parent = str(path.parent)
    if not any(ch in parent for ch in "*?[{"):
        return parent
    return None
