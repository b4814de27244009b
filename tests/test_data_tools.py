"""data_tools: deterministic / resumable sharding of the COCO-Stuff sample, verify, slices + merge, CLI."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.layouts import DataToolsError
from data_tools.manifest import merge_manifest
from data_tools.shard import ShardSlice, shard_dataset
from data_tools.stats import compute_stats
from data_tools.tario import read_tar_samples
from data_tools.verify import verify_shards


def _shard_coco(coco_sample: Path, out: Path, **kwargs) -> dict:
    options = {"max_count": 5, "workers": 1, "progress": False, **kwargs}
    return shard_dataset("coco-stuff", coco_sample, out, "train", **options)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    """Shards and manifest (what consumers read), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def coco_shards(coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco_shards")
    _shard_coco(coco_sample, out)
    return out


def test_coco_sample_sharding_is_byte_identical_across_runs_and_worker_counts(
        coco_sample: Path, coco_shards: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    _shard_coco(coco_sample, again, workers=2)
    first, second = _tree_bytes(coco_shards), _tree_bytes(again)
    assert sorted(first) == ["coco-stuff-train-000000.tar", "coco-stuff-train-000001.tar",
                             "coco-stuff-train-000002.tar", "manifest.json"]
    assert first == second

    manifest = json.loads(first["manifest.json"])
    train = manifest["splits"]["train"]
    assert (manifest["label_nc"], manifest["contain_dontcare_label"], manifest["instance"]) == (182, True, True)
    assert [s["samples"] for s in train["shards"]] == [5, 5, 3]
    keys = [k for s in train["shards"] for k in s["keys"]]
    stems = [p.stem for p in (coco_sample / "train_img").glob("*.jpg")]
    # Shuffled once by the default seed 0 (docs/DATA_TOOLS.md: order = sha256("0:" + key)).
    assert keys == sorted(stems, key=lambda k: hashlib.sha256(f"0:{k}".encode()).digest()) != sorted(stems)
    assert train["shuffle_seed"] == 0
    assert len(train["class_histogram"]) == 183
    # Per-shard class histograms add up to the split's.
    assert [sum(col) for col in zip(*(s["class_histogram"] for s in train["shards"]))] == train["class_histogram"]
    # every pixel is counted once: histogram total = sum of image areas
    areas = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in (coco_sample / "train_label").glob("*.png"))
    assert sum(train["class_histogram"]) == areas
    assert train["image_size"]["width"]["max"] == 640 and train["skipped"] == []


def test_shuffle_seed_decides_the_order_and_no_shuffle_sorts(coco_sample: Path, coco_shards: Path,
                                                             tmp_path: Path) -> None:
    def keys(out: Path) -> list[str]:
        return [k for s in json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"] for k in s["keys"]]

    assert main(["shard", "--layout", "coco-stuff", "--root", str(coco_sample), "--out", str(tmp_path / "s0"),
                 "--max-count", "5", "--workers", "1", "--no-progress", "--shuffle-seed", "0"]) == 0
    assert _tree_bytes(tmp_path / "s0") == _tree_bytes(coco_shards)  # same seed -> byte-identical shards
    assert main(["shard", "--layout", "coco-stuff", "--root", str(coco_sample), "--out", str(tmp_path / "s7"),
                 "--max-count", "5", "--workers", "1", "--no-progress", "--shuffle-seed", "7"]) == 0
    assert sorted(keys(tmp_path / "s7")) == sorted(keys(coco_shards)) and keys(tmp_path / "s7") != keys(coco_shards)
    assert main(["shard", "--layout", "coco-stuff", "--root", str(coco_sample), "--out", str(tmp_path / "sorted"),
                 "--max-count", "5", "--workers", "1", "--no-progress", "--no-shuffle"]) == 0
    assert keys(tmp_path / "sorted") == sorted(keys(coco_shards))
    assert json.loads((tmp_path / "sorted" / "manifest.json").read_text())["splits"]["train"]["shuffle_seed"] is None


def test_shard_members_hold_original_bytes_in_fixed_order(coco_sample: Path, coco_shards: Path) -> None:
    import tarfile
    with tarfile.open(coco_shards / "coco-stuff-train-000000.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos[:4]] == ["000000017914.image.jpg", "000000017914.label.png",
                                           "000000017914.instance.png", "000000017914.meta.json"]
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" and i.mode == 0o644 for i in infos)
    sample = read_tar_samples(coco_shards / "coco-stuff-train-000000.tar")["000000017914"]
    assert sample["image.jpg"] == (coco_sample / "train_img" / "000000017914.jpg").read_bytes()
    assert sample["label.png"] == (coco_sample / "train_label" / "000000017914.png").read_bytes()
    meta = json.loads(sample["meta.json"])
    assert meta == {"key": "000000017914", "width": 500, "height": 375,
                    "source": {"image": "train_img/000000017914.jpg", "label": "train_label/000000017914.png",
                               "instance": "train_inst/000000017914.png"}}


def test_verify_deep_passes_and_a_flipped_byte_fails_naming_the_shard(
        coco_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert verify_shards(coco_shards, deep=True, progress=True) == []
    bar = capsys.readouterr().err
    assert "verify --deep" in bar and "/13 " in bar  # the 13 train samples, shard by shard
    assert main(["verify", "--deep", str(coco_shards)]) == 0
    assert "verify --deep" not in capsys.readouterr().err  # stderr is no terminal here: no bar

    broken = tmp_path / "broken"
    broken.mkdir()
    for name, payload in _tree_bytes(coco_shards).items():
        (broken / name).write_bytes(payload)
    target = broken / "coco-stuff-train-000001.tar"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    target.write_bytes(bytes(data))

    problems = verify_shards(broken)
    assert problems and {p.shard for p in problems} == {"coco-stuff-train-000001.tar"}
    assert any("sha256" in p.message for p in problems)
    capsys.readouterr()
    assert main(["verify", str(broken)]) == 1
    assert "coco-stuff-train-000001.tar" in capsys.readouterr().err


def test_verify_deep_lists_bad_samples_by_key(coco_shards: Path, tmp_path: Path) -> None:
    """A shard whose sha256 was 'fixed' after corrupting a label is still caught by --deep, by key."""
    import hashlib

    from data_tools.tario import write_tar_atomic
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, payload in _tree_bytes(coco_shards).items():
        (bad / name).write_bytes(payload)
    shard = bad / "coco-stuff-train-000002.tar"
    samples = read_tar_samples(shard)
    key = next(iter(samples))
    samples[key]["label.png"] = b"not a png"
    write_tar_atomic(shard, [(f"{k}.{f}", p) for k, fields in samples.items() for f, p in fields.items()])
    manifest = json.loads((bad / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][2]
    entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(bad, deep=False) == []
    problems = verify_shards(bad, deep=True)
    assert [(p.shard, p.key) for p in problems] == [("coco-stuff-train-000002.tar", key)]
    assert "label.png" in problems[0].message


def test_resume_skips_complete_shards_and_removes_temp_files(coco_sample: Path, coco_shards: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "resume"
    _shard_coco(coco_sample, out)
    before = {n: (out / n).stat() for n in ("coco-stuff-train-000000.tar", "coco-stuff-train-000001.tar")}
    (out / "coco-stuff-train-000002.tar").unlink()
    leftover = out / "coco-stuff-train-000001.tar.tmp-99999"
    leftover.write_bytes(b"half a shard")
    (out / "manifest.json").unlink()

    _shard_coco(coco_sample, out)
    assert not leftover.exists()
    for name, stat in before.items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), f"{name} was rewritten"
    assert _tree_bytes(out) == _tree_bytes(coco_shards)


def test_resume_rewrites_a_shard_whose_bytes_changed(coco_sample: Path, coco_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "changed"
    _shard_coco(coco_sample, out)
    (out / "coco-stuff-train-000000.tar").write_bytes(b"garbage")
    _shard_coco(coco_sample, out)
    assert _tree_bytes(out) == _tree_bytes(coco_shards)


def test_max_count_and_split_merging(coco_sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "counted"
    _shard_coco(coco_sample, out, max_count=4)
    manifest = shard_dataset("coco-stuff", coco_sample, out, "val", max_count=3, progress=False)
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 4, 1]
    assert [s["file"] for s in manifest["splits"]["val"]["shards"]] == [
        "coco-stuff-val-000000.tar", "coco-stuff-val-000001.tar", "coco-stuff-val-000002.tar"]
    assert list(manifest["splits"]) == ["train", "val"]
    # re-sharding train with another count keeps val and drops the stale 4th train shard
    manifest = _shard_coco(coco_sample, out, max_count=7)
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [7, 6]
    assert manifest["splits"]["val"]["num_samples"] == 8
    assert not (out / "coco-stuff-train-000002.tar").exists()
    assert verify_shards(out) == []


def test_max_size_limits_shard_bytes(coco_sample: Path, tmp_path: Path) -> None:
    limit = 400_000
    manifest = _shard_coco(coco_sample, tmp_path / "sized", max_count=100, max_size=limit)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and sum(s["samples"] for s in shards) == 13
    assert all(s["bytes"] <= limit for s in shards)


def test_shard_slices_then_merge_equal_single_process_run(coco_sample: Path, coco_shards: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sliced"
    part = _shard_coco(coco_sample, out, shard_slice=ShardSlice(1, 2))
    assert [s["file"] for s in part["shards"]] == ["coco-stuff-train-000001.tar"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataToolsError, match="coco-stuff-train-000000.tar"):
        merge_manifest(out)
    capsys.readouterr()
    assert main(["merge-manifest", str(out)]) == 2
    assert "coco-stuff-train-000002.tar" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()

    assert main(["shard", "--layout", "coco-stuff", "--root", str(coco_sample), "--out", str(out),
                 "--max-count", "5", "--shard-slice", "0/2", "--workers", "1", "--no-progress"]) == 0
    assert main(["merge-manifest", str(out)]) == 0
    assert _tree_bytes(out) == _tree_bytes(coco_shards)


def test_shard_slice_parsing_rejects_bad_values() -> None:
    assert ShardSlice.parse("2/3").owns(5) and not ShardSlice.parse("2/3").owns(4)
    for text in ("3/3", "x/2", "1", "-1/2"):
        with pytest.raises(DataToolsError, match="shard-slice"):
            ShardSlice.parse(text)


def test_stats_from_manifest(coco_shards: Path, capsys: pytest.CaptureFixture) -> None:
    stats = compute_stats(coco_shards, top=3)
    train = stats["splits"]["train"]
    manifest = json.loads((coco_shards / "manifest.json").read_text())
    histogram = manifest["splits"]["train"]["class_histogram"]
    assert train["top_classes"][0]["pixels"] == max(histogram[:182])
    assert len(train["top_classes"]) == 3 and train["num_samples"] == 13
    assert abs(train["dontcare_fraction"] - histogram[182] / sum(histogram)) < 1e-12
    assert main(["stats", "--json", str(coco_shards)]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["num_shards"] == 3
    assert main(["stats", str(coco_shards)]) == 0
    assert "split train: 13 samples in 3 shards" in capsys.readouterr().out


def test_output_dir_refuses_another_dataset_name(coco_sample: Path, coco_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "named"
    _shard_coco(coco_sample, out)
    with pytest.raises(DataToolsError, match="other"):
        _shard_coco(coco_sample, out, name="other")


def test_python_dash_m_help(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "data_tools", "--help"], cwd=repo_root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("shard", "verify", "stats", "synth", "merge-manifest"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "data_tools", "verify", "/nonexistent/dir"], cwd=repo_root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "/nonexistent/dir" in result.stderr  # bad input, as `stats /nonexistent/dir`


@pytest.mark.e2e
def test_shard_pushes_its_result_to_the_pushgateway(coco_sample: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from spade_dist.monitoring.services import start_pushgateway

    out = tmp_path / "shards"
    with start_pushgateway(tmp_path / "gw") as gw:
        assert main(["shard", "--layout", "coco-stuff", "--root", str(coco_sample), "--out", str(out),
                     "--max-count", "5", "--workers", "1", "--no-progress", "--pushgateway", gw.address]) == 0
        assert f"pushed to {gw.address}" in capsys.readouterr().out
        with urllib.request.urlopen(f"http://{gw.address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    pushed = {s.name: (s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("spade_shard_")}
    entry = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    labels = {"job": "spade-data-shard", "dataset": "coco-stuff", "split": "train", "instance": ""}
    assert pushed["spade_shard_samples"] == (labels, float(entry["num_samples"]))
    assert pushed["spade_shard_files"] == (labels, float(len(entry["shards"])))
    assert pushed["spade_shard_bytes"] == (labels, float(sum((out / s["file"]).stat().st_size for s in entry["shards"])))
    assert pushed["spade_shard_skipped_samples"] == (labels, 0.0)
    # An unreachable gateway is a one-line user error naming it (the shards are written by then).
    assert main(["shard", "--layout", "coco-stuff", "--root", str(coco_sample), "--out", str(out),
                 "--max-count", "5", "--workers", "1", "--no-progress", "--pushgateway", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and len(err.strip().splitlines()) == 1


def test_stats_shows_per_shard_class_mix_of_a_grouped_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    # 16 samples "sorted by scene": keys a* are all class 1, keys b* all class 2.
    root = tmp_path / "raw"
    for folder in ("images", "labels"):
        (root / "train" / folder).mkdir(parents=True)
    for i in range(16):
        key, cls = (f"a{i:02d}", 1) if i < 8 else (f"b{i:02d}", 2)
        Image.fromarray(np.full((16, 16, 3), 40 * cls, np.uint8)).save(root / "train" / "images" / f"{key}.png")
        Image.fromarray(np.full((16, 16), cls, np.uint8)).save(root / "train" / "labels" / f"{key}.png")
    mixes = {}
    for order in (["--no-shuffle"], ["--shuffle-seed", "0"]):
        out = tmp_path / order[0]
        assert main(["shard", "--layout", "custom", "--root", str(root), "--out", str(out), "--label-nc", "3",
                     "--max-count", "4", "--workers", "1", "--no-progress", *order]) == 0
        mixes[order[0]] = compute_stats(out)["splits"]["train"]["shard_mix"]
        capsys.readouterr()
        assert main(["stats", str(out)]) == 0
        text = capsys.readouterr().out
        assert "shard class mix" in text and "train-000000.tar" in text
    grouped, shuffled = mixes["--no-shuffle"], mixes["--shuffle-seed"]
    # Sorted: every shard holds one class, half the split's mix away; shuffling brings shards closer.
    assert [r["tv_distance"] for r in grouped["shards"]] == [0.5] * 4
    assert all(r["classes_present"] == 1 and r["top_fraction"] == 1.0 for r in grouped["shards"])
    assert shuffled["mean_tv_distance"] < grouped["mean_tv_distance"]
