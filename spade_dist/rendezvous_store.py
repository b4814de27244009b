"""The rendezvous store of a multi-node torchrun launch, hosted outside every launcher.

torchrun's agents meet in a TCP store: they rendezvous in it, their workers build the process group
through it, and when the workers are done each agent waits in an *exit barrier* in it for the
others. If one agent hosts the store (torchrun's default: the node named by the rendezvous
endpoint), that agent leaves as soon as its own barrier is passed and takes the store with it,
while another node's agent may still be finishing its last request: that agent then logs "Error
waiting on exit barrier ... DistNetworkError: Failed to recv" with a traceback at the end of a
successful run. ``slurm/train_gaugan.sh`` therefore runs this store in the batch shell for the
whole job step (``spade-run rendezvous --port P``) and starts every agent with
``--rdzv-conf=is_host=false``: the store outlives every agent, so no node can leave first.
"""
from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch.distributed as dist


class StorePortBusy(RuntimeError):
    """The store cannot listen on the port asked for (the message names it)."""


def serve_rendezvous_store(port: int, ready_file: Optional[Path] = None) -> None:
    """Host a TCP store on ``port`` (every interface) until SIGHUP or SIGINT, then return.

    SIGTERM is ignored on purpose: Slurm sends it to every process of a job it requeues or cancels,
    while the launchers still need the store to stop their workers and leave cleanly; the batch
    script stops the store (SIGHUP) once every launcher has exited, and Slurm's SIGKILL after
    ``KillWait`` ends it in any case. ``ready_file`` is written (the port, atomically) once the store
    listens, so that a batch script starts the launchers only then, and never against another
    program that holds the port.
    """
    stop_signals = {signal.SIGHUP, signal.SIGINT}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for signum in stop_signals:  # a shell starts background jobs with SIGINT ignored
        signal.signal(signum, signal.SIG_DFL)
    # Blocked before the store starts its thread (threads inherit the mask): sigwait gets them all.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        try:
            store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, multi_tenant=True,
                                  timeout=timedelta(seconds=60))
        except RuntimeError as exc:  # torch's DistNetworkError: EADDRINUSE, EACCES, ...
            reason = " ".join(str(exc).split())
            raise StorePortBusy(f"cannot listen on port {port} for the rendezvous store ({reason})") from exc
        if ready_file is not None:
            partial = ready_file.with_name(ready_file.name + ".partial")
            partial.write_text(f"{store.port}\n")
            os.replace(partial, ready_file)
        signal.sigwait(stop_signals)
        del store
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
