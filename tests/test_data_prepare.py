"""`spade-data prepare coco-stuff` (instance maps from a hand-made COCO annotation JSON, pixel by pixel,
resumable, parallel) and `spade-data check-layout` on ADE20K / Cityscapes / COCO-Stuff folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.layouts import DataToolsError, LayoutOptions, check_layout

W, H = 8, 6


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _download(tmp_path: Path) -> tuple[Path, Path, Path]:
    """images/, labels/ and an annotation JSON as the COCO / COCO-Stuff downloads name them."""
    images, labels = tmp_path / "train2017", tmp_path / "stuffthingmaps" / "train2017"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    label = np.full((H, W), 100, np.uint8)
    label[5, :] = 255
    for stem in ("000000000001", "000000000002"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / f"{stem}.jpg")
        Image.fromarray(label).save(labels / f"{stem}.png")
    annotations = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": W, "height": H},
                   {"id": 2, "file_name": "000000000002.jpg", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
        "annotations": [
            # count 0: rows 0-2, cols 0-3 (vertex coordinates minus one, borders included)
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [_rect(1, 1, 4, 3)]},
            # crowd (RLE): skipped and not counted, as in the original script
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 1,
             "segmentation": {"counts": [0, 48], "size": [H, W]}},
            # count 1: two polygons, the second one beyond the right border (clipped)
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [_rect(6, 4, 8, 5), _rect(7, 1, 10, 2)]},
            # count 2: overlaps count 0 and overwrites it (annotation order)
            {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [_rect(3, 2, 5, 3)]},
        ],
    }
    ann_file = tmp_path / "instances_train2017.json"
    ann_file.write_text(json.dumps(annotations))
    return ann_file, images, labels


EXPECTED_1 = np.array([
    [0, 0, 0, 0, 100, 100, 1, 1],
    [0, 0, 2, 2, 2, 100, 1, 1],
    [0, 0, 2, 2, 2, 100, 100, 100],
    [100, 100, 100, 100, 100, 1, 1, 1],
    [100, 100, 100, 100, 100, 1, 1, 1],
    [255, 255, 255, 255, 255, 255, 255, 255],
], np.uint8)


def _prepare(ann: Path, images: Path, labels: Path, root: Path, *extra: str) -> int:
    return main(["prepare", "coco-stuff", "--annotations", str(ann), "--images", str(images),
                 "--labels", str(labels), "--root", str(root), "--no-progress", *extra])


def test_instance_maps_pixel_by_pixel_then_shardable(tmp_path: Path, capsys) -> None:
    ann, images, labels = _download(tmp_path)
    root = tmp_path / "coco"
    assert _prepare(ann, images, labels, root, "--workers", "1") == 0
    inst1 = Image.open(root / "train_inst" / "000000000001.png")
    assert inst1.mode == "L"
    np.testing.assert_array_equal(np.asarray(inst1), EXPECTED_1)
    # no annotation: the instance map is the label map
    np.testing.assert_array_equal(np.asarray(Image.open(root / "train_inst" / "000000000002.png")),
                                  np.asarray(Image.open(labels / "000000000002.png")))
    assert (root / "train_img").resolve() == images.resolve()
    assert (root / "train_label").resolve() == labels.resolve()
    assert "2 instance maps written, 0 already present" in capsys.readouterr().out
    # the result is the coco-stuff layout that `shard` reads
    assert main(["check-layout", "--layout", "coco-stuff", "--root", str(root), "--split", "train"]) == 0
    assert "OK coco-stuff train: 2 samples" in capsys.readouterr().out
    assert main(["shard", "--layout", "coco-stuff", "--root", str(root), "--out", str(tmp_path / "shards"),
                 "--workers", "1", "--no-progress"]) == 0


def test_resume_skips_finished_maps_and_workers_do_not_change_bytes(tmp_path: Path, capsys) -> None:
    ann, images, labels = _download(tmp_path)
    root = tmp_path / "coco"
    assert _prepare(ann, images, labels, root, "--workers", "2") == 0
    first = {p.name: p.read_bytes() for p in (root / "train_inst").iterdir()}
    capsys.readouterr()
    assert _prepare(ann, images, labels, root) == 0
    assert "0 instance maps written, 2 already present" in capsys.readouterr().out
    # an interrupted run leaves a temp file and misses a map: the rerun removes the one, writes the other
    (root / "train_inst" / "000000000001.png").unlink()
    (root / "train_inst" / "000000000001.png.tmp-999").write_bytes(b"partial")
    assert _prepare(ann, images, labels, root, "--workers", "1") == 0
    assert "1 instance maps written, 1 already present" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (root / "train_inst").iterdir()} == first


def test_prepare_errors_name_the_file(tmp_path: Path, capsys) -> None:
    ann, images, labels = _download(tmp_path)
    (labels / "000000000002.png").unlink()
    assert _prepare(ann, images, labels, tmp_path / "coco", "--workers", "1") == 2
    assert "label map not found" in capsys.readouterr().err
    assert _prepare(tmp_path / "nope.json", images, labels, tmp_path / "coco") == 2
    assert "annotation file not found" in capsys.readouterr().err
    # a polygon with an odd number of coordinates names the output map
    broken = json.loads(ann.read_text())
    broken["annotations"][0]["segmentation"] = [[1, 1, 4]]
    ann.write_text(json.dumps(broken))
    (labels / "000000000002.png").write_bytes((labels / "000000000001.png").read_bytes())
    assert _prepare(ann, images, labels, tmp_path / "fresh", "--workers", "1") == 2
    assert "000000000001.png: bad polygon in the annotation file" in capsys.readouterr().err
    # a root whose {split}_img already points elsewhere is refused rather than silently re-pointed
    other = tmp_path / "other"
    other.mkdir()
    assert _prepare(ann, other, labels, tmp_path / "coco") == 2
    assert "already exists and is not" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ check-layout


def _touch_png(path: Path, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 4)).save(path)


def _ade(root: Path, image_folder: str = "training") -> Path:
    base = root / "ADEChallengeData2016"
    _touch_png(base / "images" / image_folder / "ADE_train_00000001.jpg", "RGB")
    _touch_png(base / "annotations" / "training" / "ADE_train_00000001.png")
    return root


def _cityscapes(root: Path) -> Path:
    _touch_png(root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png", "RGB")
    for kind in ("labelIds", "instanceIds", "color"):
        _touch_png(root / "gtFine" / "train" / "aachen" / f"aachen_000000_000019_gtFine_{kind}.png")
    return root


def test_ade20k_layout_ok_and_misnamed_folder(tmp_path: Path) -> None:
    assert check_layout("ade20k", _ade(tmp_path / "good"), "train", LayoutOptions()).startswith(
        "OK ade20k train: 1 samples, label_nc 150")
    with pytest.raises(DataToolsError, match=r"image folder not found: .*images/training; misnamed\? "
                                             r".*images/train exists"):
        check_layout("ade20k", _ade(tmp_path / "bad", image_folder="train"), "train", LayoutOptions())


def test_cityscapes_layout_ok_extra_level_and_missing_label_files(tmp_path: Path) -> None:
    assert "OK cityscapes train: 1 samples, label_nc 35" in check_layout(
        "cityscapes", _cityscapes(tmp_path / "good"), "train", LayoutOptions())
    # leftImg8bit_trainvaltest.zip unpacked into its own folder
    nested = tmp_path / "nested"
    _cityscapes(nested / "leftImg8bit_trainvaltest")
    (nested / "leftImg8bit_trainvaltest" / "gtFine").rename(nested / "gtFine")
    with pytest.raises(DataToolsError, match=r"it is at .*leftImg8bit_trainvaltest/leftImg8bit/train: "
                                             r"the download was unpacked one folder deeper"):
        check_layout("cityscapes", nested, "train", LayoutOptions())
    # only the colour images of gtFine: no label ids
    coloured = _cityscapes(tmp_path / "coloured")
    for path in (coloured / "gtFine").rglob("*_gtFine_[li]*Ids.png"):
        path.unlink()
    with pytest.raises(DataToolsError, match=r"no \*_gtFine_labelIds.png under"):
        check_layout("cityscapes", coloured, "train", LayoutOptions())


def test_check_layout_cli_exit_codes(tmp_path: Path, capsys) -> None:
    good = _cityscapes(tmp_path / "good")
    (good / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png").unlink()
    assert main(["check-layout", "--layout", "cityscapes", "--root", str(good), "--split", "train"]) == 2
    assert "1 unpaired sample(s): aachen_000000_000019: no instance map" in capsys.readouterr().err
    assert main(["check-layout", "--layout", "ade20k", "--root", str(tmp_path / "missing")]) == 2
    assert "dataset root not found" in capsys.readouterr().err


def test_check_layout_on_the_real_coco_stuff_sample(coco_sample: Path, capsys) -> None:
    assert main(["check-layout", "--layout", "coco-stuff", "--root", str(coco_sample)]) == 0
    out = capsys.readouterr().out
    assert "OK coco-stuff train: 13 samples, label_nc 182" in out
    assert "OK coco-stuff val: 8 samples" in out
