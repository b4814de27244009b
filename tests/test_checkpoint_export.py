"""Generator access to checkpoints: load_generator_from_checkpoint and spade-export."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from spade_dist.checkpoint import CheckpointManager, load_generator_from_checkpoint
from spade_dist.cli.export import main as export_main
from spade_dist.config import CheckpointConfig
from spade_dist.models.compat import load_generator_file
from spade_dist.train.state import build_train_state
from tests.kit import tiny_config

GEN_PATHS = {"ema": ["train", "ema", "model"], "raw": ["train", "generator"]}


def _checkpointed_run(tmp_path):
    cfg = tiny_config("data.label_nc=4", "model.norm_G=spectralspadebatch3x3", "model.num_D=1")
    torch.manual_seed(0)
    state = build_train_state(cfg, torch.device("cpu"), fused_adam=False)
    with torch.no_grad():  # make EMA and raw weights differ, as after training
        for p in state.generator.parameters():
            p.add_(0.5)
    mgr = CheckpointManager(tmp_path, CheckpointConfig(), config_yaml=cfg.to_yaml(), generator_paths=GEN_PATHS,
                            install_signal_handlers=False)
    state.step = 7
    mgr.save(7, {"train": state}, blocking=True)
    mgr.close()
    return cfg, state


def test_load_generator_reads_ema_or_raw_without_process_group(tmp_path):
    cfg, state = _checkpointed_run(tmp_path)
    step_dir = tmp_path / "checkpoints" / "step-000000007"
    for use_ema, ref in [(True, state.ema_generator), (False, state.generator)]:
        G, got_cfg = load_generator_from_checkpoint(step_dir, use_ema=use_ema)
        assert not G.training and got_cfg.model.ngf == 8 and got_cfg.data.label_nc == 4
        want = ref.state_dict()
        for k, v in G.state_dict().items():
            assert torch.equal(v, want[k]), k
    G_latest, _ = load_generator_from_checkpoint(tmp_path)  # a run dir: the newest committed step
    assert torch.equal(next(G_latest.parameters()), next(state.ema_generator.parameters()))


def test_load_generator_errors_name_the_path(tmp_path):
    _checkpointed_run(tmp_path)
    step_dir = tmp_path / "checkpoints" / "step-000000007"
    (step_dir / "COMMITTED").unlink()
    with pytest.raises(Exception, match="step-000000007"):
        load_generator_from_checkpoint(step_dir)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_generator_from_checkpoint(tmp_path / "nowhere")


def test_spade_export_single_file_and_official(tmp_path):
    cfg, state = _checkpointed_run(tmp_path / "run")
    out, official = tmp_path / "G.pt", tmp_path / "latest_net_G.pth"
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(out), "--official", str(official)]) == 0
    payload = torch.load(out, weights_only=True)
    assert payload["config"]["model"]["ngf"] == 8
    G, _ = load_generator_file(out)
    for k, v in G.state_dict().items():
        assert torch.equal(v, state.ema_generator.state_dict()[k]), k
    official_sd = torch.load(official, weights_only=True)
    assert official_sd.keys() == state.ema_generator.state_dict().keys()
    raw_out = tmp_path / "G_raw.pt"
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(raw_out), "--raw"]) == 0
    G_raw, _ = load_generator_file(raw_out)
    assert torch.equal(next(G_raw.parameters()), next(state.generator.parameters()))


def test_spade_export_bad_checkpoint_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spade_dist.cli.export", "--checkpoint", str(tmp_path),
                           "--out", str(tmp_path / "G.pt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no checkpoint here" in proc.stderr and str(tmp_path) in proc.stderr


def test_spade_generate_accepts_a_run_directory(tmp_path):
    import numpy as np
    from PIL import Image

    from spade_dist.cli.generate import main as generate_main

    _checkpointed_run(tmp_path / "run")
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 4).astype(np.uint8)).save(labels / "a.png")
    out = tmp_path / "out"
    assert generate_main(["--labels", str(labels), "--run-dir", str(tmp_path / "run"), "--out", str(out),
                          "--device", "cpu"]) == 0
    assert (out / "images" / "a_0.png").is_file()
    assert generate_main(["--labels", str(labels), "--checkpoint", str(tmp_path / "labels"), "--out", str(out),
                          "--device", "cpu"]) == 2  # a directory without checkpoints


def test_spade_export_safetensors_is_read_by_every_generator_reader(tmp_path):
    """``--out G.safetensors``: the same weights and config as G.pt, in a file that holds no pickle."""
    from spade_dist.cli.convert import main as convert_main
    from spade_dist.models.compat import is_safetensors

    cfg, state = _checkpointed_run(tmp_path / "run")
    out = tmp_path / "G.safetensors"
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert is_safetensors(out)
    G, loaded_cfg = load_generator_file(out)
    assert loaded_cfg.model.ngf == cfg.model.ngf
    for k, v in G.state_dict().items():
        assert torch.equal(v, state.ema_generator.state_dict()[k]), k
    official = tmp_path / "latest_net_G.pth"
    assert convert_main(["to-official", "--checkpoint", str(out), "--out", str(official)]) == 0
    assert torch.load(official, weights_only=True).keys() == state.ema_generator.state_dict().keys()
