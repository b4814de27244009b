"""Config loading: presets, inheritance, overrides, and errors that name the key and the file."""
import subprocess
import sys

import pytest

from spade_dist.config import ConfigError, load_config


def test_presets_load_with_official_defaults(repo_root):
    coco = load_config(repo_root / "configs" / "coco_stuff.yaml")
    assert (coco.data.label_nc, coco.data.label_layout.semantic_nc, coco.data.crop_size, coco.data.load_size) == (182, 184, 256, 286)
    assert (coco.model.ngf, coco.model.ndf, coco.model.z_dim, coco.model.norm_G) == (64, 64, 256, "spectralspadesyncbatch3x3")
    assert (coco.optim.lr, coco.optim.beta1, coco.optim.beta2) == (0.0002, 0.0, 0.9)
    assert (coco.loss.lambda_feat, coco.loss.lambda_vgg, coco.loss.lambda_kld) == (10.0, 10.0, 0.05)
    assert load_config(repo_root / "configs" / "ade20k.yaml").data.label_layout.semantic_nc == 151
    city = load_config(repo_root / "configs" / "cityscapes.yaml")
    assert (city.data.label_layout.semantic_nc, city.model.num_upsampling_layers, city.data.aspect_ratio) == (36, "more", 2.0)


def test_overrides_keep_strings_as_written(repo_root):
    cfg = load_config(repo_root / "configs" / "coco_stuff.yaml",
                      ["train.mixed_precision=no", "metrics.job_id=1234", "model.ngf=32", "data.no_flip=true",
                       "metrics.run_name='007'"])
    assert cfg.train.mixed_precision == "no" and cfg.metrics.job_id == "1234" and cfg.metrics.run_name == "007"
    assert cfg.model.ngf == 32 and cfg.data.no_flip is True


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ngff: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.ngff"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"<override>.*train\.nope"):
        load_config(None, ["train.nope=1"])


def test_bad_value_names_key_and_file(tmp_path, repo_root):
    child = tmp_path / "child.yaml"
    child.write_text(f"inherit: {repo_root / 'configs' / 'coco_stuff.yaml'}\nmodel:\n  ngf: many\n")
    with pytest.raises(ConfigError, match=r"child\.yaml.*model\.ngf.*integer"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"model\.num_upsampling_layers.*'lots'"):
        load_config(None, ["model.num_upsampling_layers=lots"])
    with pytest.raises(ConfigError, match=r"norm_G.*spadefoo3x3"):
        load_config(None, ["model.norm_G=spadefoo3x3"])


def test_elastic_batch_and_collective_timeout_are_validated():
    with pytest.raises(ConfigError, match=r"train\.elastic_batch=grad_accum needs train\.global_batch_size > 0"):
        load_config(None, ["train.elastic_batch=grad_accum"])
    with pytest.raises(ConfigError, match=r"train\.grad_accum=2: with train\.elastic_batch=grad_accum"):
        load_config(None, ["train.elastic_batch=grad_accum", "train.global_batch_size=8", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match=r"train\.elastic_batch.*'both'"):
        load_config(None, ["train.elastic_batch=both"])
    with pytest.raises(ConfigError, match=r"train\.collective_timeout_s must be > 0"):
        load_config(None, ["train.collective_timeout_s=0"])
    cfg = load_config(None, ["train.elastic_batch=grad_accum", "train.global_batch_size=8", "train.collective_timeout_s=5"])
    assert (cfg.train.elastic_batch, cfg.train.collective_timeout_s) == ("grad_accum", 5.0)


def test_config_parsing_imports_no_torch_and_no_model(repo_root):
    """Loading and validating a YAML (``spade-config`` at every Slurm start) stays light: no torch, no models.

    A fresh interpreter, because the test session itself has imported torch long ago.
    """
    probe = (
        "import sys\n"
        "from spade_dist.config import load_config\n"
        f"load_config({str(repo_root / 'configs' / 'coco_stuff.yaml')!r}, ['model.norm_D=spectralinstance'])\n"
        "import data_tools.manifest\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'spade_dist.models')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_distributed_does_not_import_models():
    out = subprocess.run([sys.executable, "-c", "import sys, spade_dist.distributed; "
                          "print(sorted(m for m in sys.modules if m.startswith('spade_dist.models')))"],
                         capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_moved_speed_keys_still_read_with_a_one_line_warning_naming_the_new_key(tmp_path, caplog):
    from spade_dist.config import MOVED_KEYS, Config, config_from_dict

    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text("model:\n  onehot_gather: off\n  fused_modulation: true\ntrain:\n  compile_mode: max-autotune\n")
    with caplog.at_level("WARNING", logger="spade_dist.config"):
        cfg = load_config(old_yaml, ["train.g_step_real_pass=joint"])
    assert (cfg.speed.onehot_gather, cfg.speed.compile_mode, cfg.speed.g_step_real_pass) == ("off", "max-autotune", "joint")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4 and all("\n" not in w for w in warned)
    assert any("old.yaml: model.onehot_gather is deprecated" in w and "use speed.onehot_gather" in w for w in warned)
    assert any("train.g_step_real_pass is deprecated" in w and "use speed.g_step_real_pass" in w for w in warned)
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  channels_last: true\nspeed:\n  channels_last: false\n")
    with pytest.raises(ConfigError, match=r"both\.yaml: model\.channels_last \(deprecated\) and speed\.channels_last"):
        load_config(both)
    # Resolved configs stored by earlier versions (checkpoints, generator files) load silently.
    stored = Config().to_dict()
    del stored["speed"]
    stored["model"]["discriminator_labels"], stored["train"]["compile"] = "dense", True
    caplog.clear()
    old = config_from_dict(stored)
    assert (old.speed.discriminator_labels, old.speed.compile) == ("dense", True) and not caplog.records
    assert {section for section, _ in MOVED_KEYS.values()} == {"speed"}


def test_vocabularies_are_written_once():
    """The names a config Literal lists are the ones the code implements (each list written once)."""
    from typing import get_args, get_type_hints

    from spade_dist.config import GAN_MODES, LossConfig, TrainConfig
    from spade_dist.losses import GANLoss
    from spade_dist.train.backends import BACKENDS

    assert set(BACKENDS) == set(get_args(get_type_hints(TrainConfig)["backend"]))
    assert GAN_MODES == get_args(get_type_hints(LossConfig)["gan_mode"])
    for mode in GAN_MODES:
        GANLoss(mode)


def test_a_preset_by_name_and_inherit_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: names resolve to the shipped presets
    assert load_config("tiny").model.ngf == load_config("tiny.yaml").model.ngf == 8
    for parent in ("coco_stuff.yaml", "coco_stuff"):
        (tmp_path / "mine.yaml").write_text(f"inherit: {parent}\nmodel:\n  ngf: 16\n")
        cfg = load_config(tmp_path / "mine.yaml")
        assert (cfg.data.label_nc, cfg.model.ngf) == (182, 16)
    # A file beside the config wins over a preset of the same name.
    (tmp_path / "tiny.yaml").write_text("inherit: custom\ndata:\n  label_nc: 3\n")
    assert load_config("tiny.yaml").data.label_nc == 3
    (tmp_path / "child.yaml").write_text("inherit: tiny.yaml\n")
    assert load_config(tmp_path / "child.yaml").data.label_nc == 3
    with pytest.raises(ConfigError, match=r"config file not found: .*no_such.*not a shipped preset \(ade20k"):
        load_config("no_such")
    (tmp_path / "orphan.yaml").write_text("inherit: ../elsewhere/x.yaml\n")
    with pytest.raises(ConfigError, match="inherit: in"):
        load_config(tmp_path / "orphan.yaml")  # a path that does not exist never becomes a preset
