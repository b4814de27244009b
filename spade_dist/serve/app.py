"""The ``spade-serve`` web application: a FastAPI app over a :class:`ModelHolder` and a :class:`Batcher`,
plus the static page in ``static/``.

HTTP API (all errors are JSON ``{"error": message}`` with a 4xx status; the page shows the message):

- ``GET /api/info``: classes (id, name, colour in the dataset's palette), generation size, served step /
  source, VAE / encoder, and ``styles``: the style row (:func:`style_row`).
- ``POST /api/generate`` (multipart): ``labels`` raw uint16 ids at the generation size, ``width``,
  ``height``, ``seed``, ``key``, optional ``style`` photo or ``style_sample`` (a shard sample's photo, by
  index) -> ``image/png``, headers ``X-Step``, ``X-Batch-Size``.
- ``GET /api/samples/{index}/photo.png``: a shard sample's photo (the style row's thumbnails).
- ``POST /api/labelmap`` (multipart ``file``): a label PNG (ids or palette colours) -> ids JSON.
- ``GET /api/samples`` / ``GET /api/samples/{index}``: keys of the shard samples / one sample's ids.
- ``POST /api/labelmap.png`` (multipart ``labels``, ``width``, ``height``): ids -> palette PNG download.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from spade_dist.generation import sample_key
from spade_dist.palettes import label_palette
from spade_dist.serve.batcher import Batcher, GenerationRequest
from spade_dist.serve.inputs import (
    RequestError,
    decode_canvas,
    decode_label_upload,
    decode_style_upload,
    ids_payload,
    image_png,
    label_png,
)
from spade_dist.serve.model import ModelHolder

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Longest a request waits for its image; a tiny CPU model takes well under a second, a large one on a
# busy CPU several seconds per batch.
GENERATE_TIMEOUT_S = 300.0
# Seeds the page sends (the "new style" button draws 31-bit ones); spade-generate's --seed takes the same.
MAX_SEED = 2**31 - 1
# The style row: this many shard photos (with an encoder) or fixed seeds (a VAE without one).
STYLE_ROW_LENGTH = 6


@dataclass(frozen=True)
class Sample:
    """A label map the page can pick: from a shard set (keys are untrusted text, used only as text)."""

    key: str
    label: torch.Tensor  # int64 1 x 1 x H x W at the generation size
    photo: Optional[torch.Tensor] = None  # uint8 3 x H x W at the generation size, when the shard has one


def style_row(use_vae: bool, has_encoder: bool, samples: list[Sample]) -> dict:
    """What the page's style row offers, and why: ``{"kind", "items", "note"}``. ``photos``: shard photos
    whose style the encoder takes (items ``{"sample", "key"}``); ``seeds``: fixed seeds of a VAE without an
    encoder (items ``{"seed"}``); ``none``: a deterministic generator, nothing to choose."""
    if not use_vae:
        return {"kind": "none", "items": [], "note": "This generator is deterministic (model.use_vae=false): one "
                "label map gives one image. A model trained with model.use_vae=true has styles."}
    photos = [{"sample": i, "key": s.key} for i, s in enumerate(samples) if s.photo is not None][:STYLE_ROW_LENGTH]
    if has_encoder and photos:
        return {"kind": "photos", "items": photos, "note": "Styles of shard photos (VAE encoder); or upload a photo."}
    seeds = [{"seed": seed} for seed in range(1, STYLE_ROW_LENGTH + 1)]
    note = ("Styles are random seeds: this model has no VAE encoder (spade-serve --encoder latest_net_E.pth "
            "takes the style of a photo)." if not has_encoder else
            "Styles are random seeds; upload a photo to take its style (spade-serve --shards adds shard photos).")
    return {"kind": "seeds", "items": seeds, "note": note}


# Room for multipart headers and the small form fields next to an upload of --max-upload-bytes.
_MULTIPART_OVERHEAD = 64 * 1024


class BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` is answered 413 while it streams, before
    it is spooled anywhere -- by its Content-Length when it has one, else (chunked transfer) by
    counting: past the limit the app sees a disconnect, and whatever it answers is replaced by the 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            await self._too_large(send, f"request of {length} bytes")
            return
        received = 0
        too_large = False

        async def limited_receive() -> dict:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        replaced = False

        async def checked_send(message: dict) -> None:
            nonlocal replaced
            if not too_large:
                await send(message)
            elif not replaced:
                replaced = True
                await self._too_large(send, "request body")

        try:
            await self.app(scope, limited_receive, checked_send)
        except Exception:  # noqa: BLE001 - the app failed on the cut body: the answer is still the 413
            if not too_large:
                raise
        if too_large and not replaced:  # the app gave up on the disconnect without answering
            await self._too_large(send, "request body")

    async def _too_large(self, send: Callable, what: str) -> None:
        upload_limit = self.limit - _MULTIPART_OVERHEAD
        body = json.dumps({"error": f"{what} is larger than --max-upload-bytes {upload_limit}"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_upload(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise RequestError(f"{what}: upload larger than {limit} bytes (--max-upload-bytes)")
    return data


def create_app(holder: ModelHolder, batcher: Batcher, class_names: list[str], samples: list[Sample],
               max_upload_bytes: int) -> FastAPI:
    app = FastAPI(title="spade-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_upload_bytes + _MULTIPART_OVERHEAD)


    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return _error(400, f"malformed request: {problems}")

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:  # the page shows it; the server lives on
        return _error(500, f"server error: {type(exc).__name__}: {exc}")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/info")
    def info() -> dict:
        served = holder.get()
        cfg = served.model.cfg
        palette = label_palette(cfg.data.label_nc, cfg.data.dataset).tolist()
        height, width = served.size_hw
        return {
            "classes": [{"id": i, "name": class_names[i], "color": palette[i]} for i in range(cfg.data.label_nc)],
            "contain_dontcare_label": cfg.data.contain_dontcare_label,
            "width": width, "height": height,
            "step": served.step, "source": served.source,
            "use_vae": served.use_vae, "has_encoder": served.model.encoder is not None,
            "follows_run": holder.spec.follows_run, "checkpoint_error": holder.last_error,
            "num_samples": len(samples), "max_upload_bytes": max_upload_bytes,
            "styles": style_row(served.use_vae, served.model.encoder is not None, samples),
        }

    @app.post("/api/generate")
    async def generate(labels: UploadFile = File(...), width: int = Form(...), height: int = Form(...),
                       seed: int = Form(0), key: str = Form("canvas"),
                       style: Optional[UploadFile] = File(None), style_sample: Optional[int] = Form(None)) -> Response:
        served = holder.get()
        cfg = served.model.cfg
        label = decode_canvas(await _read_upload(labels, max_upload_bytes, "label map"), width, height,
                              served.size_hw, cfg.data.label_nc, cfg.data.contain_dontcare_label)
        style_image = None
        if (style is not None or style_sample is not None) and not served.use_vae:
            raise RequestError("this generator is deterministic (use_vae=false): a style image has no effect")
        if style is not None:
            style_image = decode_style_upload(await _read_upload(style, max_upload_bytes, "style image"),
                                              style.filename or "style image", served.size_hw)
        elif style_sample is not None:
            style_image = _sample(style_sample).photo
            if style_image is None:
                raise RequestError(f"shard sample {style_sample} has no photo to take a style from")
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed {seed} is out of range 0..{MAX_SEED}")
        request = GenerationRequest(label=label, seed=seed, key=key[:200], style=style_image)
        result = await asyncio.wait_for(asyncio.wrap_future(batcher.submit(request)), GENERATE_TIMEOUT_S)
        headers = {"X-Step": "" if result.step is None else str(result.step), "X-Batch-Size": str(result.batch_size),
                   "Cache-Control": "no-store"}
        return Response(image_png(result.image), media_type="image/png", headers=headers)

    @app.post("/api/labelmap")
    async def upload_labelmap(file: UploadFile = File(...)) -> dict:
        served = holder.get()
        cfg = served.model.cfg
        name = Path(file.filename or "label map").name
        label = decode_label_upload(await _read_upload(file, max_upload_bytes, name), name, served.size_hw,
                                    cfg.data.label_nc, cfg.data.contain_dontcare_label, cfg.data.dataset)
        return ids_payload(label, key=sample_key(Path(name).stem))

    @app.post("/api/labelmap.png")
    async def export_labelmap(labels: UploadFile = File(...), width: int = Form(...),
                              height: int = Form(...)) -> Response:
        served = holder.get()
        cfg = served.model.cfg
        label = decode_canvas(await _read_upload(labels, max_upload_bytes, "label map"), width, height,
                              served.size_hw, cfg.data.label_nc, cfg.data.contain_dontcare_label)
        return Response(label_png(label, cfg.data.label_nc, cfg.data.dataset), media_type="image/png",
                        headers={"Content-Disposition": 'attachment; filename="labels.png"'})

    @app.get("/api/samples")
    def sample_keys() -> dict:
        return {"keys": [s.key for s in samples]}

    def _sample(index: int) -> Sample:
        if not 0 <= index < len(samples):
            raise RequestError(f"no sample {index} (there are {len(samples)})")
        return samples[index]

    @app.get("/api/samples/{index}")
    def sample(index: int) -> dict:
        return ids_payload(_sample(index).label, key=_sample(index).key)

    @app.get("/api/samples/{index}/photo.png")
    def sample_photo(index: int) -> Response:
        photo = _sample(index).photo
        if photo is None:
            raise RequestError(f"shard sample {index} has no photo")
        return Response(image_png(photo), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app
