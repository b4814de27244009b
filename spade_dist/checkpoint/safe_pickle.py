"""Allow-list unpickling of the pickles inside a step directory.

DCP's ``.metadata`` file, and the skeletons / RNG states this project stores as bytes items, are
pickles. A plain ``pickle.load`` would run whatever a crafted file names (``os.system`` ...), and the
``COMMITTED`` marker's sha256 cannot help when the writer also rewrote the marker. Every pickle read
from a checkpoint goes through :func:`safe_loads` / :class:`SafeUnpickler`: only the classes a
checkpoint consists of can be named; anything else raises :class:`UnsafePickleError` before it runs.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Callable, Union

import torch

# (module, name) pairs a checkpoint pickle may name. DCP metadata: its dataclasses, torch.Size,
# dtypes and layouts. Skeletons: containers only. RNG states: a CPU/CUDA byte tensor, numpy's state
# tuple (an ndarray of uint32), Python's ``random`` state (tuples of ints).
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint pickle names something outside the allow-list (a crafted or foreign file)."""


def _load_storage_bytes(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes`` (how a pickled tensor's storage comes back),
    which would ``torch.load(weights_only=False)`` the nested bytes."""
    return torch.load(io.BytesIO(data), weights_only=True)


_SUBSTITUTES: dict[tuple[str, str], Callable[..., Any]] = {("torch.storage", "_load_from_bytes"): _load_storage_bytes}


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the allow-listed globals (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SUBSTITUTES:
            return _SUBSTITUTES[(module, name)]
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: not a checkpoint class "
                                "(a crafted or foreign file; only load checkpoints written by spade-dist)")


def safe_load(stream: Union[io.BufferedIOBase, io.BytesIO]) -> Any:
    return SafeUnpickler(stream).load()


def safe_loads(data: Union[bytes, bytearray]) -> Any:
    return SafeUnpickler(io.BytesIO(data)).load()
