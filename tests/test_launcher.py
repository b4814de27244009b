"""spade_dist.launcher's decision after a launch (no processes: the workers' codes and the run's markers
as the agent leaves them). The launches themselves: tests/test_hostile_inputs.py, row 12."""
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Optional

import pytest

from spade_dist.exit_codes import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_UNHEALTHY, EXIT_USAGE
from spade_dist.launcher import LaunchOutcome, StopRelay, launch_outcome
from spade_dist.run_dir import RunDir
from tests.kit import tiny_config


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
