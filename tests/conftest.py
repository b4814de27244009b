"""Shared fixtures. Torch runs on one thread (CI has 2 cores); tiny configs, shards and runs come from
tests/kit.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
COCO_SAMPLE = SHARED_DIR / "datasets" / "coco_stuff_sample"
REFERENCE_DIR = SHARED_DIR / "reference"

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    if not COCO_SAMPLE.is_dir():
        raise FileNotFoundError(f"COCO-Stuff sample not found at {COCO_SAMPLE} (../shared beside the checkout)")
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR
