"""Per-rank random number generator state: capture, restore, and deterministic derivation.

Each rank's RNG streams (torch CPU, CUDA, numpy, python ``random``) are saved under its own rank.
When a run resumes on a different world size, a rank whose number has no saved state (e.g. rank 2
after a 1 -> 3 resume) gets all of its generators seeded from ``sha256(seed, step, rank)``: the
resumed run is still reproducible (same checkpoint + same world size => same streams), but it is
not bit-identical to any uninterrupted run, which no world-size change can give anyway.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def rng_key(rank: int) -> str:
    return f"rng.rank{rank}"


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], seed: int, step: int, rank: int) -> None:
    """Restore a captured state. CUDA streams are re-derived when the GPU count changed."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.manual_seed_all(derive_seed(seed, step, rank, "cuda"))


def derive_seed(seed: int, step: int, rank: int, purpose: str = "rng") -> int:
    text = f"spade-dist:{purpose}:{seed}:{step}:{rank}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def seed_derived_rng(seed: int, step: int, rank: int) -> int:
    """Seed every generator of this process for a rank that has no saved state; returns the seed."""
    derived = derive_seed(seed, step, rank)
    torch.manual_seed(derived)
    np.random.seed(derived % (1 << 32))
    random.seed(derived)
    return derived
