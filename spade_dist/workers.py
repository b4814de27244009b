"""Worker processes die with their launcher.

``accelerate launch``, ``torchrun`` and the ``deepspeed`` launcher start the training processes as
children (torch's elastic agent puts each worker in its own session), and ``srun`` starts them under
slurmstepd. When the launcher itself is killed (kill -9, an unhandled SIGUSR1, an OOM kill) nothing
tells the workers: they were measured to keep running as orphans (parent pid 1) and to keep writing
checkpoints into the run directory that the next job then also writes. Linux's parent-death signal
closes that hole: the kernel sends the worker SIGKILL the moment its parent ends. SIGKILL, not
SIGTERM: a SIGTERM would start a coordinated checkpoint-and-stop that cannot complete once the peers
are gone, and the owner lock is released by the kernel either way.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from pathlib import Path
from typing import Optional

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Set by accelerate launch / torchrun / deepspeed (LOCAL_RANK, TORCHELASTIC_RUN_ID) and srun (SLURM_STEP_ID).
LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID")


def launcher_variable() -> Optional[str]:
    """The first of :data:`LAUNCHER_ENV` that is set, or None outside a launcher."""
    return next((name for name in LAUNCHER_ENV if name in os.environ), None)


def launched_by_a_launcher() -> bool:
    return launcher_variable() is not None


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits. Returns False where
    the platform has no parent-death signal (not Linux). If the parent is already gone by the time
    the request is in place, this process exits at once (the kernel would not signal it any more)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:  # the launcher died between the two calls: we are an orphan already
        os._exit(128 + int(sig))
    return True


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (a launcher's workers: torch's elastic agent starts each in its own
    session, so a terminal's Ctrl-C reaches only the launcher). Linux's ``/proc/PID/task/TID/children``;
    a thread that ends while it is read has no children left to list."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found
