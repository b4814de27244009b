"""Which generator ``spade-serve`` serves, and following a training run's newer checkpoints.

Loading goes through ``spade-generate``'s loader (:func:`spade_dist.generation.load_model`), so the
page and the command line build the same network from the same file: an official ``latest_net_G.pth``
(model options from a preset / config), a project generator file, a checkpoint step directory, or a
run directory (its newest committed step, EMA weights). A step directory is read only after its
``COMMITTED`` marker validates every file's size and sha256.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from spade_dist.checkpoint import layout
from spade_dist.generation import GenerateError, LoadedModel, generation_size, load_model


@dataclass(frozen=True)
class ModelSpec:
    """What the user named on the command line; enough to load (again) a generator."""

    checkpoint: Path
    preset: Optional[str] = None
    config: Optional[Path] = None
    encoder: Optional[Path] = None
    overrides: tuple[str, ...] = ()

    @property
    def follows_run(self) -> bool:
        """A run directory (or its ``checkpoints/``): newer committed steps replace the served one."""
        return self.checkpoint.is_dir() and layout.step_of(self.checkpoint) is None


@dataclass(frozen=True)
class ServedModel:
    """One loaded generator on its device; immutable, replaced as a whole when a newer step arrives."""

    model: LoadedModel
    device: torch.device
    step: Optional[int]  # training step of a checkpoint directory; None for a single file
    source: str

    @property
    def size_hw(self) -> tuple[int, int]:
        return generation_size(self.model.cfg)

    @property
    def use_vae(self) -> bool:
        return bool(getattr(self.model.generator, "use_vae", False))


def _load(spec: ModelSpec, checkpoint: Path, step: Optional[int], device: torch.device) -> ServedModel:
    loaded = load_model(checkpoint, spec.encoder, spec.preset, spec.config, spec.overrides)
    generator = loaded.generator.to(device)
    encoder = loaded.encoder.to(device) if loaded.encoder is not None else None
    return ServedModel(LoadedModel(generator, encoder, loaded.cfg, loaded.source), device, step, str(checkpoint))


def newest_committed_step(run_dir: Path) -> Path:
    """The newest step directory of a run whose marker validates (sizes of every file)."""
    try:
        return layout.find_latest(run_dir, check_sha256=False)
    except layout.InvalidCheckpoint as exc:
        raise GenerateError(str(exc)) from exc


def verified(step_dir: Path) -> Path:
    """``step_dir`` after checking every file against the sha256 its marker records (a checkpoint is
    external input: a bit flip must not turn into weights)."""
    try:
        layout.validate_step_dir(step_dir, check_sha256=True)
    except layout.InvalidCheckpoint as exc:
        raise GenerateError(str(exc)) from exc
    return step_dir


def load_served_model(spec: ModelSpec, device: torch.device) -> ServedModel:
    """The generator ``spec`` names; for a run directory its newest committed checkpoint."""
    checkpoint = spec.checkpoint
    if not checkpoint.exists():
        raise GenerateError(f"--checkpoint: not found: {checkpoint}")
    if spec.follows_run:
        checkpoint = verified(newest_committed_step(checkpoint))
    elif checkpoint.is_dir():
        checkpoint = verified(checkpoint)
    return _load(spec, checkpoint, layout.step_of(checkpoint) if checkpoint.is_dir() else None, device)


class ModelHolder:
    """The model currently served. Readers take a reference (:meth:`get`) and keep using it for a whole
    batch; :meth:`poll` swaps in a newer committed checkpoint of the followed run."""

    def __init__(self, spec: ModelSpec, served: ServedModel, log: Callable[[str], None]) -> None:
        self.spec = spec
        self._served = served
        self._lock = threading.Lock()
        self._log = log
        self.last_error: Optional[str] = None
        self._failed: Optional[Path] = None  # newest step that failed to load: not re-hashed every poll

    def get(self) -> ServedModel:
        with self._lock:
            return self._served

    def poll(self) -> bool:
        """Load the run's newest committed step if it is newer than the served one. Returns True on a
        swap. A checkpoint that fails to load (pruned meanwhile, corrupt) is reported (``last_error``,
        shown in the page) and the current model stays until a newer step is committed."""
        if not self.spec.follows_run:
            return False
        current = self.get()
        try:
            latest = newest_committed_step(self.spec.checkpoint)
            step = layout.step_of(latest)
            if (current.step is not None and step is not None and step <= current.step) or latest == self._failed:
                return False
        except (ValueError, OSError) as exc:  # no committed checkpoint left (pruned, directory gone)
            return self._report(f"cannot list the checkpoints of {self.spec.checkpoint}: {exc}")
        try:
            served = _load(self.spec, verified(latest), step, current.device)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            self._failed = latest
            return self._report(f"cannot load {latest}: {exc}")
        if served.size_hw != current.size_hw or served.model.cfg.data.label_nc != current.model.cfg.data.label_nc:
            self._failed = latest
            return self._report(f"{latest}: label_nc / size differ from the served model; restart spade-serve "
                                "to serve it")
        with self._lock:
            self._served = served
        self.last_error = None
        self._log(f"serving {latest} (step {step})")
        return True

    def _report(self, message: str) -> bool:
        if message != self.last_error:
            self._log(message)
        self.last_error = message
        return False


class Follower:
    """Background thread calling :meth:`ModelHolder.poll` every ``poll_seconds`` until stopped."""

    def __init__(self, holder: ModelHolder, poll_seconds: float) -> None:
        self.holder = holder
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spade-serve-follower", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.holder.poll()

    def start(self) -> None:
        if self.holder.spec.follows_run:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def class_names(label_nc: int, manifests: Sequence[dict]) -> list[str]:
    """Brush names: the ``class_names`` of the first shard manifest that lists ``label_nc`` of them,
    else ``class <id>``. Names come from files the user pointed at; the page shows them as text only."""
    for manifest in manifests:
        names = manifest.get("class_names")
        if isinstance(names, list) and len(names) == label_nc:
            return [str(name)[:64] for name in names]
    return [f"class {i}" for i in range(label_nc)]
