"""Synthetic landscape dataset: determinism, documented classes/colours, learnable colours, sharding it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_tools import synth
from data_tools.cli import main
from data_tools.shard import shard_dataset
from data_tools.stats import compute_stats
from data_tools.verify import verify_shards


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_images_do_not_depend_on_count(tmp_path: Path) -> None:
    first = synth.generate_synthetic(tmp_path / "a", count=5, seed=3, size=48, val_count=2)
    synth.generate_synthetic(tmp_path / "b", count=5, seed=3, size=48, val_count=2)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    assert len([n for n in files if n.startswith("train/images/")]) == 5
    assert len([n for n in files if n.startswith("val/labels/")]) == 2
    assert first["splits"] == {"train": 5, "val": 2}

    synth.generate_synthetic(tmp_path / "c", count=5, seed=4, size=48, val_count=2)
    assert _files(tmp_path / "c")["train/images/train_000000.png"] != files["train/images/train_000000.png"]

    # regenerating fewer samples in place removes the extra files and keeps the rest identical
    synth.generate_synthetic(tmp_path / "a", count=3, seed=3, size=48, val_count=0)
    smaller = _files(tmp_path / "a")
    assert sorted(n for n in smaller if n.startswith("train/images/")) == \
        [f"train/images/train_{i:06d}.png" for i in range(3)]
    assert not any(n.startswith("val/images/") for n in smaller)
    assert smaller["train/labels/train_000002.png"] == files["train/labels/train_000002.png"]


def test_dataset_json_and_docs_list_the_same_classes_and_colours(tmp_path: Path, repo_root: Path) -> None:
    descriptor = synth.generate_synthetic(tmp_path, count=1, size=32)
    assert json.loads((tmp_path / "dataset.json").read_text()) == descriptor
    assert descriptor["label_nc"] == synth.LABEL_NC == 10
    assert [(c["id"], c["name"], tuple(c["color"])) for c in descriptor["classes"]] == \
        [(i, name, colour) for i, (name, colour, _, _) in enumerate(synth.CLASSES)]
    documented = re.findall(r"^\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*\((\d+), (\d+), (\d+)\)\s*\|",
                            (repo_root / "docs" / "DATA_TOOLS.md").read_text(), flags=re.M)
    assert [(int(i), name, (int(r), int(g), int(b))) for i, name, r, g, b in documented] == \
        [(i, name, colour) for i, (name, colour, _, _) in enumerate(synth.CLASSES)]


def test_class_colours_are_distinct_and_rendered_faithfully() -> None:
    """What a generator must learn: each class's pixels sit near its base colour, classes far apart."""
    base = np.array([c[1] for c in synth.CLASSES], dtype=np.float64)
    distances = np.linalg.norm(base[:, None] - base[None], axis=-1) + np.eye(len(base)) * 1e9
    assert distances.min() > 40

    sums = np.zeros((synth.LABEL_NC, 3))
    counts = np.zeros(synth.LABEL_NC)
    for index in range(40):
        photo, label = synth.make_sample(0, "train", index, 48)
        assert photo.shape == (48, 48, 3) and photo.dtype == np.uint8 and label.dtype == np.uint8
        assert label.max() < synth.LABEL_NC
        for class_id in np.unique(label):
            mask = label == class_id
            sums[class_id] += photo[mask].sum(axis=0)
            counts[class_id] += mask.sum()
    assert (counts > 0).all(), f"classes never drawn: {[synth.CLASS_NAMES[i] for i in np.flatnonzero(counts == 0)]}"
    means = sums / counts[:, None]
    # shading is at most ±15% around the middle row and textures are mild
    assert np.abs(means - base).max() < 25, np.abs(means - base).max(axis=1)
    nearest = np.argmin(np.linalg.norm(means[:, None] - base[None], axis=-1), axis=1)
    assert (nearest == np.arange(synth.LABEL_NC)).all()


def test_synth_output_shards_with_the_custom_layout_unaided(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, out = tmp_path / "synth", tmp_path / "shards"
    assert main(["synth", "--out", str(root), "--count", "6", "--val-count", "2", "--size", "32", "--seed", "1"]) == 0
    manifest = shard_dataset("custom", root, out, "train", name="landscapes", max_count=4, progress=False)
    shard_dataset("custom", root, out, "val", name="landscapes", progress=False)
    assert (manifest["label_nc"], manifest["contain_dontcare_label"], manifest["instance"]) == (10, False, False)
    assert manifest["class_names"] == list(synth.CLASS_NAMES)
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 2]
    assert verify_shards(out, deep=True) == []
    stats = compute_stats(out)
    assert stats["splits"]["val"]["num_samples"] == 2
    assert stats["splits"]["train"]["top_classes"][0]["name"] in synth.CLASS_NAMES
    assert stats["splits"]["train"]["image_size"]["width"] == {"min": 32, "max": 32, "mean": 32.0}


def test_synth_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["synth", "--out", str(tmp_path), "--count", "2", "--size", "8"]) == 2
    assert "--size must be >= 16" in capsys.readouterr().err
