"""What a user (or a faulty cluster) can put in front of a run: bad config values, missing /
truncated / mislabelled shards, crafted sample keys, corrupted checkpoints, pickles, file modes.
Each ends in one line naming the key / file / value (exit 2), a named skip, or is refused."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from spade_dist.checkpoint.layout import InvalidCheckpoint
from spade_dist.config import ConfigError
from spade_dist.data import ShardSourceError, build_train_loader, resolve_shards
from spade_dist.files import UnsafeNameError, check_path_component
from tests.kit import (
    PYTHON,
    REPO_ROOT,
    cli_env,
    make_sample,
    synthetic_shards,
    tiny_config,
    train_cmd,
    write_shards,
    write_tar,
)

TRAIN = train_cmd("--resume", "none")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("synth"), count=16, val_count=2)


def _train_fails(args: list[str], *needles: str) -> str:
    proc = subprocess.run(TRAIN + args, capture_output=True, text=True, env=cli_env(), cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("spade-train: error:"), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


# ----------------------------------------------------------------------------------------------
# config ranges (issue case 5)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.log_every=0", "train.log_every"),
    ("train.sample_every=0", "train.sample_every"),
    ("checkpoint.signals=[SIGFOO]", "checkpoint.signals"),
    ("optim.lr=-1", "optim.lr"),
    ("checkpoint.every_steps=-5", "checkpoint.every_steps"),
    ("train.max_steps=-1", "train.max_steps"),
    ("checkpoint.requeue_exit_code=0", "checkpoint.requeue_exit_code"),
    ("checkpoint.signals=[SIGKILL]", "checkpoint.signals"),
])
def test_out_of_range_values_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(override)


def test_out_of_range_value_on_the_command_line_is_one_line_exit_2(tmp_path):
    _train_fails(["train.log_every=0", f"train.run_dir={tmp_path / 'r'}"], "train.log_every must be >= 1, got 0")


def test_busy_metrics_port_is_one_line_exit_2(tmp_path, manifest):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _train_fails([f"data.shards={manifest}", f"train.run_dir={tmp_path / 'r'}", "metrics.enabled=true",
                      f"metrics.port_base={port}", "train.max_steps=1"],
                     f"port {port}", "already in use", "metrics.port_base")


# ----------------------------------------------------------------------------------------------
# shards at startup and at training time (issue case 5)
# ----------------------------------------------------------------------------------------------

def _copy_shards(manifest: Path, dest: Path) -> Path:
    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


def _train_shards(manifest: Path) -> list[Path]:
    entries = json.loads(manifest.read_text())["splits"]["train"]["shards"]
    return [manifest.parent / e["file"] for e in entries]


def test_deleted_truncated_and_mislabelled_shards_fail_at_startup(tmp_path, manifest):
    deleted = _copy_shards(manifest, tmp_path / "deleted")
    _train_shards(deleted)[1].unlink()
    _train_fails([f"data.shards={deleted}", f"train.run_dir={tmp_path / 'r1'}"],
                 str(_train_shards(deleted)[1]), "does not exist")

    truncated = _copy_shards(manifest, tmp_path / "truncated")
    shard = _train_shards(truncated)[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ShardSourceError, match="truncated or replaced"):
        build_train_loader(tiny_config(f"data.shards={truncated}").data)

    _train_fails([f"data.shards={manifest}", f"train.run_dir={tmp_path / 'r2'}", "data.label_nc=5"],
                 "data.label_nc=5", "label_nc=10", str(manifest))


def test_shard_truncated_during_training_is_a_counted_skip_with_exact_accounting(tmp_path, manifest, caplog):
    """A shard that breaks after the startup check (a filesystem fault) used to end the run with a raw
    tarfile.ReadError; now the rest of it is skipped, named and counted, and the position still covers
    every planned sample exactly once."""
    copy = _copy_shards(manifest, tmp_path / "shards")
    cfg = tiny_config(f"data.shards={copy}", "data.max_corrupt_fraction=1.0").data
    loader = build_train_loader(cfg)
    shard = _train_shards(copy)[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    with caplog.at_level("WARNING", logger="spade_dist.data"):
        keys = {k for batch in loader for k in batch["key"]}
    assert 0 < loader.corrupt_samples < 16
    assert len(keys) + loader.corrupt_samples == 16 == loader.samples_read  # each sample once: trained or skipped
    assert f"shard {shard} unreadable" in caplog.text
    from spade_dist.data.plan import unpack_delivered

    assert unpack_delivered(loader.state_dict()).all()  # the position counts every sample: a resume retries none


# ----------------------------------------------------------------------------------------------
# untrusted keys, checkpoints and pickles (issue case 4)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["../../evil", "a/b", "..", "", "x\\y", "a..b"])
def test_unsafe_keys_are_rejected(key):
    with pytest.raises(UnsafeNameError, match="unsafe sample key"):
        check_path_component(key, "test")


def test_safe_keys_pass():
    assert check_path_component("val_00002", "test") == "val_00002"


def _evil_shards(root: Path) -> Path:
    """A val split whose second sample's key is ``../../evil`` (tar members and manifest alike)."""
    manifest = write_shards(root, [2], extra_splits={"val": [2]}, size=(40, 36), label_nc=8)
    data = json.loads(manifest.read_text())
    entry = data["splits"]["val"]["shards"][0]
    good = entry["keys"][0]
    keys = [good, "../../evil"]
    write_tar(root / entry["file"], [(k, make_sample(k, 40, 36, seed=i)) for i, k in enumerate(keys)])
    entry["keys"] = keys
    entry.pop("bytes", None)
    entry.pop("sha256", None)
    manifest.write_text(json.dumps(data))
    return manifest


def test_crafted_key_never_becomes_an_output_path(tmp_path, capsys):
    from spade_dist.cli.generate import main as generate_main
    from spade_dist.models import build_generator
    from spade_dist.models.compat import save_official_generator

    manifest = _evil_shards(tmp_path / "shards")
    with pytest.raises(ShardSourceError, match=r"unsafe sample key '\.\./\.\./evil'"):
        resolve_shards(str(manifest), "val")
    options = ["data.label_nc=8", "data.contain_dontcare_label=true", "data.no_instance=false"]
    cfg = tiny_config(*options)
    save_official_generator(build_generator(cfg), tmp_path / "G.pth")
    out = tmp_path / "a" / "b" / "out"
    rc = generate_main(["--shards", str(manifest), "--checkpoint", str(tmp_path / "G.pth"), "--preset", "tiny",
                        "--out", str(out), *options])
    err = capsys.readouterr().err
    assert rc == 2 and "unsafe sample key" in err, err
    assert not list(tmp_path.rglob("evil*"))


def test_generate_checks_keys_before_building_paths(tmp_path, monkeypatch, capsys):
    """Even a key that got past the loader (another input path) is refused before any file is written."""
    import spade_dist.generation as generation
    from spade_dist.cli.generate import main as generate_main
    from spade_dist.models import build_generator
    from spade_dist.models.compat import save_official_generator

    options = ["data.label_nc=8", "data.contain_dontcare_label=false"]
    cfg = tiny_config(*options)
    save_official_generator(build_generator(cfg), tmp_path / "G.pth")
    label = torch.zeros(1, 1, 32, 32, dtype=torch.long)

    def crafted(args, cfg):
        yield generation.GenerationInput("../evil", label, None, None, "crafted sample '../evil'")

    monkeypatch.setattr(generation, "shard_inputs", crafted)
    out = tmp_path / "out"
    rc = generate_main(["--shards", "unused", "--checkpoint", str(tmp_path / "G.pth"), "--preset", "tiny",
                        "--out", str(out), *options])
    assert rc == 2 and "unsafe sample key '../evil'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("evil*"))


def test_export_refuses_a_same_size_corrupted_checkpoint(tmp_path):
    from tests.test_checkpoint_export import _checkpointed_run

    _checkpointed_run(tmp_path / "run")
    step_dir = tmp_path / "run" / "checkpoints" / "step-000000007"
    data = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # same size, one bit: only the sha256 notices
    data.write_bytes(bytes(raw))
    proc = subprocess.run([PYTHON, "-m", "spade_dist.cli.export", "--checkpoint", str(step_dir), "--out",
                           str(tmp_path / "G.pt")], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode != 0 and "sha256" in proc.stderr and data.name in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "G.pt").exists()
    from spade_dist.checkpoint import load_generator_from_checkpoint

    with pytest.raises(InvalidCheckpoint, match="sha256"):
        load_generator_from_checkpoint(tmp_path / "run")  # the run directory path checks the same


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_fid_reference_cache_is_not_unpickled(tmp_path, monkeypatch):
    from spade_dist.eval.fid import feature_statistics
    from spade_dist.eval.reference_stats import (
        ReferenceStats,
        ReferenceStatsError,
        load_real_segmentation,
        load_reference,
        save_reference,
    )

    feats = torch.randn(6, 4)
    ref = ReferenceStats(features=feats, stats=feature_statistics(feats), meta={"dataset": "x", "num_images": 6},
                         keys=[str(i) for i in range(6)])
    save_reference(tmp_path / "ref.pt", ref)
    back = load_reference(tmp_path / "ref.pt")
    assert torch.equal(back.features, feats) and back.meta == ref.meta and back.keys == ref.keys
    assert np.allclose(back.stats.sigma, ref.stats.sigma) and back.stats.num_samples == 6
    monkeypatch.chdir(tmp_path)
    torch.save({"features": feats, "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ReferenceStatsError, match="unreadable reference statistics"):
        load_reference(tmp_path / "evil.pt")
    with pytest.raises(ReferenceStatsError, match="unreadable real-image segmentation"):
        load_real_segmentation(tmp_path / "evil.pt")  # the segmentation cache, the same way
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------------
# files for other services are world-readable (issue case 6)
# ----------------------------------------------------------------------------------------------

def test_discovery_file_gallery_and_report_are_0644(tmp_path):
    from spade_dist.files import write_json_atomic
    from spade_dist.monitoring.report import write_report
    from spade_dist.run_dir import RunDir
    from spade_dist.visualize import GalleryRow, write_gallery

    old = os.umask(0o022)
    try:
        sd = tmp_path / "metrics" / "job.json"
        write_json_atomic(sd, [{"targets": ["x:1"]}])
        gallery = write_gallery(tmp_path / "samples" / "index.html", "t", [GalleryRow(caption="c")])
        run = RunDir(tmp_path)
        run.logs.mkdir()
        run.train_metrics_log.write_text(json.dumps({"step": 1, "epoch": 0, "losses": {"G": 1.0}}) + "\n")
        report = write_report(tmp_path)
    finally:
        os.umask(old)
    for path in (sd, Path(gallery), report):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
