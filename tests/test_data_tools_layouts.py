"""data_tools layouts (ADE20K shift, Cityscapes, custom) and every bad-input case, on tiny hand-made folders."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.layouts import DataToolsError
from data_tools.shard import shard_dataset
from data_tools.tario import read_tar_samples
from data_tools.verify import verify_shards

W, H = 16, 12


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _photo(path: Path, seed: int, size: tuple[int, int] = (W, H)) -> Path:
    rng = np.random.default_rng(seed)
    return _save(path, rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _ids(values: list[int], dtype=np.uint8, size: tuple[int, int] = (W, H)) -> np.ndarray:
    """An id map whose pixels cycle through ``values`` (so each value is present)."""
    flat = np.resize(np.array(values, dtype=dtype), size[0] * size[1])
    return flat.reshape(size[1], size[0])


def _decode_ids(payload: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)))


def _all_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        samples.update(read_tar_samples(tar_path))
    return samples


# ------------------------------------------------------------------------------------------ ADE20K


def _ade_root(tmp_path: Path, raw_values: list[int]) -> Path:
    base = tmp_path / "ade" / "ADEChallengeData2016"
    for i, folder in enumerate(("training", "training", "validation")):
        stem = f"ADE_{'train' if folder == 'training' else 'val'}_{i:08d}"
        _photo(base / "images" / folder / f"{stem}.jpg", i)
        _save(base / "annotations" / folder / f"{stem}.png", _ids(raw_values))
    return tmp_path / "ade"


def test_ade20k_labels_are_shifted_with_zero_as_dontcare(tmp_path: Path) -> None:
    root = _ade_root(tmp_path, [0, 1, 2, 150])
    out = tmp_path / "out"
    manifest = shard_dataset("ade20k", root, out, "train", progress=False)
    assert (manifest["dataset"], manifest["label_nc"], manifest["contain_dontcare_label"], manifest["instance"]) == \
        ("ade20k", 150, True, False)
    samples = _all_samples(out)
    assert sorted(samples) == ["ADE_train_00000000", "ADE_train_00000001"]
    sample = samples["ADE_train_00000000"]
    assert sorted(sample) == ["image.jpg", "label.png", "meta.json"]
    np.testing.assert_array_equal(_decode_ids(sample["label.png"]), _ids([255, 0, 1, 149]))
    histogram = manifest["splits"]["train"]["class_histogram"]
    per_value = W * H // 4 * 2  # each of the four values covers a quarter of both maps
    assert len(histogram) == 151
    assert (histogram[0], histogram[1], histogram[149], histogram[150]) == (per_value,) * 4
    assert json.loads(sample["meta.json"])["source"] == {
        "image": "ADEChallengeData2016/images/training/ADE_train_00000000.jpg",
        "label": "ADEChallengeData2016/annotations/training/ADE_train_00000000.png"}

    manifest = shard_dataset("ade20k", root, out, "val", progress=False)  # val -> validation folder
    assert manifest["splits"]["val"]["shards"][0]["keys"] == ["ADE_val_00000002"]
    assert verify_shards(out, deep=True) == []


def test_ade20k_raw_id_above_150_is_an_error_after_the_shift(tmp_path: Path) -> None:
    root = _ade_root(tmp_path, [0, 151])
    with pytest.raises(DataToolsError, match=r"ADE_train_0000000[01]\.png has ids 150 after the dataset's shift"):
        shard_dataset("ade20k", root, tmp_path / "out", "train", progress=False)


# -------------------------------------------------------------------------------------- Cityscapes


def _cityscapes_root(tmp_path: Path, label_values: list[int]) -> Path:
    root = tmp_path / "cityscapes"
    for i, (city, stem) in enumerate((("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313"))):
        _photo(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", i)
        gt = root / "gtFine" / "train" / city
        _save(gt / f"{stem}_gtFine_labelIds.png", _ids(label_values))
        _save(gt / f"{stem}_gtFine_instanceIds.png", _ids([26001 + i, 24000, 7], dtype=np.uint16))
        _photo(gt / f"{stem}_gtFine_color.png", 10 + i)  # RGB colour rendering: must be ignored
        (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    return root


def test_cityscapes_layout_keeps_16bit_instance_ids(tmp_path: Path) -> None:
    root = _cityscapes_root(tmp_path, [0, 7, 26, 33])
    out = tmp_path / "out"
    manifest = shard_dataset("cityscapes", root, out, "train", progress=False)
    assert (manifest["label_nc"], manifest["contain_dontcare_label"], manifest["instance"]) == (35, False, True)
    samples = _all_samples(out)
    assert sorted(samples) == ["aachen_000000_000019", "bochum_000000_000313"]
    sample = samples["bochum_000000_000313"]
    assert sorted(sample) == ["image.png", "instance.png", "label.png", "meta.json"]
    np.testing.assert_array_equal(_decode_ids(sample["instance.png"]), _ids([26002, 24000, 7], dtype=np.uint16))
    np.testing.assert_array_equal(_decode_ids(sample["label.png"]), _ids([0, 7, 26, 33]))
    assert json.loads(sample["meta.json"])["source"]["instance"] == \
        "gtFine/train/bochum/bochum_000000_000313_gtFine_instanceIds.png"
    assert verify_shards(out, deep=True) == []


def test_cityscapes_255_is_an_error_without_a_dontcare_label(tmp_path: Path) -> None:
    root = _cityscapes_root(tmp_path, [0, 255])
    with pytest.raises(DataToolsError, match=r"labelIds\.png has ids 255; allowed are 0\.\.34$|labelIds\.png has ids 255; allowed are 0\.\.34;"):
        shard_dataset("cityscapes", root, tmp_path / "out", "train", progress=False)


# ------------------------------------------------------------------------------------------ custom


def _custom_root(tmp_path: Path, count: int = 3, label_nc: int = 4) -> Path:
    root = tmp_path / "custom"
    for i in range(count):
        _photo(root / "imgs" / f"s{i}.jpg", i)
        _save(root / "labs" / f"s{i}.png", _ids(list(range(label_nc))))
    return root


def test_custom_layout_with_relative_and_absolute_folders(tmp_path: Path) -> None:
    root = _custom_root(tmp_path)
    _photo(root / "imgs" / "x.y.jpg", 9)
    _save(root / "labs" / "x.y.png", _ids([3]))
    (root / "imgs" / "notes.txt").write_text("not an image")
    out_rel, out_abs = tmp_path / "rel", tmp_path / "abs"
    assert main(["shard", "--layout", "custom", "--root", str(root), "--out", str(out_rel), "--image-dir", "imgs",
                 "--label-dir", "labs", "--label-nc", "4", "--no-progress", "--workers", "1"]) == 0
    assert main(["shard", "--layout", "custom", "--root", str(root), "--out", str(out_abs), "--image-dir",
                 str(root / "imgs"), "--label-dir", str(root / "labs"), "--label-nc", "4", "--no-progress"]) == 0
    manifest = json.loads((out_rel / "manifest.json").read_text())
    assert (manifest["name"], manifest["label_nc"], manifest["contain_dontcare_label"], manifest["instance"]) == \
        ("custom", 4, False, False)
    assert manifest["splits"]["train"]["shards"][0]["keys"] == ["s0", "s1", "s2", "x_y"]
    assert (out_rel / "custom-train-000000.tar").read_bytes() == (out_abs / "custom-train-000000.tar").read_bytes()


def test_custom_layout_with_instances_and_16bit_labels(tmp_path: Path) -> None:
    root = tmp_path / "wide"
    for i in range(2):
        _photo(root / "train" / "images" / f"a{i}.png", i)
        _save(root / "train" / "labels" / f"a{i}.png", _ids([0, 299], dtype=np.uint16))
        _save(root / "inst" / f"a{i}.png", _ids([1, 2]))
    manifest = shard_dataset("custom", root, tmp_path / "out", "train", label_nc=300, instance_dir="inst",
                             progress=False)
    assert manifest["instance"] is True and manifest["splits"]["train"]["class_histogram"][299] == W * H
    label = _all_samples(tmp_path / "out")["a0"]["label.png"]
    assert (_decode_ids(label) == _ids([0, 299], dtype=np.uint16)).all()


def test_custom_layout_needs_label_nc(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _custom_root(tmp_path)
    assert main(["shard", "--layout", "custom", "--root", str(root), "--out", str(tmp_path / "o"),
                 "--image-dir", "imgs", "--label-dir", "labs"]) == 2
    assert "--label-nc is required" in capsys.readouterr().err


def test_max_side_downscales_image_and_labels_nearest(tmp_path: Path) -> None:
    root = _custom_root(tmp_path, count=1)
    shard_dataset("custom", root, tmp_path / "out", image_dir="imgs", label_dir="labs", label_nc=4, max_side=8,
                  progress=False)
    sample = _all_samples(tmp_path / "out")["s0"]
    image = Image.open(io.BytesIO(sample["image.jpg"]))
    label = _decode_ids(sample["label.png"])
    assert image.format == "JPEG" and image.size == (8, 6) and label.shape == (6, 8)
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    assert json.loads(sample["meta.json"])[("width")] == 8


# --------------------------------------------------------------------------------------- bad input


def _unreadable_image(root: Path) -> tuple[str, str]:
    (root / "imgs" / "s1.jpg").write_bytes(b"this is not a jpeg")
    return str(root / "imgs" / "s1.jpg"), "cannot decode image"


def _missing_label(root: Path) -> tuple[str, str]:
    (root / "labs" / "s1.png").unlink()
    return str(root / "imgs" / "s1.jpg"), "no label"


def _missing_image(root: Path) -> tuple[str, str]:
    (root / "imgs" / "s1.jpg").unlink()
    return str(root / "labs" / "s1.png"), "no image"


def _size_mismatch(root: Path) -> tuple[str, str]:
    _save(root / "labs" / "s1.png", _ids([1], size=(8, 8)))
    return str(root / "labs" / "s1.png"), "is 16x12 but label"


def _id_too_large(root: Path) -> tuple[str, str]:
    _save(root / "labs" / "s1.png", _ids([0, 4, 9]))
    return str(root / "labs" / "s1.png"), "has ids 4, 9; allowed are 0..3"


def _rgb_label(root: Path) -> tuple[str, str]:
    _photo(root / "labs" / "s1.png", 5)
    return str(root / "labs" / "s1.png"), "has mode RGB"


BAD_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "unreadable_image": _unreadable_image, "missing_label": _missing_label, "missing_image": _missing_image,
    "size_mismatch": _size_mismatch, "id_too_large": _id_too_large, "rgb_label": _rgb_label,
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_with_the_path_or_is_skipped_and_listed(case: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    root = _custom_root(tmp_path)
    bad_path, words = BAD_CASES[case](root)
    out = tmp_path / "out"
    args = ["shard", "--layout", "custom", "--root", str(root), "--out", str(out), "--image-dir", "imgs",
            "--label-dir", "labs", "--label-nc", "4", "--max-count", "1", "--no-progress", "--workers", "1"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert bad_path in err and words in err and "'s1'" in err, err
    assert not (out / "manifest.json").exists()  # nothing incomplete is marked complete

    assert main(args + ["--skip-bad"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert [s["keys"] for s in train["shards"]] == [["s0"], ["s2"]]
    assert [s["key"] for s in train["skipped"]] == ["s1"]
    assert words in train["skipped"][0]["reason"]
    assert str(tmp_path) not in json.dumps(manifest)  # manifest paths are relative to the root
    assert verify_shards(out, deep=True) == []


def test_shards_that_skipped_samples_are_not_reused_without_skip_bad(tmp_path: Path) -> None:
    root = _custom_root(tmp_path)
    _rgb_label(root)
    out = tmp_path / "out"
    options = {"image_dir": "imgs", "label_dir": "labs", "label_nc": 4, "progress": False}
    assert shard_dataset("custom", root, out, skip_bad=True, **options)["splits"]["train"]["num_samples"] == 2
    with pytest.raises(DataToolsError, match="has mode RGB"):
        shard_dataset("custom", root, out, **options)
    with pytest.raises(DataToolsError, match="no label"):  # pairing problems fail before any shard too
        (root / "labs" / "s1.png").unlink()
        shard_dataset("custom", root, out, **options)


def test_a_failed_reshard_removes_the_split_from_the_manifest(tmp_path: Path, coco_sample: Path) -> None:
    root = _custom_root(tmp_path)
    out = tmp_path / "out"
    options = {"image_dir": "imgs", "label_dir": "labs", "label_nc": 4, "max_count": 1, "progress": False}
    shard_dataset("custom", root, out, **options)
    shard_dataset("custom", root, out, "val", image_dir="imgs", label_dir="labs", label_nc=4, progress=False)
    _id_too_large(root)
    with pytest.raises(DataToolsError, match="s1.png"):
        shard_dataset("custom", root, out, **options)
    assert list(json.loads((out / "manifest.json").read_text())["splits"]) == ["val"]
    with pytest.raises(DataToolsError, match="s1.png"):
        shard_dataset("custom", root, out, "val", image_dir="imgs", label_dir="labs", label_nc=4, progress=False)
    assert not (out / "manifest.json").exists()


def test_failed_run_resumes_after_the_bad_file_is_fixed(tmp_path: Path) -> None:
    root = _custom_root(tmp_path)
    _id_too_large(root)
    out = tmp_path / "out"
    options = {"image_dir": "imgs", "label_dir": "labs", "label_nc": 4, "max_count": 1, "progress": False}
    with pytest.raises(DataToolsError, match="s1.png"):
        shard_dataset("custom", root, out, **options)
    first = (out / "custom-train-000000.tar").stat()
    assert not (out / "custom-train-000001.tar").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp-*")) and not (out / "_parts" / "custom-train-000001.tar.json").exists()
    _save(root / "labs" / "s1.png", _ids([0, 3]))
    manifest = shard_dataset("custom", root, out, **options)
    assert manifest["splits"]["train"]["num_samples"] == 3
    now = (out / "custom-train-000000.tar").stat()
    assert (now.st_ino, now.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_unknown_layout_and_missing_folders_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataToolsError, match="unknown layout 'kitti'"):
        shard_dataset("kitti", tmp_path, tmp_path / "o")
    with pytest.raises(DataToolsError, match=r"image folder not found: .*train_img"):
        shard_dataset("coco-stuff", tmp_path, tmp_path / "o")
