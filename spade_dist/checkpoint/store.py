"""Reading and writing one checkpoint step directory with ``torch.distributed.checkpoint`` (DCP).

Why a flat layout instead of handing DCP the nested state dicts directly: DCP rebuilds nested
containers from its metadata by key *type* (an ``int`` key becomes a list index), so an optimizer's
``state`` dict keyed by parameter index would come back as a list. We therefore split every
top-level entry of the application state into

- its tensors, stored as DCP tensors under a dotted key (``train.optimizer_G.state.0.exp_avg``), and
- a *skeleton*: the same tree with each tensor replaced by a reference string, pickled as one bytes
  item (``__skeleton__.train``).

Tensors with the same key on every rank (replicated DDP parameters, optimizer state) are written
once (DCP de-duplicates them across ranks), and any number of processes can later read them, which
is what makes resuming on a different world size possible. Reading never needs a process group:
each process reads what it needs directly (``no_dist=True``). Every pickle in a step directory (DCP's
``.metadata``, skeletons, RNG states) is read through the allow-list unpickler of
:mod:`spade_dist.checkpoint.safe_pickle`, so a crafted checkpoint fails with one line and runs nothing.
"""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from spade_dist.checkpoint.safe_pickle import UnsafePickleError, safe_load, safe_loads

SKELETON_PREFIX = "__skeleton__."
TENSOR_REF = "__dcp_tensor__:"


class CheckpointReadError(RuntimeError):
    """A step directory cannot be read (missing, truncated or corrupt file, unknown key)."""


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _stage_copy(tensor: torch.Tensor, key: str, buffers: Optional[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Copy ``tensor`` into CPU memory owned by the checkpoint, reusing last save's buffer of the
    same key: fresh allocations of hundreds of MB cost more in page faults than the copy itself.
    Reuse is safe because at most one save is in flight (the next one waits before staging)."""
    buf = buffers.get(key) if buffers is not None else None
    if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
        buf = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                          pin_memory=tensor.device.type == "cuda")
        if buffers is not None:
            buffers[key] = buf
    buf.copy_(tensor, non_blocking=tensor.device.type == "cuda")
    return buf


def split_tensors(name: str, tree: Any, clone: bool,
                  buffers: Optional[dict[str, torch.Tensor]] = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (skeleton, tensors): the tree with tensors replaced by ``TENSOR_REF + key``.

    ``clone`` copies every tensor to CPU memory the caller owns (staging for an asynchronous write:
    training may mutate parameters in place right after this returns); ``buffers`` keeps those
    copies between saves. Without ``clone`` only device tensors are copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    copied_from_device = False

    def walk(node: Any, path: str) -> Any:
        nonlocal copied_from_device
        if isinstance(node, torch.Tensor):
            if path in tensors:
                raise ValueError(f"checkpoint: two tensors map to the same key '{path}' (keys containing '.')")
            tensor = node.detach()
            if clone or tensor.device.type != "cpu":
                copied_from_device |= tensor.device.type == "cuda"
                tensor = _stage_copy(tensor, path, buffers if clone else None)
            tensors[path] = tensor
            return TENSOR_REF + path
        if isinstance(node, dict):
            return {k: walk(v, _join(path, k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [walk(v, _join(path, i)) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    skeleton = walk(tree, name)
    if copied_from_device:
        torch.cuda.synchronize()  # non_blocking device->host copies must land before writing
    return skeleton, tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, str) and skeleton.startswith(TENSOR_REF):
        return tensors[skeleton[len(TENSOR_REF):]]
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(join_tensors(v, tensors) for v in skeleton)
    return skeleton


def tensor_refs(skeleton: Any) -> list[str]:
    """All tensor keys a skeleton refers to."""
    out: list[str] = []
    if isinstance(skeleton, str) and skeleton.startswith(TENSOR_REF):
        out.append(skeleton[len(TENSOR_REF):])
    elif isinstance(skeleton, dict):
        for v in skeleton.values():
            out += tensor_refs(v)
    elif isinstance(skeleton, (list, tuple)):
        for v in skeleton:
            out += tensor_refs(v)
    return out


def build_flat_state(trees: dict[str, Any], objects: dict[str, Any], clone: bool,
                     buffers: Optional[dict[str, torch.Tensor]] = None) -> dict[str, Any]:
    """The flat dict handed to DCP: tensors of every tree, one pickled skeleton per tree, and
    extra picklable ``objects`` (per-rank RNG, metadata) stored as bytes under their own key."""
    flat: dict[str, Any] = {}
    for name, tree in trees.items():
        if "." in name:
            raise ValueError(f"checkpoint: top-level state name '{name}' must not contain '.'")
        skeleton, tensors = split_tensors(name, tree, clone=clone, buffers=buffers)
        flat.update(tensors)
        flat[SKELETON_PREFIX + name] = pickle.dumps(skeleton)
    for key, obj in objects.items():
        flat[key] = pickle.dumps(obj)
    return flat


def write_flat_state(flat: dict[str, Any], step_dir: Path, process_group: Optional[dist.ProcessGroup]) -> None:
    """Collective over ``process_group`` (or none when not distributed): every rank's part is
    written and the DCP ``.metadata`` exists when this returns on any rank."""
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # single process: intended
        dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(step_dir), sync_files=True),
                 process_group=None if no_dist else process_group, no_dist=no_dist)


class _SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader with its ``.metadata`` pickle loaded through the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as handle:
            metadata = safe_load(handle)
        if not isinstance(metadata, Metadata):
            raise UnsafePickleError(f"{self.path}/.metadata holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner without its ``torch.load(weights_only=False)`` of bytes items: an item
    comes back as the bytes it was saved as (our pickles, read by :func:`safe_loads`)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        item = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
        else:
            self.state_dict[read_item.dest_index.fqn] = item


class StepReader:
    """Single-process reader of a step directory: lists keys, reads selected items."""

    def __init__(self, step_dir: Path) -> None:
        self.step_dir = Path(step_dir)
        try:
            self.metadata: Metadata = _SafeFileSystemReader(str(self.step_dir)).read_metadata()
        except UnsafePickleError as exc:
            raise CheckpointReadError(f"{self.step_dir}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any failure means "unreadable"
            raise CheckpointReadError(f"{self.step_dir}: cannot read DCP metadata: {exc}") from exc

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def tree_names(self) -> list[str]:
        return [k[len(SKELETON_PREFIX):] for k in self.keys() if k.startswith(SKELETON_PREFIX)]

    def read(self, keys: list[str]) -> dict[str, Any]:
        """Read ``keys`` (tensors come back as CPU tensors, other items unpickled)."""
        md = self.metadata.state_dict_metadata
        missing = [k for k in keys if k not in md]
        if missing:
            raise CheckpointReadError(f"{self.step_dir}: keys not in checkpoint: {missing[:5]}")
        template: dict[str, Any] = {}
        for k in keys:
            entry = md[k]
            if isinstance(entry, TensorStorageMetadata):
                template[k] = torch.empty(entry.size, dtype=entry.properties.dtype)
            else:
                template[k] = b""
        if not template:
            return {}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(template, storage_reader=_SafeFileSystemReader(str(self.step_dir)),
                         planner=_SafeLoadPlanner(), no_dist=True)
        except Exception as exc:  # noqa: BLE001 - truncated / corrupt files surface here
            raise CheckpointReadError(f"{self.step_dir}: cannot read checkpoint data: {exc}") from exc
        out: dict[str, Any] = {}
        for k, v in template.items():
            try:
                out[k] = safe_loads(v) if isinstance(v, (bytes, bytearray)) else v
            except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as exc:
                raise CheckpointReadError(f"{self.step_dir}: cannot read item {k!r}: {exc}") from exc
        return out

    def read_tree(self, name: str, select: Optional[Callable[[Any], Any]] = None) -> Any:
        """Rebuild one top-level tree. ``select`` may cut the skeleton down first (e.g. to the
        generator's sub-dict), so that only the tensors it refers to are read."""
        skeleton_key = SKELETON_PREFIX + name
        skeleton = self.read([skeleton_key])[skeleton_key]
        if select is not None:
            skeleton = select(skeleton)
        tensors = self.read(tensor_refs(skeleton))
        return join_tensors(skeleton, tensors)

    def read_trees(self, names: list[str]) -> dict[str, Any]:
        """Rebuild several top-level trees with two reads (skeletons, then all their tensors)."""
        skeleton_keys = [SKELETON_PREFIX + n for n in names]
        skeletons = self.read(skeleton_keys)
        refs = [r for k in skeleton_keys for r in tensor_refs(skeletons[k])]
        tensors = self.read(refs)
        return {n: join_tensors(skeletons[SKELETON_PREFIX + n], tensors) for n in names}

    def read_objects(self, keys: list[str]) -> dict[str, Any]:
        """Read plain (non-tree) items; keys absent from the checkpoint are left out."""
        present = [k for k in keys if k in self.metadata.state_dict_metadata]
        return self.read(present)
