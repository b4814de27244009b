"""``spade-data prepare coco-stuff``: the COCO-Stuff folder layout with instance maps, from the downloads.

The SPADE authors made COCO-Stuff instance maps with their ``datasets/coco_generate_instance_map.py``:
start from the stuff+thing label map, then for every annotation of the image whose segmentation is a
polygon list (crowd annotations, stored as RLE, are skipped and not counted), fill each polygon with
the annotation's running number ``count`` (0, 1, 2, ... in annotation order) using
``skimage.draw.polygon`` at vertex coordinates minus one pixel, and save the result as an 8-bit PNG.
This module does the same, pixel for pixel, with two deliberate differences that only matter where
the original fails: polygons are clipped to the image (the original raises IndexError on a vertex
beyond the border) and ``count`` is stored modulo 256 (what the original's uint8 array held under
numpy 1; numpy 2 refuses the overflow).

The annotation JSON is indexed with pycocotools (as the original did); the maps are written by a
process pool, each one atomically (temp file + rename), so an interrupted run is resumed by running
it again: finished maps are skipped.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from data_tools.layouts import DataToolsError
from spade_dist.files import write_atomic

# One annotation = its polygons, each a flat [x0, y0, x1, y1, ...] list as in the COCO JSON.
Polygons = list[list[float]]


@dataclass(frozen=True)
class InstanceTask:
    """One image: the label map to start from, where the instance map goes, its annotations' polygons."""

    label: Path
    out: Path
    annotations: tuple[Polygons, ...]


@dataclass(frozen=True)
class PrepareResult:
    written: int
    skipped: int  # already present from an earlier run
    root: Path


def instance_map(label: np.ndarray, annotations: Sequence[Polygons]) -> np.ndarray:
    """The original script's instance map: ``label`` overwritten by each annotation's polygons, value = its index."""
    from skimage.draw import polygon  # the original's rasteriser (pixel centres inside the polygon)

    if label.ndim != 2:
        raise ValueError(f"label map must be single-channel, got shape {label.shape}")
    inst = label.astype(np.uint8, copy=True)
    for count, polygons in enumerate(annotations):
        for flat in polygons:
            vertices = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
            rows, cols = polygon(vertices[:, 1] - 1, vertices[:, 0] - 1, shape=inst.shape)
            inst[rows, cols] = count % 256
    return inst


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise DataToolsError(f"{path}: label map must be an 8-bit single-channel PNG, got mode {image.mode}")
            return np.asarray(image)
    except FileNotFoundError:
        raise DataToolsError(f"label map not found: {path} (the annotation file lists this image)") from None
    except OSError as err:
        raise DataToolsError(f"{path}: unreadable label map ({err})") from None


def _encode_png(inst: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(inst, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_instance_map(task: InstanceTask) -> str:
    """Pool entry point: build and atomically write one instance map; returns its file name."""
    label = _read_label(task.label)
    try:
        inst = instance_map(label, task.annotations)
    except (ValueError, TypeError) as err:  # odd coordinate count, non-numeric coordinates
        raise DataToolsError(f"{task.out.name}: bad polygon in the annotation file ({err})") from None
    write_atomic(task.out, _encode_png(inst))
    return task.out.name


def load_tasks(annotation_file: Path, label_dir: Path, inst_dir: Path) -> list[InstanceTask]:
    """One task per image of the annotation JSON, in its image order (pycocotools' index)."""
    from pycocotools.coco import COCO

    if not annotation_file.is_file():
        raise DataToolsError(f"annotation file not found: {annotation_file} "
                             "(instances_train2017.json / instances_val2017.json of annotations_trainval2017.zip)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(annotation_file))
    except (ValueError, KeyError, TypeError) as err:
        raise DataToolsError(f"{annotation_file}: not a COCO annotation file ({err!r})") from None
    tasks = []
    for image_id in coco.getImgIds():
        file_name = str(coco.loadImgs(image_id)[0]["file_name"])
        stem = Path(file_name).stem
        if Path(file_name).name != file_name or stem in ("", ".", ".."):
            raise DataToolsError(f"{annotation_file}: image {image_id} has file_name {file_name!r}, "
                                 "expected a plain file name")
        polygons = tuple(ann["segmentation"] for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
                         if isinstance(ann.get("segmentation"), list))
        tasks.append(InstanceTask(label_dir / f"{stem}.png", inst_dir / f"{stem}.png", polygons))
    return tasks


def _link_folder(link: Path, target: Path, what: str) -> None:
    """``root/{split}_img`` -> the downloaded folder (a symlink, so nothing is copied)."""
    target = target.resolve()
    if not target.is_dir():
        raise DataToolsError(f"{what} folder not found: {target}")
    if link.is_symlink() or link.exists():
        if link.resolve() != target:
            raise DataToolsError(f"{link} already exists and is not {target}; remove it or pick another --root")
        return
    link.symlink_to(target, target_is_directory=True)


def _run_tasks(tasks: list[InstanceTask], workers: int) -> Iterator[str]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(write_instance_map, tasks)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap_unordered(write_instance_map, tasks, chunksize=8)


def prepare_coco_stuff(annotations: Union[str, Path], images: Union[str, Path], labels: Union[str, Path],
                       root: Union[str, Path], split: str = "train", *, workers: int = 1,
                       progress: bool = True, limit: Optional[int] = None) -> PrepareResult:
    """Make ``root`` a ``spade-data shard --layout coco-stuff`` dataset for ``split``.

    ``root/{split}_img`` and ``root/{split}_label`` become symlinks to the downloaded ``images``
    (train2017/) and ``labels`` (stuffthingmaps_trainval2017/train2017/) folders; the instance maps
    are written to ``root/{split}_inst/``. Maps already there are kept (resume).
    ``limit`` stops after that many images of the annotation file (trying the pipeline on a few).
    """
    root = Path(root)
    if not split or "/" in split or split in (".", ".."):
        raise DataToolsError(f"bad split name {split!r}")
    root.mkdir(parents=True, exist_ok=True)
    _link_folder(root / f"{split}_img", Path(images), "image")
    _link_folder(root / f"{split}_label", Path(labels), "label")
    inst_dir = root / f"{split}_inst"
    inst_dir.mkdir(exist_ok=True)
    tasks = load_tasks(Path(annotations), root / f"{split}_label", inst_dir)
    if limit is not None:
        tasks = tasks[:limit]
    for leftover in inst_dir.glob("*.tmp-*"):  # from an interrupted run (writes are temp + rename)
        leftover.unlink(missing_ok=True)
    done = {p.name for p in inst_dir.iterdir()}
    todo = [task for task in tasks if task.out.name not in done]
    from tqdm import tqdm

    for _ in tqdm(_run_tasks(todo, workers), total=len(todo), disable=not progress, unit="map",
                  desc=f"{split}_inst"):
        pass
    return PrepareResult(written=len(todo), skipped=len(tasks) - len(todo), root=root)
