"""Starting ``spade-serve``: load the model, read the shard samples, bind the port, run uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch.nn.functional as F

from spade_dist.config import Config
from spade_dist.distributed import resolve_device
from spade_dist.generation import shard_inputs
from spade_dist.serve.app import Sample, create_app
from spade_dist.serve.batcher import Batcher
from spade_dist.serve.model import Follower, ModelHolder, ModelSpec, class_names, load_served_model


@dataclass(frozen=True)
class ServeOptions:
    spec: ModelSpec
    host: str = "127.0.0.1"
    port: int = 8765
    device: str = "auto"
    shards: Optional[str] = None
    split: Optional[str] = None
    manifest: Optional[Path] = None
    max_samples: int = 64
    poll_seconds: float = 5.0
    max_batch: int = 8
    max_upload_bytes: int = 16 * 1024 * 1024


class ServeError(ValueError):
    """A user-facing startup problem (bad option, busy port); the CLI prints it and exits 2."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port before anything slow starts, so a busy port fails at once and no other
    process can take the port between the check and uvicorn's start."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve ({exc})") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def _manifests(cfg: Config, opts: ServeOptions) -> list[dict]:
    """Shard manifests that may list the class names: the --shards set's, then the run config's."""
    from spade_dist.data.sources import ShardSourceError, eval_spec, resolve_shards

    found = []
    specs = [(opts.shards, opts.split or cfg.data.val_split, str(opts.manifest or ""))] if opts.shards else []
    run_spec = eval_spec(cfg.data.shards, cfg.data.val_shards, cfg.data.manifest)
    if run_spec:
        specs.append((run_spec, cfg.data.val_split, cfg.data.manifest))
    for spec, split, manifest in specs:
        try:
            found.append(resolve_shards(spec, split, manifest).manifest)
        except (ShardSourceError, OSError, ValueError):
            continue  # the run's shards may live on another machine: names fall back to "class <id>"
    return found


def read_samples(cfg: Config, opts: ServeOptions, size_hw: tuple[int, int]) -> list[Sample]:
    """The first ``max_samples`` label maps of the shard set (with their photos, for the style row), through
    spade-generate's eval-loader reader, at the generation size (nearest neighbour, if the eval
    preprocessing gave another size)."""
    if not opts.shards:
        return []
    args = argparse.Namespace(shards=opts.shards, split=opts.split, manifest=opts.manifest, limit=opts.max_samples)
    samples = []
    for item in shard_inputs(args, cfg):
        label = item.label.long()
        if tuple(label.shape[-2:]) != size_hw:
            label = F.interpolate(label.float(), size=size_hw, mode="nearest").long()
        photo = item.real
        if photo is not None and tuple(photo.shape[-2:]) != size_hw:  # as an uploaded style photo is resized
            photo = F.interpolate(photo[None].float(), size=size_hw, mode="bicubic").round().clamp(0, 255)[0].byte()
        samples.append(Sample(key=item.key, label=label, photo=photo))
    if not samples:
        raise ServeError(f"--shards {opts.shards}: no samples in split {opts.split or cfg.data.val_split}")
    return samples


def _print(message: str) -> None:
    print(message, flush=True)  # flushed: the URL line is what scripts (and the tests) wait for


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(opts: ServeOptions, log: Callable[[str], None] = _print, warn: Callable[[str], None] = _warn) -> None:
    """Run the server until interrupted. Problems the user can fix raise before the port is served:
    :class:`ServeError`, ``GenerateError`` (checkpoint, preset, device) and the data readers' errors."""
    import uvicorn

    if opts.max_samples < 1:
        raise ServeError(f"--max-samples must be >= 1, got {opts.max_samples}")
    if opts.poll_seconds <= 0:
        raise ServeError(f"--poll-seconds must be > 0, got {opts.poll_seconds}")
    if opts.max_upload_bytes < 1024:
        raise ServeError(f"--max-upload-bytes must be >= 1024, got {opts.max_upload_bytes}")
    sock = bind_socket(opts.host, opts.port)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        warn(f"spade-serve: warning: listening on {opts.host}: anyone who reaches this address can use the page "
             "(it has no authentication)")
    try:
        device = resolve_device(opts.device, key="--device")
        served = load_served_model(opts.spec, device)
        cfg = served.model.cfg
        samples = read_samples(cfg, opts, served.size_hw)
        names = class_names(cfg.data.label_nc, _manifests(cfg, opts))
        holder = ModelHolder(opts.spec, served, log=lambda m: warn(f"spade-serve: {m}"))
        batcher = Batcher(holder.get, max_batch=opts.max_batch)
        app = create_app(holder, batcher, names, samples, opts.max_upload_bytes)
    except BaseException:
        sock.close()
        raise
    follower = Follower(holder, opts.poll_seconds)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"  # IPv6 literals in brackets
    step = f"step {served.step}" if served.step is not None else "a generator file"
    log(f"spade-serve: {served.source} ({step}) on {device}; open {url}")
    batcher.start()
    follower.start()
    try:
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        follower.stop()
        batcher.stop()
        sock.close()

