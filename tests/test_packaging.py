"""The built wheel works outside the source tree: presets and monitoring files are package data (presets
by name in ``--config`` and ``inherit:``), the declared dependency ranges accept the torch (and
everything else) already installed, the build prints no setuptools warning, and the license ships."""
from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@dataclass(frozen=True)
class WheelEnv:
    wheel: Path
    build_output: str  # what `pip wheel` printed
    venv: Path  # a fresh venv with the wheel installed
    site: Path  # its site-packages


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> WheelEnv:
    """The wheel, built from a copy of what it is made of (the in-tree build/ and egg-info stay out of
    the checkout), installed into a fresh venv whose only other packages are this venv's (torch & co.
    reachable through a .pth line, which does not run this venv's editable-install hook): nothing is
    downloaded."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for name in ("spade_dist", "data_tools", "configs"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                        symlinks=True)
    (src / "spade_dist" / "configs").unlink(missing_ok=True)  # a checkout's convenience link, not part of the source
    wheels = tmp_path / "wheels"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels,
                  src], cwd=tmp_path)
    (wheel,) = wheels.glob("spade_dist-*.whl")
    fresh = tmp_path / "fresh"
    _run([sys._base_executable, "-m", "venv", "--without-pip", fresh], cwd=tmp_path)
    python = fresh / "bin" / "python"
    fresh_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           cwd=tmp_path).stdout.strip())
    (fresh_site / "existing_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # Without --no-deps: pip must find every declared dependency, in range, among the installed ones.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", wheel], cwd=tmp_path)
    return WheelEnv(wheel, build.stdout + build.stderr, fresh, fresh_site)


@pytest.mark.slow
def test_wheel_builds_quietly_with_its_license(wheel_env: WheelEnv) -> None:
    # setuptools' BuildBackendWarning "Package would be ignored" (data folders missing from `packages`), etc.
    assert "Warning" not in wheel_env.build_output, wheel_env.build_output
    with zipfile.ZipFile(wheel_env.wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert "License-Expression: Apache-2.0" in metadata
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in zf.namelist())


@pytest.mark.slow
def test_wheel_installs_beside_existing_torch_and_finds_presets(wheel_env: WheelEnv, tmp_path: Path) -> None:
    fresh, fresh_site = wheel_env.venv, wheel_env.site
    python = fresh / "bin" / "python"
    where = _run([python, "-c", "import spade_dist, spade_dist.configs as c; print(spade_dist.__file__, c.__file__)"],
                 cwd=tmp_path).stdout
    assert str(REPO_ROOT) not in where and str(fresh_site) in where, where
    help_text = _run([fresh / "bin" / "spade-generate", "--preset", "coco_stuff", "--help"], cwd=tmp_path).stdout
    assert "coco_stuff" in help_text
    for preset, label_nc in {"coco_stuff": 182, "ade20k": 150, "cityscapes": 35}.items():
        out = _run([fresh / "bin" / "spade-config", "--preset", preset, "--get", "data.label_nc"], cwd=tmp_path).stdout
        assert out.split() == [str(label_nc)], (preset, out)
    names = _run([python, "-c", "from spade_dist.resources import preset_names, monitoring_dir; "
                  "print(*preset_names()); print(*sorted(p.name for p in monitoring_dir().iterdir()))"],
                 cwd=tmp_path).stdout.splitlines()
    # Every preset of the source tree is in the wheel.
    assert names[0].split() == sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml") if p.stem != "base")
    assert {"prometheus.yml", "alerts.yml", "grafana"} <= set(names[1].split())
    # spade-serve's page ships with the package.
    page = _run([python, "-c", "import importlib.resources as r; "
                 "print(r.files('spade_dist.serve').joinpath('static/index.html').is_file())"], cwd=tmp_path).stdout
    assert page.strip() == "True"


@pytest.mark.slow
def test_wheel_trains_with_a_preset_by_name_from_any_directory(wheel_env: WheelEnv, tmp_path: Path) -> None:
    """From a wheel, in a directory without configs/: ``--config tiny`` and ``inherit: tiny`` are the
    shipped preset."""
    fresh = wheel_env.venv
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = fresh / "bin"
    _run([bin_dir / "spade-data", "synth", "--out", "data", "--count", "4", "--val-count", "2", "--size", "32"], cwd=work)
    for split in ("train", "val"):
        _run([bin_dir / "spade-data", "shard", "--layout", "custom", "--root", "data", "--out", "shards",
              "--split", split, "--no-progress", "--workers", "1"], cwd=work)
    (work / "mine.yaml").write_text("inherit: tiny\ntrain:\n  max_steps: 1\n")
    out = _run([bin_dir / "spade-config", "--config", "mine.yaml", "--get", "train.max_steps", "model.ngf"], cwd=work)
    assert out.stdout.split() == ["1", "8"]
    train = _run([bin_dir / "spade-train", "--config", "tiny", "train.max_steps=1", "train.run_dir=run",
                  "data.shards=shards/manifest.json", "checkpoint.every_steps=1"], cwd=work)
    assert "done at step 1" in train.stdout, train.stdout + train.stderr
    assert (work / "run" / "DONE").is_file()
