"""Visualisation helpers and spade-generate end to end on the COCO-Stuff sample (tiny generators)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade_dist.cli.generate import main
from spade_dist.models import build_generator
from spade_dist.models.compat import save_generator_file, save_official_generator
from spade_dist.visualize import (
    GalleryRow,
    colorize_labels,
    label_palette,
    make_grid,
    save_grid,
    to_uint8_image,
    write_gallery,
)
from tests.kit import SHRINK, tiny_config, write_shards

# ------------------------------------------------------------------------------------------------
# visualize
# ------------------------------------------------------------------------------------------------


def test_label_palette_official_colours() -> None:
    palette = label_palette(150)
    # bit interleaving of id + 1: 1 -> R msb, 2 -> G msb, 3 -> R+G, 4 -> B msb, 9 -> R msb + R next bit
    assert palette[:4].tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[8].tolist() == [192, 0, 0]
    assert label_palette(35)[7].tolist() == [128, 64, 128]  # Cityscapes road
    coco = label_palette(182)
    assert coco[156].tolist() == [95, 219, 255] and coco[123].tolist() == [29, 195, 49]  # sky-other, grass
    assert coco[0].tolist() == palette[0].tolist()


def test_dataset_palettes_paint_sky_blue_and_grass_green() -> None:
    """The canvas used to paint the quickstart's sky dark red and its grass grey (issue #28)."""
    from data_tools.synth import CLASS_NAMES, GRASS, SKY, WATER
    from spade_dist.palettes import SYNTHETIC_COLORS

    assert tuple(SYNTHETIC_COLORS) == CLASS_NAMES
    synthetic = label_palette(len(CLASS_NAMES), "synthetic")
    sky, grass, water = (synthetic[i].tolist() for i in (SKY, GRASS, WATER))
    assert sky[2] > 200 and sky[2] > sky[0] and grass[1] > 150 and grass[1] > grass[0] + 100 and water[2] > water[0] + 80
    assert len({tuple(c) for c in synthetic.tolist()}) == len(CLASS_NAMES)  # uploads map colours back to ids
    ade = label_palette(150, "ade20k")
    assert ade[0].tolist() == [120, 120, 120] and ade[2].tolist() == [6, 230, 230] and ade[9].tolist() == [4, 250, 7]
    assert len({tuple(c) for c in ade.tolist()}) == 149  # the published table repeats one grey (road, skyscraper)
    assert label_palette(150).tolist() == label_palette(150, "custom").tolist() != ade.tolist()
    assert label_palette(12, "synthetic")[0].tolist() == [128, 0, 0]  # another label count: the generic palette


def test_colorize_labels_maps_ids_and_dontcare_to_black() -> None:
    label = torch.tensor([[[[0, 1], [2, 255]]]])
    colors = colorize_labels(label, 150)
    assert colors.dtype == torch.uint8 and colors.shape == (1, 3, 2, 2)
    assert colors[0, :, 0, 0].tolist() == [128, 0, 0]
    assert colors[0, :, 1, 0].tolist() == [128, 128, 0]
    assert colors[0, :, 1, 1].tolist() == [0, 0, 0]


def test_to_uint8_image_matches_official_tensor2im() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6)
    # (x + 1) / 2 * 255, clipped, truncated: 0 -> 127 (127.5 truncated)
    assert to_uint8_image(x).flatten().tolist() == [0, 0, 127, 254, 255, 255]
    with pytest.raises(ValueError, match="float"):
        to_uint8_image(torch.zeros(3, 2, 2, dtype=torch.uint8))


def test_save_grid_tiles_mixed_sizes(tmp_path: Path) -> None:
    red = torch.zeros(3, 4, 6, dtype=torch.uint8)
    red[0] = 255
    gray = torch.full((1, 2, 2), 100, dtype=torch.uint8)
    grid = make_grid([[red, gray], [None, red]], pad=1)
    assert grid.shape == (3, 1 + 4 + 1 + 4 + 1, 1 + 6 + 1 + 6 + 1)
    assert grid[:, 1, 1].tolist() == [255, 0, 0]
    assert grid[:, 1, 8].tolist() == [100, 100, 100]
    assert grid[:, 6, 1].tolist() == [0, 0, 0]  # the empty cell
    path = save_grid([[red, gray], [None, red]], tmp_path / "g.png", pad=1)
    assert np.array(Image.open(path)).shape == (11, 15, 3)
    with pytest.raises(ValueError, match="uint8"):
        make_grid([[torch.zeros(3, 2, 2)]])


def test_write_gallery_escapes_text_and_uses_relative_paths(tmp_path: Path) -> None:
    image = tmp_path / "imgs" / "a b.png"
    image.parent.mkdir()
    image.write_bytes(b"")
    page = write_gallery(
        tmp_path / "index.html", "<script>alert(1)</script>",
        [GalleryRow(caption='key "&" <b>', images=[("gen <0>", image)])],
        columns=["x<y"], notes=["seed <7>"],
    )
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "key &quot;&amp;&quot; &lt;b&gt;" in text and "gen &lt;0&gt;" in text and "x&lt;y" in text
    assert 'src="imgs/a%20b.png"' in text
    assert str(tmp_path) not in text


# ------------------------------------------------------------------------------------------------
# spade-generate
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny COCO-Stuff generator (ngf 8, 32 px, 182 classes + don't care + instance) in official format."""
    torch.manual_seed(0)
    cfg = tiny_config(base="coco_stuff")
    path = tmp_path_factory.mktemp("ckpt") / "latest_net_G.pth"
    save_official_generator(build_generator(cfg), path)
    return path


def _args(sample: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--labels", str(sample / "val_label"), "--instances", str(sample / "val_inst"),
            "--checkpoint", str(checkpoint), "--out", str(out), *extra]


def test_generate_coco_sample_with_official_checkpoint(coco_sample: Path, official_checkpoint: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc = main(_args(coco_sample, official_checkpoint, out, "--images", str(coco_sample / "val_img"),
                    "--preset", "coco_stuff", "--device", "cpu", *SHRINK))
    assert rc == 0, capsys.readouterr().err
    keys = sorted(p.stem for p in (coco_sample / "val_label").glob("*.png"))
    assert len(keys) == 8
    for key in keys:
        generated = np.array(Image.open(out / "images" / f"{key}_0.png"))
        assert generated.shape == (32, 32, 3) and generated.dtype == np.uint8
        assert generated.std() > 0, "a generator output should not be a flat image"
        assert np.array(Image.open(out / "labels" / f"{key}.png")).shape == (32, 32, 3)
        assert np.array(Image.open(out / "real" / f"{key}.png")).shape == (32, 32, 3)
    html = (out / "index.html").read_text()
    for key in keys:
        for src in (f"labels/{key}.png", f"images/{key}_0.png", f"real/{key}.png"):
            assert f'src="{src}"' in html
    # 32-px results shown 8x enlarged with crisp pixels, not as thumbnails.
    assert f'src="images/{keys[0]}_0.png" width="256"' in html and "image-rendering:pixelated" in html
    # the same checkpoint + seed gives the same images, whatever the batching (default 8 vs 3: 3 + 3 + 2)
    again = tmp_path / "again"
    assert main(_args(coco_sample, official_checkpoint, again, "--preset", "coco_stuff", "--batch-size", "3",
                      "--no-progress", *SHRINK)) == 0
    for key in keys:
        assert np.array_equal(np.array(Image.open(again / "images" / f"{key}_0.png")),
                              np.array(Image.open(out / "images" / f"{key}_0.png"))), key
    _expect_error(_args(coco_sample, official_checkpoint, tmp_path / "o", "--preset", "coco_stuff",
                        "--batch-size", "0", *SHRINK), capsys, "--batch-size must be >= 1")


def _expect_error(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    # Warnings logged on the way (e.g. skipped corrupt samples) may come first; the error is one line.
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("spade-generate: error:"), err
    for needle in needles:
        assert needle in errors[0], (needle, err)
    return err


def test_bad_paths_give_clear_errors(coco_sample: Path, official_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no_such_dir"
    _expect_error(["--labels", str(missing), "--instances", str(coco_sample / "val_inst"), "--checkpoint",
                   str(official_checkpoint), "--out", str(tmp_path / "o"), "--preset", "coco_stuff", *SHRINK],
                  capsys, "--labels", str(missing))
    _expect_error(_args(coco_sample, tmp_path / "missing.pth", tmp_path / "o", "--preset", "coco_stuff", *SHRINK),
                  capsys, "checkpoint not found", "missing.pth")
    _expect_error(_args(coco_sample, official_checkpoint, tmp_path / "o", *SHRINK), capsys, "--preset")
    # the model needs instance edges
    _expect_error(["--labels", str(coco_sample / "val_label"), "--checkpoint", str(official_checkpoint),
                   "--out", str(tmp_path / "o"), "--preset", "coco_stuff", *SHRINK], capsys, "--instances")


def test_files_that_are_no_weights_say_what_they_are(coco_sample: Path, official_checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A config, a pickle with objects, a truncated file as --checkpoint: one line naming the file and what
    was expected; never torch's internals or its advice to load with weights_only=False."""
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  ngf: 8\n")
    with_objects = tmp_path / "objects.pt"
    torch.save({"state": io.StringIO}, with_objects)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(official_checkpoint.read_bytes()[:4096])
    for path, what in ((config, "is a text file (a config?), not PyTorch weights"),
                       (with_objects, "holds pickled Python objects (_io.StringIO), not only tensors"),
                       (truncated, "is truncated or corrupt (4096 bytes)")):
        err = _expect_error(_args(coco_sample, path, tmp_path / "o", "--preset", "coco_stuff", *SHRINK), capsys,
                            f"{path}: {what}", "expected an official latest_net_G.pth")
        assert "weights_only" not in err and "0x" not in err and len(err.strip().splitlines()) == 1, err


def test_unreadable_and_rgb_label_pngs(coco_sample: Path, official_checkpoint: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    labels, instances = tmp_path / "labels", tmp_path / "inst"
    labels.mkdir()
    instances.mkdir()
    Image.new("L", (8, 8)).save(instances / "bad.png")
    argv = ["--labels", str(labels), "--instances", str(instances), "--checkpoint", str(official_checkpoint),
            "--out", str(tmp_path / "o"), "--preset", "coco_stuff", *SHRINK]
    (labels / "bad.png").write_bytes(b"not a png at all")
    _expect_error(argv, capsys, "bad.png", "cannot read")
    Image.new("RGB", (8, 8)).save(labels / "bad.png")
    _expect_error(argv, capsys, "bad.png", "mode RGB")


def test_label_id_beyond_label_nc_names_file_and_ids(coco_sample: Path, official_checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    labels, instances = tmp_path / "labels", tmp_path / "inst"
    labels.mkdir()
    instances.mkdir()
    key = "000000000139"
    array = np.array(Image.open(coco_sample / "val_label" / f"{key}.png"))
    array[0, 0] = 190  # a single pixel: must be caught before the resize to 32 px could drop it
    array[5, 5] = 200
    Image.fromarray(array).save(labels / f"{key}.png")
    shutil.copy(coco_sample / "val_inst" / f"{key}.png", instances / f"{key}.png")
    _expect_error(["--labels", str(labels), "--instances", str(instances), "--checkpoint", str(official_checkpoint),
                   "--out", str(tmp_path / "o"), "--preset", "coco_stuff", *SHRINK],
                  capsys, f"{key}.png", "190, 200", "label_nc=182")


def test_checkpoint_mismatch_propagates_compat_message(coco_sample: Path, official_checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    _expect_error(_args(coco_sample, official_checkpoint, tmp_path / "o", "--preset", "coco_stuff", *SHRINK,
                        "model.ngf=16"), capsys, "does not match", "ngf")
    not_a_checkpoint = tmp_path / "junk.pth"
    not_a_checkpoint.write_bytes(b"junk")
    _expect_error(_args(coco_sample, not_a_checkpoint, tmp_path / "o", "--preset", "coco_stuff", *SHRINK),
                  capsys, "junk.pth", "not PyTorch weights", "expected an official latest_net_G.pth")


def test_project_file_vae_num_per_label_and_style_errors(coco_sample: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(1)
    cfg = tiny_config("model.use_vae=true", "model.z_dim=16", base="coco_stuff")
    project_file = tmp_path / "generator.pt"
    save_generator_file(build_generator(cfg), cfg, project_file)
    out = tmp_path / "vae"
    # no --preset: the project file carries its config
    assert main(_args(coco_sample, project_file, out, "--num-per-label", "2", "--limit", "2", "--seed", "3")) == 0
    first = np.array(Image.open(out / "images" / "000000000139_0.png"))
    second = np.array(Image.open(out / "images" / "000000000139_1.png"))
    assert not np.array_equal(first, second), "two random z per label should give two different images"
    assert len(list((out / "images").glob("*.png"))) == 4
    _expect_error(_args(coco_sample, project_file, tmp_path / "o", "--style-image",
                        str(coco_sample / "val_img" / "000000000139.jpg")), capsys, "encoder", "--encoder")


def test_num_per_label_needs_a_vae(coco_sample: Path, official_checkpoint: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    _expect_error(_args(coco_sample, official_checkpoint, tmp_path / "o", "--preset", "coco_stuff",
                        "--num-per-label", "2", *SHRINK), capsys, "deterministic")


def test_style_image_through_official_encoder(coco_sample: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from tests.model_fixtures import OFFICIAL_VAE_OPTIONS as options
    from tests.model_fixtures import write_official_vae

    write_official_vae(tmp_path, seed=2)
    cfg = tiny_config(*options)
    labels = tmp_path / "labels"
    labels.mkdir()
    scene = np.zeros((40, 40), dtype=np.uint8)
    scene[20:, :] = 1
    scene[5:15, 5:30] = 3
    Image.fromarray(scene).save(labels / "scene.png")
    style = coco_sample / "val_img" / "000000000785.jpg"
    other_style = coco_sample / "val_img" / "000000001268.jpg"
    base = ["--labels", str(labels), "--checkpoint", str(tmp_path / "G.pth"), "--preset", "tiny", *options]
    runs = []
    for name, photo in (("a", style), ("b", style), ("other", other_style)):
        rc = main(base + ["--style-image", str(photo), "--out", str(tmp_path / name),
                          "--encoder", str(tmp_path / "E.pth")])
        assert rc == 0, capsys.readouterr().err
        runs.append(np.array(Image.open(tmp_path / name / "images" / "scene_0.png")))
    assert runs[0].shape == (64, 256, 3)
    assert np.array_equal(runs[0], runs[1]), "same seed + style image -> same image"
    # same seed, another style photo: the style (not the noise) changes the image, clearly
    difference = np.abs(runs[0].astype(int) - runs[2].astype(int))
    assert difference.max() > 8 and (difference > 0).mean() > 0.01, "a different style image -> a different image"
    base += ["--style-image", str(style)]
    # a project generator file may carry the encoder itself (an "encoder" entry, official layout)
    save_generator_file(build_generator(cfg), cfg, tmp_path / "project.pt")
    payload = torch.load(tmp_path / "project.pt", weights_only=True)
    payload["encoder"] = torch.load(tmp_path / "E.pth", weights_only=True)
    torch.save(payload, tmp_path / "project.pt")
    rc = main(["--labels", str(labels), "--checkpoint", str(tmp_path / "project.pt"), "--style-image", str(style),
               "--num-per-label", "2", "--out", str(tmp_path / "p")])
    assert rc == 0, capsys.readouterr().err
    styled = [np.array(Image.open(tmp_path / "p" / "images" / f"scene_{k}.png")) for k in range(2)]
    assert styled[0].shape == (64, 256, 3) and not np.array_equal(styled[0], styled[1])
    # an encoder file that does not fit the options
    torch.save({"layer1.weight": torch.zeros(1)}, tmp_path / "bad_E.pth")
    _expect_error(base + ["--out", str(tmp_path / "c"), "--encoder", str(tmp_path / "bad_E.pth")],
                  capsys, "bad_E.pth", "encoder weights do not match")


def test_console_script_exit_code_and_message(official_checkpoint: Path, tmp_path: Path) -> None:
    """The installed `spade-generate` entry point: a user error is exit code 2, one message, no traceback."""
    script = Path(sys.executable).parent / "spade-generate"
    assert script.is_file(), f"console script missing: {script} (pip install -e . declares it)"
    missing = tmp_path / "no_labels_here"
    proc = subprocess.run(
        [str(script), "--labels", str(missing), "--checkpoint", str(official_checkpoint), "--out", str(tmp_path / "o"),
         "--preset", "coco_stuff", *SHRINK],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("spade-generate: error: --labels: path not found") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_from_shards_through_eval_loader(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    # 8 classes + don't care + 16-bit instances, as the format contract writes them
    manifest = write_shards(tmp_path / "shards", [2], extra_splits={"val": [3]}, size=(40, 36), label_nc=8)
    options = ["data.label_nc=8", "data.contain_dontcare_label=true", "data.no_instance=false"]
    cfg = tiny_config(*options)
    torch.manual_seed(4)
    save_official_generator(build_generator(cfg), tmp_path / "G.pth")
    out = tmp_path / "out"
    rc = main(["--shards", str(manifest), "--checkpoint", str(tmp_path / "G.pth"), "--preset", "tiny",
               "--out", str(out), *options])
    assert rc == 0, capsys.readouterr().err
    keys = sorted(p.stem[:-2] for p in (out / "images").glob("*_0.png"))
    assert keys == ["val_00002", "val_00003", "val_00004"]
    for key in keys:
        assert np.array(Image.open(out / "images" / f"{key}_0.png")).shape == (32, 32, 3)
        assert np.array(Image.open(out / "real" / f"{key}.png")).shape == (32, 32, 3)
    assert 'src="real/val_00002.png"' in (out / "index.html").read_text()
    # same channel count (9 classes, no don't care): the checkpoint loads, but 255 is now a bad id
    _expect_error(["--shards", str(manifest), "--checkpoint", str(tmp_path / "G.pth"), "--preset", "tiny",
                   "--out", str(tmp_path / "o"), *options, "data.contain_dontcare_label=false",
                   "data.label_nc=9"], capsys, "label.png: label ids out of range for label_nc=9", ": 255",
                  "do not fit this config")
    _expect_error(["--shards", str(tmp_path / "nowhere"), "--checkpoint", str(tmp_path / "G.pth"), "--preset",
                   "tiny", "--out", str(tmp_path / "o"), *options], capsys, "nowhere")
