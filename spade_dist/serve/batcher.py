"""Generation requests -> batched generator forwards, on one worker thread that owns the device.

Requests that arrive while the generator is busy (several browser tabs, a slider dragged) queue up;
the worker takes up to ``max_batch`` of them at once and runs one forward for all of them. Each
request keeps its own z: drawn from ``label_seed(seed, key)`` exactly as ``spade-generate`` draws it,
or from its style photo through the VAE encoder. A single request is a batch of one, so its image
equals ``spade-generate``'s for the same checkpoint, label map, key and seed.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from spade_dist.generation import label_seed, latent_codes, photo_to_model_input
from spade_dist.labels import LabelError, encode_semantics
from spade_dist.serve.inputs import RequestError
from spade_dist.serve.model import ServedModel
from spade_dist.visualize import to_uint8_image


@dataclass
class GenerationRequest:
    label: torch.Tensor  # int64 1 x 1 x H x W
    seed: int
    key: str
    instance: Optional[torch.Tensor] = None  # int64 1 x 1 x H x W; None = the label map itself
    style: Optional[torch.Tensor] = None  # uint8 3 x H x W
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class GenerationResult:
    image: torch.Tensor  # uint8 3 x H x W on CPU
    step: Optional[int]
    source: str
    batch_size: int  # how many requests shared the forward that made this image


class Batcher:
    """Owns the generator forward. :meth:`submit` returns a future of a :class:`GenerationResult`."""

    def __init__(self, get_model: Callable[[], ServedModel], max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        self.get_model = get_model
        self.max_batch = max_batch
        self._queue: "queue.Queue[Optional[GenerationRequest]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="spade-serve-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, request: GenerationRequest) -> Future:
        self._queue.put(request)
        return request.future

    def _take_batch(self) -> Optional[list[GenerationRequest]]:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # stop after this batch
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - never let one bad forward kill the worker
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)

    def _prepare(self, served: ServedModel, request: GenerationRequest) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One request -> (semantics 1 x C x H x W, z 1 x z_dim or None) on the model's device."""
        cfg, device = served.model.cfg, served.device
        if tuple(request.label.shape[-2:]) != served.size_hw:
            raise RequestError(f"label map is {request.label.shape[-1]}x{request.label.shape[-2]}; the served model "
                               f"generates {served.size_hw[1]}x{served.size_hw[0]}")
        label = request.label.to(device)
        instance = request.instance.to(device) if request.instance is not None else label
        try:
            semantics = encode_semantics(label, instance, cfg.data.label_layout)
        except LabelError as exc:
            raise RequestError(str(exc)) from exc
        style = None
        if request.style is not None:
            if served.model.encoder is None:
                raise RequestError("this checkpoint has no VAE encoder: a style image cannot be used")
            style = photo_to_model_input(request.style).unsqueeze(0)
        rng = torch.Generator(device=device).manual_seed(label_seed(request.seed, request.key))
        return semantics, latent_codes(served.model, 1, style, rng, device)

    def _generate(self, batch: list[GenerationRequest]) -> None:
        served = self.get_model()  # one model for the whole batch, even if a newer one arrives meanwhile
        ready: list[tuple[GenerationRequest, torch.Tensor, Optional[torch.Tensor]]] = []
        with torch.inference_mode():
            for request in batch:
                try:
                    semantics, z = self._prepare(served, request)
                except RequestError as exc:
                    request.future.set_exception(exc)
                    continue
                ready.append((request, semantics, z))
            if not ready:
                return
            semantics = torch.cat([s for _, s, _ in ready])
            z = torch.cat([z for _, _, z in ready]) if served.use_vae else None
            images = to_uint8_image(served.model.generator(semantics, z=z)).cpu()
        for (request, _, _), image in zip(ready, images):
            request.future.set_result(GenerationResult(image, served.step, served.source, len(ready)))
