"""spade_dist.launcher's decision after a launch (no processes: the workers' codes and the run's markers
as the agent leaves them). The launches themselves: tests/test_hostile_inputs.py, row 12."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from spade_dist.exit_codes import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_UNHEALTHY, EXIT_USAGE
from spade_dist.launcher import LaunchOutcome, StopRelay, launch_outcome
from spade_dist.run_dir import RunDir
from tests.kit import cli_env, tiny_config


def _outcome(tmp_path: Path, failed: Optional[tuple[int, int]], markers: dict[str, dict],
             first: Optional[signal.Signals] = None, aborted: bool = False) -> LaunchOutcome:
    run = RunDir(tmp_path / "run")
    run.health.mkdir(parents=True)
    for name, payload in markers.items():
        (run.root / name).write_text(json.dumps(payload))
    relay = StopRelay()
    relay.first, relay.aborted = first, aborted
    return launch_outcome(tiny_config(f"train.run_dir={run.root}"), failed, relay)


REQUEUED = {"REQUEUE": {"step": 7, "reason": "SIGINT", "exit_code": 75, "time": 0.0}}
STOPPED_UNHEALTHY = {"health/verdict.json": {"status": "stopped", "line": "health: nonfinite at step 5"}}

CASES = [  # (first failing worker, markers, signal the launcher got, aborted) -> (code, error?, line part)
    (None, {"DONE": {"step": 20, "time": 0.0}}, None, False, 0, False, ""),
    (None, {}, None, False, EXIT_FAILURE, True, "wrote neither DONE nor REQUEUE"),
    ((0, 75), REQUEUED, signal.SIGINT, False, 75, False,
     "stopped by Ctrl-C: checkpoint of step 7 committed and the run asked for a requeue (worker exit code 75)"),
    ((1, 75), {"REQUEUE": {**REQUEUED["REQUEUE"], "reason": "stop-file:/r/STOP"}}, None, False, 75, False,
     "stopped by stop-file:/r/STOP"),
    ((0, 75), {}, signal.SIGTERM, False, 75, True, "rank 0: training failed with exit code 75"),
    ((1, EXIT_USAGE), REQUEUED, None, False, EXIT_USAGE, True,  # a stale REQUEUE of an earlier launch
     "rank 1 failed with exit code 2: bad input"),
    ((0, EXIT_ENVIRONMENT), {}, None, False, EXIT_ENVIRONMENT, True, "committed checkpoints are intact"),
    ((0, EXIT_FAILURE), {}, None, False, EXIT_FAILURE, True, "its traceback is above"),
    ((0, EXIT_UNHEALTHY), STOPPED_UNHEALTHY, None, False, EXIT_UNHEALTHY, True,
     "rank 0: stopped by the run-health monitor: health: nonfinite at step 5"),
    ((1, -9), {}, None, False, 137, True, "rank 1 was killed by SIGKILL"),
    ((1, -2), {}, signal.SIGINT, False, EXIT_INTERRUPTED, True, "rank 1 failed with exit code 130: interrupted before "
     "training started"),
    ((0, -9), {}, signal.SIGINT, True, EXIT_INTERRUPTED, True, "aborted by a second Ctrl-C"),
]


@pytest.mark.parametrize("failed, markers, first, aborted, code, error, line", CASES)
def test_outcome_keeps_the_workers_code_and_says_what_happened(tmp_path: Path, failed, markers, first, aborted,
                                                                code, error, line) -> None:
    outcome = _outcome(tmp_path, failed, markers, first, aborted)
    assert (outcome.exit_code, outcome.error) == (code, error)
    assert line in outcome.line and "\n" not in outcome.line


# The node agent (python -m spade_dist.launcher TORCHRUN_ARGS, slurm/train_gaugan.sh): a stand-in worker
# that waits for SIGTERM and exits with the requeue code, as a training worker does after its checkpoint.
_WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
open(os.path.join(sys.argv[1], "ready-" + os.environ["RANK"]), "w").close()
time.sleep(120)
"""


@pytest.mark.dist
def test_node_agent_forwards_sigterm_and_ends_in_one_line_with_the_workers_code(tmp_path: Path) -> None:
    """A scheduler's SIGTERM to torchrun's agent would end in its SignalException traceback and exit 1; the
    node agent forwards it to the workers, waits for them and exits with their code in one line."""
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    agent = subprocess.Popen([sys.executable, "-m", "spade_dist.launcher", "--standalone", "--nproc-per-node", "2",
                              str(worker), str(tmp_path)], env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2:
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0]
        time.sleep(0.2)
    agent.send_signal(signal.SIGTERM)
    out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 75, out
    assert "Traceback" not in out and "SignalException" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("spade-train node agent on ")]
    assert len(lines) == 1 and "stopped by SIGTERM, forwarded to the workers; rank" in lines[0] \
        and "exited with code 75" in lines[0], out
