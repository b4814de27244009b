"""docs/REPRODUCE.md as a user runs it: its `# step:` blocks, verbatim and in order, on tiny fixtures.

The downloads are stood in for by the COCO-Stuff sample (plus a hand-made annotation JSON over its
photos) and tiny ADE20K / Cityscapes folders; training goes through slurm/train_gaugan.sh on a local
two-node Slurm cluster; EXTRA makes the model tiny and the run two steps long. Only the download block
is not run (no network)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.kit import SHRINK
from tests.official_reference import official_shapes, random_official_state_dict
from tests.slurm_cluster import REPO_ROOT, SlurmCluster

pytestmark = pytest.mark.e2e

PAGE = REPO_ROOT / "docs" / "REPRODUCE.md"
STEPS = ["download", "prepare", "shard", "train", "evaluate", "finetune"]
# The page's presets shrunk to the tiny model (load 36: a random crop as in the full-size settings).
TINY = " ".join([*SHRINK, "data.load_size=36", "train.max_steps=2", "train.log_every=1", "train.cpu_threads=1",
                 "loss.no_vgg_loss=true", "checkpoint.async_save=false", "eval.batch_size=4"])


def page_steps() -> dict[str, str]:
    blocks = re.findall(r"```bash\n# step: (\w+)\n(.*?)```", PAGE.read_text(), flags=re.S)
    return dict(blocks)


def _coco_download(dl: Path, coco_sample: Path) -> None:
    """What the COCO / COCO-Stuff archives unpack to, for the sample's photos and label maps."""
    (dl / "annotations").mkdir(parents=True)
    (dl / "stuffthingmaps_trainval2017").mkdir()
    for split in ("train", "val"):
        (dl / f"{split}2017").symlink_to(coco_sample / f"{split}_img")
        (dl / "stuffthingmaps_trainval2017" / f"{split}2017").symlink_to(coco_sample / f"{split}_label")
        images, annotations = [], []
        for image_id, path in enumerate(sorted((coco_sample / f"{split}_img").glob("*.jpg")), start=1):
            width, height = Image.open(path).size
            images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
            box = [width / 4, height / 4, 3 * width / 4, height / 4, 3 * width / 4, 3 * height / 4, width / 4, 3 * height / 4]
            annotations.append({"id": 10 * image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "segmentation": [box]})
        (dl / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": annotations,
             "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}))


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _ade_and_cityscapes_downloads(dl: Path) -> None:
    rng = np.random.default_rng(0)
    for split, folder in (("train", "training"), ("val", "validation")):
        for i in range(2):
            stem = f"ADE_{split}_{i:08d}"
            _png(dl / "ADEChallengeData2016" / "images" / folder / f"{stem}.png", rng.integers(0, 256, (8, 8, 3), np.uint8))
            _png(dl / "ADEChallengeData2016" / "annotations" / folder / f"{stem}.png", rng.integers(0, 151, (8, 8), np.uint8))
        prefix = dl / "cityscapes"
        stem = f"aachen_00000{int(split == 'val')}_000019"
        _png(prefix / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", rng.integers(0, 256, (8, 16, 3), np.uint8))
        _png(prefix / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", rng.integers(0, 35, (8, 16), np.uint8))
        _png(prefix / "gtFine" / split / "aachen" / f"{stem}_gtFine_instanceIds.png", rng.integers(0, 9, (8, 16), np.uint8))


def _run_step(steps: dict[str, str], name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", steps[name]], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"step {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_page_has_the_steps_in_order() -> None:
    assert list(page_steps()) == STEPS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).up()
    yield c
    c.down()


def test_reproduce_page_end_to_end(cluster: SlurmCluster, coco_sample: Path, tmp_path: Path) -> None:
    from spade_dist.eval.inception import make_test_inception_weights

    steps = page_steps()
    dl, runs = tmp_path / "downloads", tmp_path / "runs"
    _coco_download(dl, coco_sample)
    _ade_and_cityscapes_downloads(dl)
    # A released-style generator for the tiny model: COCO-Stuff has 182 classes + don't care + instance edges.
    released = dl / "checkpoints" / "coco_pretrained" / "latest_net_G.pth"
    released.parent.mkdir(parents=True)
    torch.save(random_official_state_dict(official_shapes(184, 8, "normal", 32), seed=5), released)
    photos = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((32, 32)))).permute(2, 0, 1)
                          for p in sorted((coco_sample / "train_img").glob("*.jpg"))[:6]])
    weights = make_test_inception_weights(tmp_path / "inception.pth", photos, seed=0)
    env = {**cluster.env, "PATH": f"{REPO_ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT),  # this checkout's code, also where the venv's install is another one's
           "DL": str(dl), "DATA": str(tmp_path / "datasets"), "SHARDS": str(tmp_path / "shards"), "RUNS": str(runs),
           "WORKERS": "2", "EXTRA": TINY, "SPADE_INCEPTION_WEIGHTS": str(weights),
           "SPADE_FID_CACHE": str(tmp_path / "fid-cache"),
           "SBATCH_ARGS": f"-N1 --gpus-per-node=0 --cpus-per-task=1 --output={tmp_path / 'train.out'}"}

    prepare = _run_step(steps, "prepare", env)
    assert "13 instance maps written" in prepare.stdout and "8 instance maps written" in prepare.stdout
    assert "OK ade20k val: 2 samples" in prepare.stdout and "OK cityscapes train: 1 samples" in prepare.stdout
    _run_step(steps, "shard", env)
    manifest = json.loads((tmp_path / "shards" / "coco-stuff" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 13 and manifest["splits"]["val"]["num_samples"] == 8

    train = _run_step(steps, "train", env)
    job = re.search(r"Submitted batch job (\d+)", train.stdout).group(1)
    state = cluster.wait(job, timeout=900)
    assert state == "COMPLETED", (tmp_path / "train.out").read_text()[-4000:]
    assert json.loads((runs / "coco-stuff" / "DONE").read_text())["step"] == 2

    _run_step(steps, "evaluate", env)
    result = json.loads((runs / "coco-stuff" / "fid-pytorch-fid.json").read_text())
    protocol = result["protocol"]
    assert protocol["inception"]["fid_protocol"] == "pytorch-fid" and protocol["images"]["num_images"] == 8
    assert math.isfinite(result["fid"])
    assert list((tmp_path / "fid-cache").glob("inception-coco-stuff-val-*-pytorch-fid.pt"))

    finetune = _run_step(steps, "finetune", env)
    assert f"generator initialised from {released} (official format" in finetune.stdout
    record = json.loads((runs / "coco-stuff-finetune" / "init_generator.json").read_text())
    assert record["format"] == "official" and record["path"] == str(released)
