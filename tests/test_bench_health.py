"""bench/health.py reports the monitor's parts and its share of the step time (what it claims, not how fast)."""
from __future__ import annotations

import json

import pytest


def test_health_bench_reports_parts_and_the_same_run_ratio(capsys) -> None:
    from bench.health import main

    out = main(["--config", "configs/tiny.yaml", "--iters", "1", "--threads", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))
    assert out["schedules"] == {"log_every": 2, "collapse_every": 10, "consistency_every": 100}
    for part in ("step_s", "observe_s", "judge_s", "collapse_s", "drift_s"):
        assert out[part] > 0, part
    per_step = out["observe_s"] + out["judge_s"] / 2 + out["collapse_s"] / 10 + out["drift_s"] / 100
    assert out["monitor_s_per_step"] == pytest.approx(per_step)
    assert out["overhead"] == pytest.approx(per_step / out["step_s"])
