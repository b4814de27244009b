"""``spade-run rendezvous``: the rendezvous store that slurm/train_gaugan.sh hosts outside every launcher."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.kit import REPO_ROOT, cli_env


def _start(port: int, ready: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spade_dist.cli.run", "rendezvous", "--port", str(port),
                             "--ready-file", str(ready)], cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_store_serves_clients_through_sigterm_until_sighup(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = _start(0, ready)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        port = int(ready.read_text())
        # Two "agents" meet in it; the first one leaving does not take the store away from the second.
        first = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        second = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        assert first.add("members", 1) == 1 and second.add("members", 1) == 2
        del first
        # Slurm's TERM to every process of a requeued job does not take it away from the launchers.
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        second.set("last", "in")
        assert second.get("last") == b"in" and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGHUP)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and out == "", out


def test_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = _start(port, tmp_path / "ready")
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, out
    assert out.count("\n") == 1 and "Traceback" not in out, out
    assert out.startswith(f"spade-run: error: cannot listen on port {port} for the rendezvous store"), out
    assert not (tmp_path / "ready").exists()
