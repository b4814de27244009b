"""The built wheel works outside the source tree: presets and monitoring files are package data, and
the declared dependency ranges accept the torch (and everything else) already installed."""
from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_wheel_installs_beside_existing_torch_and_finds_presets(tmp_path: Path) -> None:
    # Build from a copy of what the wheel is made of: the in-tree build/ and egg-info stay out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for name in ("spade_dist", "data_tools", "configs"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src],
         cwd=tmp_path)
    (wheel,) = wheels.glob("spade_dist-*.whl")

    # A fresh environment whose only other packages are this venv's (torch & co. reachable through a
    # .pth line, which does not run this venv's editable-install hook): nothing is downloaded.
    fresh = tmp_path / "fresh"
    _run([sys._base_executable, "-m", "venv", "--without-pip", fresh], cwd=tmp_path)
    python = fresh / "bin" / "python"
    fresh_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           cwd=tmp_path).stdout.strip())
    (fresh_site / "existing_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # Without --no-deps: pip must find every declared dependency, in range, among the installed ones.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", wheel], cwd=tmp_path)

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
