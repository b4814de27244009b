"""Dataset layouts: where the image / label / instance files of a split live and how they pair.

Each layout returns a :class:`DatasetSpec` (the official dataset class defaults: number of classes,
don't-care label, instance maps, label shift) and the sorted list of :class:`SourceSample` found on
disk, plus :class:`PairingProblem` entries for images without labels and labels without images.
Nothing here decodes pixels; that is ``records.py``'s job.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DONTCARE = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
MAP_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm")  # lossless formats only for id maps
SYNTH_DESCRIPTOR = "dataset.json"


class DataToolsError(Exception):
    """Bad input or inconsistent state; the message names the file, key or value at fault."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the official dataset class sets for a dataset (label_nc, don't care, instance maps)."""

    dataset: str
    label_nc: int
    contain_dontcare_label: bool
    instance: bool
    # ADE20K stores "other" as 0 and classes as 1..150; the official code shifts by -1, 0 -> don't care.
    label_shift: int = 0
    class_names: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.label_nc < 1:
            raise DataToolsError(f"label_nc must be >= 1, got {self.label_nc}")
        if self.contain_dontcare_label and self.label_nc > DONTCARE:
            raise DataToolsError(
                f"label_nc={self.label_nc} collides with the don't-care id {DONTCARE}; "
                "datasets with a don't-care label can have at most 255 classes")
        if self.class_names is not None and len(self.class_names) != self.label_nc:
            raise DataToolsError(
                f"{len(self.class_names)} class names given for label_nc={self.label_nc}")


@dataclass(frozen=True)
class SourceSample:
    """One sample on disk; paths are relative to the dataset root (as stored in the manifest)."""

    key: str
    image: str
    label: str
    instance: Optional[str] = None

    def files(self) -> list[str]:
        return [p for p in (self.image, self.label, self.instance) if p is not None]


@dataclass(frozen=True)
class PlannedShard:
    """One output shard of a sharding plan: its index, tar file name, samples and fingerprint."""

    index: int
    file: str
    samples: tuple[SourceSample, ...]
    fingerprint: str


@dataclass(frozen=True)
class PairingProblem:
    """A sample that cannot be formed from the files present (missing partner file)."""

    key: str
    files: tuple[str, ...]
    reason: str


@dataclass
class Discovery:
    spec: DatasetSpec
    samples: list[SourceSample]
    problems: list[PairingProblem] = field(default_factory=list)


@dataclass(frozen=True)
class LayoutOptions:
    """Per-layout knobs from the command line; None means "use the dataset's default"."""

    label_nc: Optional[int] = None
    contain_dontcare_label: Optional[bool] = None
    no_instance: bool = False
    image_dir: Optional[str] = None
    label_dir: Optional[str] = None
    instance_dir: Optional[str] = None


def key_from_stem(stem: str) -> str:
    """Sample key: the file stem with '.' replaced by '_' (webdataset splits member names at the first dot)."""
    return stem.replace(".", "_")


def _list_files(folder: Path, extensions: tuple[str, ...], recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in extensions)


def _index_by_key(files: list[Path], root: Path, strip_suffix: str, role: str) -> dict[str, Path]:
    """Map key -> file; a key seen twice (a.jpg and a.png, or x.y.png and x_y.png) is an error."""
    index: dict[str, Path] = {}
    for path in files:
        stem = path.stem
        if strip_suffix:
            if not stem.endswith(strip_suffix):
                continue
            stem = stem[: -len(strip_suffix)]
        key = key_from_stem(stem)
        if key in index:
            raise DataToolsError(
                f"duplicate {role} key {key!r}: {index[key]} and {path} (keys must be unique per split)")
        index[key] = path
    return index


def _near_misses(path: Path) -> str:
    """Why ``path`` is missing, from what is there: a misnamed folder or an archive's extra folder level."""
    existing = path
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    missing = path.relative_to(existing)
    wanted = missing.parts[0]
    folders = sorted(d.name for d in existing.iterdir() if d.is_dir())
    # Unzipping e.g. leftImg8bit_trainvaltest.zip into its own folder adds a level: root/X/leftImg8bit/...
    for folder in folders:
        if (existing / folder / missing).is_dir():
            return (f"; it is at {existing / folder / missing}: the download was unpacked one folder "
                    f"deeper, move {existing / folder / wanted} to {existing / wanted}")
    close = [f for f in folders if f.lower() == wanted.lower()] or difflib.get_close_matches(wanted, folders, n=1)
    if close:
        return f"; misnamed? {existing / close[0]} exists, the layout expects {existing / wanted}"
    return f"; {existing} has {', '.join(folders[:12]) if folders else 'no folders'}"


def _require_dir(path: Path, what: str, hint: str = "") -> Path:
    if not path.is_dir():
        raise DataToolsError(f"{what} folder not found: {path}{_near_misses(path)}"
                             f"{(' (' + hint + ')') if hint else ''}")
    return path


def _pair(root: Path, images: dict[str, Path], labels: dict[str, Path],
          instances: Optional[dict[str, Path]]) -> tuple[list[SourceSample], list[PairingProblem]]:
    """Join the three indexes on key; anything missing a partner becomes a PairingProblem."""
    def rel(path: Path) -> str:
        # Folders given as absolute paths outside the root are stored as "../..." relative paths.
        return Path(os.path.relpath(path, root)).as_posix()

    samples: list[SourceSample] = []
    problems: list[PairingProblem] = []
    all_keys = sorted(set(images) | set(labels) | (set(instances) if instances is not None else set()))
    for key in all_keys:
        image, label = images.get(key), labels.get(key)
        instance = instances.get(key) if instances is not None else None
        present = tuple(rel(p) for p in (image, label, instance) if p is not None)
        missing = [name for name, p in (("image", image), ("label", label)) if p is None]
        if instances is not None and instance is None:
            missing.append("instance map")
        if missing:
            problems.append(PairingProblem(key, present, f"no {' / '.join(missing)} for {', '.join(present)}"))
            continue
        assert image is not None and label is not None
        samples.append(SourceSample(key, rel(image), rel(label), rel(instance) if instance is not None else None))
    return samples, problems


def _with_overrides(spec: DatasetSpec, options: LayoutOptions) -> DatasetSpec:
    return DatasetSpec(
        dataset=spec.dataset,
        label_nc=options.label_nc if options.label_nc is not None else spec.label_nc,
        contain_dontcare_label=(options.contain_dontcare_label if options.contain_dontcare_label is not None
                                else spec.contain_dontcare_label),
        instance=spec.instance and not options.no_instance,
        label_shift=spec.label_shift,
        class_names=spec.class_names if options.label_nc in (None, spec.label_nc) else None,
    )


def discover_coco_stuff(root: Path, split: str, options: LayoutOptions) -> Discovery:
    """``{split}_img/``, ``{split}_label/``, ``{split}_inst/`` with matching stems (official coco_dataset.py)."""
    spec = _with_overrides(DatasetSpec("coco-stuff", 182, True, True), options)
    images = _index_by_key(_list_files(_require_dir(root / f"{split}_img", "image"), IMAGE_EXTENSIONS, False),
                           root, "", "image")
    labels = _index_by_key(_list_files(_require_dir(root / f"{split}_label", "label"), MAP_EXTENSIONS, False),
                           root, "", "label")
    instances = None
    if spec.instance:
        inst_dir = _require_dir(root / f"{split}_inst", "instance", "pass --no-instance to shard without instance maps")
        instances = _index_by_key(_list_files(inst_dir, MAP_EXTENSIONS, False), root, "", "instance")
    return Discovery(spec, *_pair(root, images, labels, instances))


def discover_ade20k(root: Path, split: str, options: LayoutOptions) -> Discovery:
    """``[ADEChallengeData2016/]images/{training,validation}`` + ``annotations/...``; labels shifted -1."""
    spec = _with_overrides(DatasetSpec("ade20k", 150, True, False, label_shift=-1), options)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    folder = {"train": "training", "val": "validation"}.get(split, split)
    images = _index_by_key(
        _list_files(_require_dir(base / "images" / folder, "image", "expected ADEChallengeData2016 layout"),
                    IMAGE_EXTENSIONS, False), root, "", "image")
    labels = _index_by_key(_list_files(_require_dir(base / "annotations" / folder, "label"), MAP_EXTENSIONS, False),
                           root, "", "label")
    return Discovery(spec, *_pair(root, images, labels, None))


def discover_cityscapes(root: Path, split: str, options: LayoutOptions) -> Discovery:
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with ``gtFine/{split}/{city}/*_gtFine_{labelIds,instanceIds}.png``.

    The key is the shared prefix ``{city}_{seq}_{frame}``.
    """
    spec = _with_overrides(DatasetSpec("cityscapes", 35, False, True), options)
    image_files = _list_files(_require_dir(root / "leftImg8bit" / split, "image"), IMAGE_EXTENSIONS, True)
    gt_dir = _require_dir(root / "gtFine" / split, "label")
    gt_files = _list_files(gt_dir, MAP_EXTENSIONS, True)
    images = _index_by_key(image_files, root, "_leftImg8bit", "image")
    labels = _index_by_key(gt_files, root, "_gtFine_labelIds", "label")
    if images and not labels:
        raise DataToolsError(f"no *_gtFine_labelIds.png under {gt_dir} (is it gtCoarse, or only *_color.png?); "
                             "the label maps come from gtFine_trainvaltest.zip")
    instances = _index_by_key(gt_files, root, "_gtFine_instanceIds", "instance") if spec.instance else None
    return Discovery(spec, *_pair(root, images, labels, instances))


def _resolve_dir(root: Path, template: str, split: str) -> Path:
    path = Path(template.replace("{split}", split))
    return path if path.is_absolute() else root / path


def read_descriptor(root: Path) -> Optional[dict]:
    """``dataset.json`` at the root (written by ``spade-data synth``), or None when absent."""
    path = root / SYNTH_DESCRIPTOR
    if not path.is_file():
        return None
    try:
        descriptor = json.loads(path.read_text())
        int(descriptor["label_nc"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataToolsError(f"{path}: not a valid dataset descriptor ({err})") from err
    return descriptor


def discover_custom(root: Path, split: str, options: LayoutOptions) -> Discovery:
    """Flat folders ``--image-dir`` / ``--label-dir`` [/ ``--instance-dir``], paired by stem.

    Folders may contain ``{split}``; defaults are ``{split}/images`` and ``{split}/labels`` (the synth
    layout). label_nc comes from ``--label-nc`` or the root's ``dataset.json``.
    """
    descriptor = read_descriptor(root)
    label_nc = options.label_nc
    if label_nc is None:
        if descriptor is None:
            raise DataToolsError(f"--label-nc is required for the custom layout (no {root / SYNTH_DESCRIPTOR})")
        label_nc = int(descriptor["label_nc"])
    dontcare = options.contain_dontcare_label
    if dontcare is None:
        dontcare = bool(descriptor.get("contain_dontcare_label", False)) if descriptor else False
    names = None
    if descriptor and "classes" in descriptor and int(descriptor["label_nc"]) == label_nc:
        names = tuple(str(c["name"]) for c in descriptor["classes"])
    instance_template = options.instance_dir
    spec = DatasetSpec("custom", label_nc, dontcare, instance_template is not None and not options.no_instance,
                       class_names=names)
    image_dir = _require_dir(_resolve_dir(root, options.image_dir or "{split}/images", split), "image")
    label_dir = _require_dir(_resolve_dir(root, options.label_dir or "{split}/labels", split), "label")
    images = _index_by_key(_list_files(image_dir, IMAGE_EXTENSIONS, False), root, "", "image")
    labels = _index_by_key(_list_files(label_dir, MAP_EXTENSIONS, False), root, "", "label")
    instances = None
    if spec.instance:
        assert instance_template is not None
        inst_dir = _require_dir(_resolve_dir(root, instance_template, split), "instance")
        instances = _index_by_key(_list_files(inst_dir, MAP_EXTENSIONS, False), root, "", "instance")
    return Discovery(spec, *_pair(root, images, labels, instances))


# Each layout name and the function that finds its samples; LAYOUTS are the names.
_DISCOVER = {"coco-stuff": discover_coco_stuff, "ade20k": discover_ade20k,
             "cityscapes": discover_cityscapes, "custom": discover_custom}
LAYOUTS = tuple(_DISCOVER)


def discover(layout: str, root: Path, split: str, options: LayoutOptions) -> Discovery:
    """Find the samples of ``split`` under ``root`` for ``layout`` (one of :data:`LAYOUTS`)."""
    if layout not in _DISCOVER:
        raise DataToolsError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataToolsError(f"dataset root not found: {root}")
    return _DISCOVER[layout](root.resolve(), split, options)


def check_layout(layout: str, root: Path, split: str, options: LayoutOptions) -> str:
    """Check that ``split`` of a download is complete for ``layout``; returns a one-line summary.

    Raises :class:`DataToolsError` naming the missing or misnamed folder, or the first unpaired files.
    """
    found = discover(layout, root, split, options)
    if found.problems:
        shown = "; ".join(f"{p.key}: {p.reason}" for p in found.problems[:3])
        more = f" (and {len(found.problems) - 3} more)" if len(found.problems) > 3 else ""
        raise DataToolsError(f"{layout} {split} under {root}: {len(found.problems)} unpaired sample(s): {shown}{more}")
    if not found.samples:
        raise DataToolsError(f"{layout} {split} under {root}: the folders exist but hold no samples")
    first = found.samples[0]
    return (f"OK {layout} {split}: {len(found.samples)} samples, label_nc {found.spec.label_nc}, "
            f"e.g. {', '.join(first.files())}")
