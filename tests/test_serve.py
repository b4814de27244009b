"""spade-serve: upload decoding, the batcher, the CLI's exit codes, and the page in a real headless
browser (Debian's chromium driven by Playwright) against a tiny VAE generator in a run directory."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from spade_dist.checkpoint import CheckpointManager
from spade_dist.cli.generate import main as generate_main
from spade_dist.config import CheckpointConfig, Config
from spade_dist.generation import LoadedModel
from spade_dist.models import build_generator
from spade_dist.palettes import label_palette
from spade_dist.serve.app import Sample, style_row
from spade_dist.serve.batcher import Batcher, GenerationRequest
from spade_dist.serve.inputs import RequestError, decode_canvas, decode_label_upload, label_png
from spade_dist.serve.model import ServedModel
from spade_dist.visualize import colorize_labels
from tests.kit import cli_env, tiny_config, write_shards

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CLASS_NAMES = ["sky", "water", "grass", "rock"]
SIZE = 64
SERVE = Path(sys.executable).parent / "spade-serve"


def _tiny_cfg(manifest: Path | None = None) -> Config:
    """The tiny preset at 64 px with 4 classes and a VAE; validation shards only where given."""
    return tiny_config("data.label_nc=4", "data.contain_dontcare_label=true", f"data.crop_size={SIZE}",
                       f"data.load_size={SIZE}", "model.use_vae=true", "model.z_dim=16",
                       "model.norm_G=spectralspadeinstance3x3", f"data.val_shards={manifest or ''}")


def _save_checkpoint(run_dir: Path, cfg: Config, step: int, seed: int) -> None:
    """A committed checkpoint whose EMA generator is a freshly initialised one (seeded)."""
    torch.manual_seed(seed)
    raw, ema = build_generator(cfg), build_generator(cfg)
    manager = CheckpointManager(run_dir, CheckpointConfig(keep_last=100, async_save=False), rank=0, world_size=1,
                                config_yaml=cfg.to_yaml(), install_signal_handlers=False)
    manager.save(step, {"train": {"G": raw.state_dict(), "G_ema": ema.state_dict()}})
    manager.close()


def _served(cfg: Config, seed: int = 0) -> ServedModel:
    torch.manual_seed(seed)
    generator = build_generator(cfg).eval()
    return ServedModel(LoadedModel(generator, None, cfg, "test"), torch.device("cpu"), None, "test")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(height: int = SIZE, width: int = SIZE) -> np.ndarray:
    ids = np.zeros((height, width), dtype=np.uint8)
    ids[height // 2:] = 1
    ids[height // 4: height // 2, width // 4: 3 * width // 4] = 3
    ids[3 * height // 4:, : width // 3] = 2
    return ids


# ------------------------------------------------------------------------------------------------
# Uploads and batching (no server)
# ------------------------------------------------------------------------------------------------


def test_label_uploads_ids_palette_colours_and_errors() -> None:
    ids = torch.from_numpy(_scene().astype(np.int64)).view(1, 1, SIZE, SIZE)
    ids[0, 0, 0, :5] = 255
    # our download format (palette image, indices = ids) reads back as the same ids
    assert torch.equal(decode_label_upload(label_png(ids, 4), "a.png", (SIZE, SIZE), 4, True), ids)
    # an RGB image of the palette colours maps back to ids (don't care is black = not a palette colour here)
    no_dontcare = ids.clamp(max=3)
    rgb = colorize_labels(no_dontcare, 4)[0].permute(1, 2, 0).numpy()
    assert torch.equal(decode_label_upload(_png(Image.fromarray(rgb)), "c.png", (SIZE, SIZE), 4, True), no_dontcare)
    # larger uploads are resized to the generation size with nearest neighbour, like spade-generate
    big = Image.fromarray(np.kron(_scene(), np.ones((2, 2), dtype=np.uint8)))
    assert torch.equal(decode_label_upload(_png(big), "big.png", (SIZE, SIZE), 4, True)[0, 0],
                       torch.from_numpy(_scene().astype(np.int64)))
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(RequestError, match=r"c\.png: colours not in the label palette of 4 classes: #010203"):
        decode_label_upload(_png(Image.fromarray(rgb)), "c.png", (SIZE, SIZE), 4, True)
    with pytest.raises(RequestError, match="bad.png: label ids out of range for label_nc=4.*: 7"):
        decode_label_upload(_png(Image.fromarray(np.full((8, 8), 7, np.uint8))), "bad.png", (SIZE, SIZE), 4, True)
    with pytest.raises(RequestError) as junk:
        decode_label_upload(b"\x89PNG not really", "junk.png", (SIZE, SIZE), 4, True)
    # what it is and what was expected, never PIL's "cannot identify image file <_io.BytesIO object at 0x...>"
    assert str(junk.value) == "junk.png: not an image; expected a PNG of label ids or of the label palette's colours"
    with pytest.raises(RequestError, match="empty upload"):
        decode_label_upload(b"", "e.png", (SIZE, SIZE), 4, True)
    truncated = _png(Image.fromarray(_scene()))[:60]
    with pytest.raises(RequestError, match="t.png"):
        decode_label_upload(truncated, "t.png", (SIZE, SIZE), 4, True)
    canvas = ids.numpy().astype("<u2").tobytes()
    assert torch.equal(decode_canvas(canvas, SIZE, SIZE, (SIZE, SIZE), 4, True), ids)
    with pytest.raises(RequestError, match="this model generates 64x64"):
        decode_canvas(canvas, 32, 128, (SIZE, SIZE), 4, True)
    with pytest.raises(RequestError, match="bytes"):
        decode_canvas(canvas[:-2], SIZE, SIZE, (SIZE, SIZE), 4, True)


def test_colour_uploads_and_downloads_use_the_datasets_palette() -> None:
    """The quickstart's label PNGs are drawn in its natural colours (data.dataset=synthetic); an upload in
    those colours reads back as the same ids, and the download carries them."""
    ids = torch.from_numpy(np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 10).view(1, 1, SIZE, SIZE)
    rgb = colorize_labels(ids, 10, "synthetic")[0].permute(1, 2, 0).numpy()
    assert rgb[0, 0].tolist() == label_palette(10, "synthetic")[0].tolist() != label_palette(10)[0].tolist()
    assert torch.equal(decode_label_upload(_png(Image.fromarray(rgb)), "s.png", (SIZE, SIZE), 10, False, "synthetic"), ids)
    with pytest.raises(RequestError, match="colours not in the label palette"):
        decode_label_upload(_png(Image.fromarray(rgb)), "s.png", (SIZE, SIZE), 10, False)  # the generic palette
    downloaded = Image.open(io.BytesIO(label_png(ids, 10, "synthetic")))
    assert np.array_equal(np.array(downloaded.convert("RGB")), rgb)


def test_style_row_offers_shard_photos_seeds_or_says_why_not() -> None:
    photo = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    label = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.int64)
    samples = [Sample("a", label, photo), Sample("b", label), Sample("c", label, photo)]
    photos = style_row(use_vae=True, has_encoder=True, samples=samples)
    assert photos["kind"] == "photos" and photos["items"] == [{"sample": 0, "key": "a"}, {"sample": 2, "key": "c"}]
    seeds = style_row(use_vae=True, has_encoder=False, samples=samples)
    assert seeds["kind"] == "seeds" and len(seeds["items"]) == 6 and "--encoder" in seeds["note"]
    assert style_row(True, True, [])["kind"] == "seeds"  # an encoder but no shard photos: seeds, and upload
    none = style_row(use_vae=False, has_encoder=False, samples=samples)
    assert none["kind"] == "none" and not none["items"] and "model.use_vae=false" in none["note"]


def test_batcher_runs_queued_requests_in_one_forward() -> None:
    cfg = _tiny_cfg()
    served = _served(cfg)
    batcher = Batcher(lambda: served, max_batch=8)
    label = torch.from_numpy(_scene().astype(np.int64)).view(1, 1, SIZE, SIZE)
    requests = [GenerationRequest(label=label, seed=s, key="k") for s in (0, 1, 2)]
    bad = GenerationRequest(label=torch.full_like(label, 9), seed=0, key="k")
    futures = [batcher.submit(r) for r in [*requests, bad]]  # queued before the worker starts
    batcher.start()
    try:
        results = [f.result(timeout=300) for f in futures[:3]]
        with pytest.raises(RequestError, match="label_nc=4"):
            futures[3].result(timeout=300)
        single = batcher.submit(GenerationRequest(label=label, seed=1, key="k")).result(timeout=300)
    finally:
        batcher.stop()
    assert [r.batch_size for r in results] == [3, 3, 3] and single.batch_size == 1
    assert not torch.equal(results[0].image, results[1].image), "different seeds -> different z -> different images"
    # a batched image equals the one generated alone (up to float summation order)
    assert (results[1].image.int() - single.image.int()).abs().max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_cuda_equals_spade_generate_on_cuda(tmp_path: Path) -> None:
    from spade_dist.models.compat import save_generator_file
    from spade_dist.serve.model import ModelSpec, load_served_model

    cfg = _tiny_cfg()
    torch.manual_seed(3)
    save_generator_file(build_generator(cfg), cfg, tmp_path / "G.pt")
    Image.fromarray(_scene()).save(tmp_path / "scene.png")
    served = load_served_model(ModelSpec(checkpoint=tmp_path / "G.pt"), torch.device("cuda"))
    assert next(served.model.generator.parameters()).is_cuda
    batcher = Batcher(lambda: served)
    batcher.start()
    try:
        label = torch.from_numpy(_scene().astype(np.int64)).view(1, 1, SIZE, SIZE)
        image = batcher.submit(GenerationRequest(label=label, seed=4, key="scene")).result(timeout=300).image
    finally:
        batcher.stop()
    assert generate_main(["--labels", str(tmp_path / "scene.png"), "--checkpoint", str(tmp_path / "G.pt"),
                          "--seed", "4", "--device", "cuda", "--out", str(tmp_path / "gen")]) == 0
    expected = np.array(Image.open(tmp_path / "gen" / "images" / "scene_0.png").convert("RGB"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_holder_follows_committed_checkpoints_and_refuses_corrupt_ones(tmp_path: Path) -> None:
    from spade_dist.serve.model import ModelHolder, ModelSpec, load_served_model

    cfg = _tiny_cfg()
    run_dir = tmp_path / "run"
    _save_checkpoint(run_dir, cfg, step=1, seed=1)
    spec = ModelSpec(checkpoint=run_dir)
    logged: list[str] = []
    holder = ModelHolder(spec, load_served_model(spec, torch.device("cpu")), log=logged.append)
    assert holder.get().step == 1 and not holder.poll()
    # a step directory without its marker (a save in flight) is not looked at
    (run_dir / "checkpoints" / "step-000000005").mkdir()
    assert not holder.poll() and holder.last_error is None
    # a committed step whose data no longer matches the marker's sha256 is refused once, not served
    _save_checkpoint(run_dir, cfg, step=2, seed=2)
    data = max((run_dir / "checkpoints" / "step-000000002").rglob("*.distcp"), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert not holder.poll() and holder.get().step == 1
    assert "sha256" in holder.last_error and "step-000000002" in holder.last_error
    assert not holder.poll() and len(logged) == 1, "a refused step is reported once"
    _save_checkpoint(run_dir, cfg, step=3, seed=3)
    assert holder.poll() and holder.get().step == 3 and holder.last_error is None


# ------------------------------------------------------------------------------------------------
# The CLI
# ------------------------------------------------------------------------------------------------


def _run_serve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SERVE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_busy_port_and_missing_checkpoint_exit_2(tmp_path: Path) -> None:
    assert SERVE.is_file(), f"console script missing: {SERVE} (pip install -e . declares it)"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = _run_serve("--checkpoint", str(tmp_path), "--port", str(port))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"spade-serve: error: cannot listen on 127.0.0.1:{port}")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = _run_serve("--checkpoint", str(tmp_path / "nowhere"), "--port", "0")
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------
# The page in a real browser
# ------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, run_dir: Path, cfg: Config) -> None:
        self.proc, self.url, self.run_dir, self.cfg = proc, url, run_dir, cfg

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, dict]:
        request = urllib.request.Request(self.url.rstrip("/") + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@contextlib.contextmanager
def _serving(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``spade-serve ARGS --port 0`` until the block ends; yields the process and the URL it prints."""
    proc = subprocess.Popen([str(SERVE), *args, "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env())  # this checkout's code
    lines = []
    try:
        for line in proc.stdout:  # printed once the model is loaded and the port listens
            lines.append(line)
            match = re.search(r"open (http://\S+/)", line)
            if match:
                break
        else:
            raise AssertionError("spade-serve exited before serving:\n" + "".join(lines))
        yield proc, match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    manifest = write_shards(root / "shards", [2], extra_splits={"val": [3]}, size=(40, 36), label_nc=4,
                            instance=False)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "class_names": CLASS_NAMES}))
    cfg = _tiny_cfg(manifest)
    run_dir = root / "run"
    _save_checkpoint(run_dir, cfg, step=1, seed=1)
    with _serving("--run-dir", str(run_dir), "--poll-seconds", "0.5", "--shards", str(manifest), "--split", "val",
                  "--max-upload-bytes", str(256 * 1024)) as (proc, url):
        yield Server(proc, url, run_dir, cfg)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} missing: launch/install_services.sh installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.set_default_timeout(120_000)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page


@pytest.fixture(scope="module")
def page(browser, server: Server):
    page = _open(browser, server.url)
    yield page
    page.close()


def _wait_current_image(page) -> None:
    """Until the image shown was generated from the label map the canvas holds now."""
    page.wait_for_function(
        "() => { const img = document.getElementById('result'); const c = document.getElementById('canvas');"
        " return img.complete && img.naturalWidth > 0 && img.dataset.version === c.dataset.version; }")


def _image(page) -> np.ndarray:
    data = page.evaluate("async () => { const r = await fetch(document.getElementById('result').src);"
                         " return Array.from(new Uint8Array(await r.arrayBuffer())); }")
    return np.array(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


def _stroke(page, x0: float, y0: float, x1: float, y1: float) -> None:
    """A drag across the canvas between two points given as fractions of its size."""
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    for t in np.linspace(0, 1, 8):
        page.mouse.move(box["x"] + (x0 + t * (x1 - x0)) * box["width"], box["y"] + (y0 + t * (y1 - y0)) * box["height"])
    page.mouse.up()


def _brush(page, name: str) -> None:
    page.locator(".brush", has_text=name).click()


@pytest.mark.e2e
def test_page_draw_two_regions_shows_an_image_that_follows_them(page, server: Server) -> None:
    assert [b.strip() for b in page.locator(".brush").all_inner_texts()] == [f"{i} {n}" for i, n in enumerate(CLASS_NAMES)]
    page.locator("#brush-size").fill("16")
    _brush(page, "water")  # the canvas starts as class 0 (sky): two other classes make the two regions
    for y in (0.1, 0.25):
        _stroke(page, 0.0, y, 1.0, y)
    _brush(page, "grass")
    for y in (0.75, 0.9):
        _stroke(page, 0.0, y, 1.0, y)
    _wait_current_image(page)
    ids = np.array(page.evaluate("() => Array.from(window.spadeServe.ids())")).reshape(SIZE, SIZE)
    assert (ids[:22] == 1).all() and (ids[42:] == 2).all(), "the strokes should cover the top and bottom bands"
    image = _image(page).astype(np.float64)
    assert image.shape == (SIZE, SIZE, 3)
    top, bottom = image[4:18].mean(axis=(0, 1)), image[46:60].mean(axis=(0, 1))
    assert np.abs(top - bottom).max() > 2.0, f"regions of two classes should look different: {top} vs {bottom}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_after_drawing.png"
    page.screenshot(path=str(shot))
    print(f"screenshot of the page after drawing: {shot}")
    # undo takes the last stroke back
    page.locator("#undo").click()
    ids = np.array(page.evaluate("() => Array.from(window.spadeServe.ids())")).reshape(SIZE, SIZE)
    assert (ids[62] == 0).all() and (ids[46] == 2).all()


@pytest.mark.e2e
def test_uploaded_label_map_gives_spade_generates_image(page, server: Server, tmp_path: Path) -> None:
    page.locator("#new-style").click()
    seed = int(page.evaluate("() => window.spadeServe.seed()"))
    scene = tmp_path / "my.scene.png"
    Image.fromarray(np.kron(_scene(), np.ones((2, 2), dtype=np.uint8))).save(scene)  # 128 px: resized by both
    page.locator("#upload-labels").set_input_files(str(scene))
    page.wait_for_function("() => document.getElementById('result').dataset.key === 'my_scene'")
    _wait_current_image(page)
    step = page.locator("#result").get_attribute("data-step")
    served = _image(page)
    out = tmp_path / "gen"
    step_dir = server.run_dir / "checkpoints" / f"step-{int(step):09d}"
    assert generate_main(["--labels", str(scene), "--checkpoint", str(step_dir), "--seed", str(seed),
                          "--out", str(out), "--device", "cpu"]) == 0
    expected = np.array(Image.open(out / "images" / "my_scene_0.png").convert("RGB"))
    assert np.array_equal(served, expected), "the page's image differs from spade-generate's for the same map and seed"
    # the downloaded label map is the same ids, readable by spade-generate
    with page.expect_download() as download:
        page.locator("#download-labels").click()
    saved = tmp_path / "downloaded.png"
    download.value.save_as(saved)
    assert np.array_equal(np.array(Image.open(saved)), _scene())
    # a shard sample can be picked instead (its key is shown as text)
    page.locator("#samples").select_option(label="val_00003")
    page.wait_for_function("() => document.getElementById('result').dataset.key === 'val_00003'")


@pytest.mark.e2e
def test_malformed_or_oversized_upload_shows_an_error_and_the_page_keeps_working(page, server: Server,
                                                                                 tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    page.locator("#upload-labels").set_input_files(str(broken))
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "broken.png" in error.inner_text()
    too_many_classes = tmp_path / "ids.png"
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(too_many_classes)
    page.locator("#upload-labels").set_input_files(str(too_many_classes))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('label_nc=4')")
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(300 * 1024))
    page.locator("#upload-labels").set_input_files(str(big))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('--max-upload-bytes')")
    # the server is alive and the page still works: a stroke gives a new image and clears the error
    before = page.locator("#canvas").get_attribute("data-version")
    _brush(page, "rock")
    _stroke(page, 0.2, 0.5, 0.8, 0.5)
    assert page.locator("#canvas").get_attribute("data-version") != before
    _wait_current_image(page)
    error.wait_for(state="hidden")
    assert server.proc.poll() is None
    status, body = server.post("/api/generate", b"not multipart", "application/octet-stream")
    assert status == 400 and body["error"].startswith("malformed request"), body


def _key(page, combo: str) -> np.ndarray:
    page.keyboard.press(combo)
    return np.array(page.evaluate("() => Array.from(window.spadeServe.ids())")).reshape(SIZE, SIZE)


@pytest.mark.e2e
def test_canvas_first_class_undo_keys_brush_cursor_and_seed_styles(browser, server: Server) -> None:
    """GauGAN-like canvas controls: the first brush is the class the canvas is filled with, Ctrl+Z /
    Ctrl+Shift+Z undo and redo strokes, a circle of the brush's size follows the pointer, and a VAE without
    an encoder says so and offers a row of fixed-seed styles whose thumbnails pick the seed."""
    page = _open(browser, server.url)
    try:
        ids = np.array(page.evaluate("() => Array.from(window.spadeServe.ids())"))
        assert (ids == 0).all() and page.evaluate("() => window.spadeServe.selected()") == 0
        assert page.locator(".brush.active").inner_text().strip() == f"0 {CLASS_NAMES[0]}"

        page.locator("#brush-size").fill("8")
        box = page.locator("#canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        cursor = page.locator("#brush-cursor")
        assert cursor.is_visible()
        assert abs(cursor.bounding_box()["width"] - 8 * box["width"] / SIZE) < 3  # 8 generator pixels wide
        page.locator("#tool-fill").click()
        assert not cursor.is_visible()
        page.locator("#tool-brush").click()

        _brush(page, "grass")
        _stroke(page, 0.0, 0.5, 1.0, 0.5)
        drawn = np.array(page.evaluate("() => Array.from(window.spadeServe.ids())")).reshape(SIZE, SIZE)
        assert (drawn[32] == 2).all()
        assert (_key(page, "Control+z") == 0).all()
        assert np.array_equal(_key(page, "Control+Shift+Z"), drawn)
        assert (_key(page, "Control+z") == 0).all()
        assert np.array_equal(_key(page, "Control+y"), drawn)

        assert "no VAE encoder" in page.locator("#style-note").inner_text()
        styles = page.locator(".style")
        assert styles.count() == 6
        page.wait_for_function("() => [...document.querySelectorAll('.style img')].every(i => i.complete && i.naturalWidth > 0)")
        styles.nth(2).click()
        page.wait_for_function("() => document.getElementById('result').dataset.seed === '3'")
        assert page.evaluate("() => window.spadeServe.seed()") == 3 and "active" in styles.nth(2).get_attribute("class")
        _wait_current_image(page)
        # The shard photos a model with an encoder would offer; without one, asking for their style is refused.
        size = page.evaluate("async () => { const r = await fetch('/api/samples/0/photo.png'); const i = new Image();"
                             " i.src = URL.createObjectURL(await r.blob()); await i.decode(); return [i.width, i.height]; }")
        assert size == [SIZE, SIZE]
        status, error = page.evaluate(
            f"async () => {{ const f = new FormData(); f.append('labels', new Blob([new Uint8Array({SIZE * SIZE * 2})]), 'l');"
            f" f.append('width', '{SIZE}'); f.append('height', '{SIZE}'); f.append('style_sample', '0');"
            " const r = await fetch('/api/generate', {method: 'POST', body: f}); return [r.status, (await r.json()).error]; }")
        assert status == 400 and error == "this checkpoint has no VAE encoder: a style image cannot be used"
    finally:
        page.close()


@pytest.mark.e2e
def test_class_list_and_panes_fit_the_window(browser, server: Server) -> None:
    """At 1280 x 800 the tools column (its class list scrolling inside) and both panes are in view side by
    side; a narrow window stacks them without a horizontal scroll bar."""
    page = _open(browser, server.url)
    try:
        page.set_viewport_size({"width": 1280, "height": 800})
        tools, result = page.locator("#tools").bounding_box(), page.locator("#result").bounding_box()
        assert tools["y"] + tools["height"] <= 800 and result["x"] + result["width"] <= 1280
        brushes = page.locator("#brushes").bounding_box()
        assert brushes["height"] >= 90 and brushes["y"] + brushes["height"] <= 800
        page.set_viewport_size({"width": 600, "height": 900})
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 600
        assert page.locator("#canvas").bounding_box()["y"] > page.locator("#brushes").bounding_box()["y"]
    finally:
        page.close()


@pytest.mark.e2e
def test_newer_committed_checkpoint_is_picked_up(page, server: Server) -> None:
    _wait_current_image(page)
    before = _image(page)
    assert page.locator("#result").get_attribute("data-step") == "1"
    _save_checkpoint(server.run_dir, server.cfg, step=2, seed=2)
    page.wait_for_function("() => document.getElementById('model').dataset.step === '2'")
    page.wait_for_function("() => document.getElementById('result').dataset.step === '2'")
    _wait_current_image(page)
    assert not np.array_equal(_image(page), before), "step 2's generator should give another image"


@pytest.mark.e2e
def test_official_checkpoint_with_encoder_and_style_image(browser, coco_sample: Path, tmp_path: Path) -> None:
    """An official latest_net_G.pth + latest_net_E.pth (the encoder's official layout needs 256 px wide
    inputs; aspect ratio 4 keeps the generator cheap): a style photo uploaded in the page, and a shard
    photo picked in the style row, give spade-generate's image for the same map, photo and seed."""
    from tests.model_fixtures import OFFICIAL_VAE_OPTIONS, write_official_vae

    generator, encoder = write_official_vae(tmp_path, seed=5)
    manifest = write_shards(tmp_path / "shards", [2], extra_splits={"val": [3]}, size=(40, 36), label_nc=4,
                            instance=False, dontcare=False)  # the official options: no don't-care channel
    scene = tmp_path / "scene.png"
    Image.fromarray(_scene(64, 256)).save(scene)
    style = coco_sample / "val_img" / "000000000785.jpg"
    model = ["--checkpoint", str(generator), "--encoder", str(encoder), "--preset", "tiny", *OFFICIAL_VAE_OPTIONS]
    with _serving(*model, "--shards", str(manifest), "--split", "val") as (_, url):
        page = _open(browser, url)
        assert page.locator("#style-box").is_visible()
        page.locator("#upload-labels").set_input_files(str(scene))
        page.wait_for_function("() => document.getElementById('result').dataset.key === 'scene'")
        page.locator("#new-style").click()
        seed = int(page.evaluate("() => window.spadeServe.seed()"))
        page.locator("#upload-style").set_input_files(str(style))
        page.wait_for_function(f"() => document.getElementById('result').dataset.seed === '{seed}'"
                               " && document.getElementById('result').dataset.style === '000000000785.jpg'")
        _wait_current_image(page)
        served = _image(page)
        # The style row offers the shard photos (through the encoder); picking one replaces the upload.
        assert "shard photos" in page.locator("#style-note").inner_text() and page.locator(".style").count() == 3
        page.locator(".style").first.click()
        page.wait_for_function("() => document.getElementById('result').dataset.style === 'sample 0'")
        _wait_current_image(page)
        from_row = _image(page)
        photo = page.evaluate("async () => Array.from(new Uint8Array(await (await fetch('/api/samples/0/photo.png')).arrayBuffer()))")
        (tmp_path / "photo0.png").write_bytes(bytes(photo))
        page.close()
    assert generate_main(["--labels", str(scene), *model, "--style-image", str(style), "--seed", str(seed),
                          "--out", str(tmp_path / "gen"), "--device", "cpu"]) == 0
    expected = np.array(Image.open(tmp_path / "gen" / "images" / "scene_0.png").convert("RGB"))
    assert served.shape == (64, 256, 3) and np.array_equal(served, expected)
    assert generate_main(["--labels", str(scene), *model, "--style-image", str(tmp_path / "photo0.png"), "--seed",
                          str(seed), "--out", str(tmp_path / "gen_row"), "--device", "cpu"]) == 0
    expected = np.array(Image.open(tmp_path / "gen_row" / "images" / "scene_0.png").convert("RGB"))
    assert np.array_equal(from_row, expected) and not np.array_equal(from_row, served)
