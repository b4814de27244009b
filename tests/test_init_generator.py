"""train.init_generator: fine-tuning from released (official-format) or exported weights.

G (and E) start from the file, D and the optimizers fresh; the run records where it started."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spade_dist.config import ConfigError
from spade_dist.label_layout import LabelLayout
from spade_dist.labels import encode_semantics
from spade_dist.models import build_encoder, build_generator
from spade_dist.models.compat import official_encoder_path, save_generator_file
from spade_dist.train.state import build_train_state
from tests.kit import blocky_labels, run_cli, synthetic_shards, tiny_config, train_cmd
from tests.official_reference import official_forward, official_shapes, random_official_state_dict

LABEL_NC, NGF, CROP = 10, 8, 32  # configs/tiny.yaml: 10 classes, no don't care, no instance maps
BATCH_NORM = "model.norm_G=spectralspadebatch3x3"  # every config in this file uses plain BN


def _cfg(*overrides: str):
    return tiny_config(BATCH_NORM, *overrides)


def _semantics(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    label = blocky_labels(2, LABEL_NC, CROP, CROP, g, block=8)
    return encode_semantics(label, None, LabelLayout(LABEL_NC, False, True))


@pytest.fixture()
def official_file(tmp_path: Path) -> tuple[Path, dict]:
    """A tiny released-style latest_net_G.pth (random weights, BN stats and u/v as a trained one has)."""
    sd = random_official_state_dict(official_shapes(LABEL_NC, NGF, "normal", CROP), seed=7)
    path = tmp_path / "released" / "latest_net_G.pth"
    path.parent.mkdir()
    torch.save(sd, path)
    return path, sd


def test_first_output_equals_the_official_file_and_d_optimizer_are_fresh(official_file) -> None:
    path, sd = official_file
    torch.manual_seed(0)
    state = build_train_state(_cfg(f"train.init_generator={path}"), torch.device("cpu"), fused_adam=False)
    assert state.init_from is not None and state.init_from.format == "official" and state.init_from.encoder == ""
    seg = _semantics()
    with torch.no_grad():
        first = state.generator.eval()(seg)
        ema_first = state.ema_generator.eval()(seg)
    expected = official_forward(sd, seg, NGF, "normal", CROP)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ema_first, expected, rtol=1e-5, atol=1e-5)  # the EMA copy starts there too
    # D and the optimizers as in a run from scratch with the same seed
    torch.manual_seed(0)
    scratch = build_train_state(_cfg(), torch.device("cpu"), fused_adam=False)
    for a, b in zip(state.discriminator.state_dict().values(), scratch.discriminator.state_dict().values()):
        assert torch.equal(a, b)
    assert not state.opt_G.state and not state.opt_D.state
    assert not torch.equal(state.generator.fc.weight, scratch.generator.fc.weight)


def test_project_generator_file_and_vae_encoder(tmp_path: Path, official_file) -> None:
    # spade-dist generator file (spade-export / spade-convert output)
    cfg = _cfg()
    torch.manual_seed(3)
    source = build_generator(cfg).eval()
    save_generator_file(source, cfg, tmp_path / "G.pt")
    state = build_train_state(_cfg(f"train.init_generator={tmp_path / 'G.pt'}"), torch.device("cpu"), fused_adam=False)
    assert state.init_from.format == "spade-dist"
    with torch.no_grad():
        torch.testing.assert_close(state.generator.eval()(_semantics()), source(_semantics()))
    # VAE: official latest_net_E.pth beside latest_net_G.pth is the encoder
    vae = _cfg("model.use_vae=true")
    sd = random_official_state_dict(official_shapes(LABEL_NC, NGF, "normal", CROP, use_vae=True, z_dim=vae.model.z_dim),
                                    seed=8)
    g_path = tmp_path / "vae" / "latest_net_G.pth"
    g_path.parent.mkdir()
    torch.save(sd, g_path)
    torch.manual_seed(4)
    encoder = build_encoder(vae)
    torch.save(encoder.state_dict(), official_encoder_path(g_path))
    state = build_train_state(_cfg("model.use_vae=true", f"train.init_generator={g_path}"), torch.device("cpu"),
                              fused_adam=False)
    assert state.init_from.encoder == str(tmp_path / "vae" / "latest_net_E.pth")
    for name, value in encoder.state_dict().items():
        assert torch.equal(state.encoder.state_dict()[name], value), name


def test_bad_files_are_config_errors_naming_the_key(tmp_path: Path, official_file) -> None:
    path, _sd = official_file
    with pytest.raises(ConfigError, match=r"train.init_generator: generator file not found: .*missing.pth"):
        build_train_state(_cfg(f"train.init_generator={tmp_path / 'missing.pth'}"), torch.device("cpu"), False)
    with pytest.raises(ConfigError, match=r"(?s)train.init_generator: .*latest_net_G.pth: checkpoint does not match.*ngf=8, the options say ngf=16"):
        build_train_state(_cfg(f"train.init_generator={path}", "model.ngf=16"), torch.device("cpu"), False)
    with pytest.raises(ConfigError, match=r"sha256 [0-9a-f]{64} differs from the expected 0{64}"):
        build_train_state(_cfg(f"train.init_generator={path}", f"train.init_generator_sha256={'0' * 64}"),
                          torch.device("cpu"), False)
    with pytest.raises(ConfigError, match="init_generator_sha256 must be 64 hex digits"):
        _cfg(f"train.init_generator={path}", "train.init_generator_sha256=abc")
    (tmp_path / "pickle.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"cannot read as a PyTorch \(weights_only=True\) or safetensors weights file"):
        build_train_state(_cfg(f"train.init_generator={tmp_path / 'pickle.pth'}"), torch.device("cpu"), False)


def test_spade_train_fine_tunes_from_official_file_and_records_it(tmp_path: Path, official_file) -> None:
    """The real loop: with lr 0 the trained G keeps the file's weights (so it started there); the run
    dir, log and checkpoint config say where it started."""
    from spade_dist.checkpoint.generator import read_generator_state
    from spade_dist.files import sha256_file

    path, sd = official_file
    manifest = synthetic_shards(tmp_path / "data", count=8, val_count=2)
    run_dir = tmp_path / "run"
    proc = run_cli(train_cmd("--resume", "none", BATCH_NORM, f"data.shards={manifest}", f"data.val_shards={manifest}",
                             f"train.run_dir={run_dir}", "train.max_steps=2", "optim.lr=0",
                             "checkpoint.async_save=false", f"train.init_generator={path}"), timeout=600)
    digest = sha256_file(path)
    assert f"generator initialised from {path} (official format, sha256 {digest})" in proc.stdout
    record = json.loads((run_dir / "init_generator.json").read_text())
    assert record == {"path": str(path), "format": "official", "sha256": digest, "encoder": ""}
    state, cfg, _ = read_generator_state(run_dir, use_ema=False)
    assert cfg.train.init_generator == str(path)  # the checkpoint's own config
    for key, value in sd.items():
        if key.endswith(".weight_orig") or key.endswith(".bias") and "param_free_norm" not in key:
            assert torch.equal(state[key], value), key
