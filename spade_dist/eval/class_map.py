"""Class maps: which dataset label id each output class of a segmenter is scored as.

A segmenter predicts its own classes (e.g. Cityscapes' 19 train ids); the label maps hold the
dataset's label ids (Cityscapes' 35 label ids). A class map lists, per segmenter output class in
output order, the label id it stands for. Ground-truth pixels whose label id is in no entry (the
don't-care id 255 never is) are ignored, so a map also states the dataset's evaluation classes; an entry
``null`` is an output class that is never scored (a prediction of it is simply wrong).

``eval.segmenter.class_map`` is a shipped map (``configs/class_maps/<name>.yaml``: ``ade20k-150``,
``cityscapes-19``, ``coco-stuff-182``), a YAML / JSON file of the same form, or empty for the identity
over ``data.label_nc``::

    dataset: cityscapes        # optional: must equal data.dataset
    label_nc: 35               # optional: must equal data.label_nc
    classes:                   # one entry per output class
      - {id: 7, name: road}    # or a bare label id: 7
      - null                   # an output class that is not scored

The map's hash (of its content, not its file bytes) is part of every segmentation score's protocol.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from spade_dist.config import ConfigError, DataConfig
from spade_dist.labels import DONTCARE_ID
from spade_dist.resources import class_map_names, class_map_path

IDENTITY = "identity"
IGNORED = -1  # lookup value of a label id that no output class is scored as


class ClassMapError(ConfigError):
    """A class map cannot be read or does not fit the dataset; the message names the file and entry
    (a bad ``eval.segmenter.class_map`` value: exit 2 in every command)."""


@dataclass(frozen=True)
class ClassMap:
    source: str  # the shipped name, the file path, or "identity"
    label_ids: tuple[Optional[int], ...]  # per output class: the label id it is scored as, or None
    names: tuple[str, ...]  # per output class
    dataset: Optional[str] = None
    label_nc: Optional[int] = None

    @property
    def num_outputs(self) -> int:
        return len(self.label_ids)

    @property
    def scored(self) -> list[int]:
        """Output classes that are scored (mIoU averages over these)."""
        return [k for k, label in enumerate(self.label_ids) if label is not None]

    @property
    def sha256(self) -> str:
        content = {"label_ids": list(self.label_ids), "names": list(self.names)}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def target_lookup(self, label_nc: int, device: torch.device) -> torch.Tensor:
        """int64 table over every label id a label map may hold (0..label_nc-1 and the don't-care 255):
        the output class a ground-truth id is scored as, or :data:`IGNORED` (ids in no entry, and 255,
        which :meth:`check_dataset` keeps out of every entry when it is the don't-care id)."""
        table = torch.full((max(label_nc, DONTCARE_ID + 1),), IGNORED, dtype=torch.int64)
        for k, label in enumerate(self.label_ids):
            if label is not None:
                table[label] = k
        return table.to(device)

    def check_dataset(self, data: DataConfig) -> None:
        """Raise :class:`ClassMapError` unless every label id is a class of ``data`` (ids
        0..label_nc-1; 255 is don't care, never a class) and the map's own dataset fields agree."""
        where = f"class map {self.source} (eval.segmenter.class_map)"
        if self.dataset is not None and self.dataset != data.dataset:
            raise ClassMapError(f"{where} is for dataset {self.dataset!r}, but data.dataset is {data.dataset!r}")
        if self.label_nc is not None and self.label_nc != data.label_nc:
            raise ClassMapError(f"{where} is for label_nc {self.label_nc}, but data.label_nc is {data.label_nc}")
        for k, label in enumerate(self.label_ids):
            # 255 with contain_dontcare_label is >= label_nc (at most 255 classes then): never a class.
            if label is not None and not 0 <= label < data.label_nc:
                raise ClassMapError(f"{where}: output class {k} ({self.names[k]}) is label id {label}, which is not "
                                    f"a class of data.label_nc={data.label_nc} (ids 0..{data.label_nc - 1})")


def identity_map(label_nc: int) -> ClassMap:
    """Output class k is label id k, for every class of the dataset."""
    return ClassMap(IDENTITY, tuple(range(label_nc)), tuple(str(k) for k in range(label_nc)))


def _entry(raw: Any, k: int, where: str) -> tuple[Optional[int], Optional[str]]:
    if raw is None:
        return None, None
    if isinstance(raw, dict):
        unknown = set(raw) - {"id", "name"}
        if unknown or "id" not in raw:
            raise ClassMapError(f"{where}: classes[{k}] must be {{id: N, name: TEXT}}, a label id or null, got {raw!r}")
        label, name = raw["id"], raw.get("name")
    else:
        label, name = raw, None
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ClassMapError(f"{where}: classes[{k}] names label id {label!r}; label ids are integers >= 0")
    if name is not None and not isinstance(name, str):
        raise ClassMapError(f"{where}: classes[{k}].name must be text, got {name!r}")
    return label, name


def parse_class_map(data: Any, source: str) -> ClassMap:
    """A :class:`ClassMap` from the mapping a class-map file holds (see the module doc)."""
    where = f"class map {source}"
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise ClassMapError(f"{where}: expected a mapping with a non-empty 'classes' list")
    unknown = set(data) - {"dataset", "label_nc", "classes"}
    if unknown:
        raise ClassMapError(f"{where}: unknown keys {sorted(unknown)} (known: dataset, label_nc, classes)")
    label_ids: list[Optional[int]] = []
    names: list[str] = []
    for k, raw in enumerate(data["classes"]):
        label, name = _entry(raw, k, where)
        label_ids.append(label)
        names.append(name if name is not None else (str(label) if label is not None else f"unscored-{k}"))
    scored = [label for label in label_ids if label is not None]
    if not scored:
        raise ClassMapError(f"{where}: no output class is scored (every entry is null)")
    repeated = sorted({label for label in scored if scored.count(label) > 1})
    if repeated:
        raise ClassMapError(f"{where}: label ids {repeated} are named by several output classes")
    if len(set(names)) != len(names):
        raise ClassMapError(f"{where}: class names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    label_nc = data.get("label_nc")
    if label_nc is not None and (isinstance(label_nc, bool) or not isinstance(label_nc, int)):
        raise ClassMapError(f"{where}: label_nc must be an integer, got {label_nc!r}")
    dataset = data.get("dataset")
    return ClassMap(source, tuple(label_ids), tuple(names), str(dataset) if dataset is not None else None, label_nc)


def load_class_map(value: str, data: DataConfig) -> ClassMap:
    """``eval.segmenter.class_map`` resolved and checked against ``data`` (:class:`ClassMapError` otherwise)."""
    if not value:
        return identity_map(data.label_nc)
    if value in class_map_names():
        path, source = class_map_path(value), value
    else:
        path, source = Path(value).expanduser(), value
        if not path.is_file():
            raise ClassMapError(f"class map {value} (eval.segmenter.class_map) is neither a file nor a shipped map "
                                f"({', '.join(class_map_names())})")
    try:
        text = path.read_text()
        content = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ClassMapError(f"class map {path} (eval.segmenter.class_map): unreadable: {exc}") from exc
    class_map = parse_class_map(content, source)
    class_map.check_dataset(data)
    return class_map
