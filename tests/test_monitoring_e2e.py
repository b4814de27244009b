"""THE monitoring test: a real Prometheus discovers a real 2-rank CPU training run through its file_sd file,
and every PromQL expression of the Grafana dashboard and of the alert rules returns data over the HTTP API.

The expressions are read from the checked-in dashboard JSON and alerts.yml, never retyped here. Alert
expressions have the form ``<signal> <op> <threshold>`` (see alerts.yml): a healthy run must not fire
them, so the test requires each *signal* to return data and each full expression (and rule) to evaluate
without error. Dashboard variables are substituted with the run's labels and ``$__rate_interval`` with
a window holding many 1 s scrapes.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from spade_dist.config import MetricsConfig
from spade_dist.metrics import EvalMetrics
from spade_dist.monitoring.dashboard import TRAIN_SCRAPE_JOB, panel_expressions, variable_selectors
from spade_dist.monitoring.services import Prometheus, start_prometheus
from tests.dist_utils import run_distributed
from tests.monitoring_job import train_with_metrics

RUN, JOB_ID = "e2e-run", "4242"
RATE_INTERVAL = "20s"
_THRESHOLD = re.compile(r"^(?P<signal>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>[0-9.eE+-]+)\s*$", re.S)


def alert_signals(alerts_path: Path) -> list[tuple[str, str, str]]:
    """``(alert name, full expression, signal expression)`` of every alert rule."""
    out = []
    for group in yaml.safe_load(alerts_path.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            expr = " ".join(rule["expr"].split())
            match = _THRESHOLD.match(expr)
            assert match, f"alert {rule['alert']}: expression is not '<signal> <op> <threshold>': {expr}"
            out.append((rule["alert"], expr, match["signal"]))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    subst = {"$run": RUN, "$job_id": JOB_ID, "$__rate_interval": RATE_INTERVAL}
    out = []
    for title, expr in panel_expressions(dashboard):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"panel {title}: unsubstituted variable in {expr}"
        out.append((f"panel {title}", expr))
    for name, selector, _label in variable_selectors(dashboard):
        out.append((f"variable {name}", selector.replace("$run", RUN)))
    return out


def write_test_prometheus_config(repo_root: Path, sd_dir: Path, out: Path) -> None:
    """The shipped prometheus.yml with test timings, this test's sd dir and absolute rule paths."""
    cfg = yaml.safe_load((repo_root / "configs/monitoring/prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    cfg["rule_files"] = [str(repo_root / "configs/monitoring" / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    train = jobs[TRAIN_SCRAPE_JOB]
    train["file_sd_configs"] = [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}]
    # No Pushgateway runs in this test; its static target would only add a down target.
    cfg["scrape_configs"] = [train]
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _empty(prom: Prometheus, queries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(what, expr) for what, expr in queries if not prom.query(expr)]


@pytest.mark.e2e
@pytest.mark.dist
def test_prometheus_discovers_two_rank_run_and_every_expression_has_data(repo_root: Path, tmp_path: Path) -> None:
    sd_dir, run_dir, stop_file = tmp_path / "sd", tmp_path / "runs" / RUN, tmp_path / "STOP"
    sd_dir.mkdir()
    prom_cfg = tmp_path / "prometheus.yml"
    write_test_prometheus_config(repo_root, sd_dir, prom_cfg)
    dashboard = json.loads((repo_root / "configs/monitoring/grafana/spade_dist.json").read_text())
    alerts = alert_signals(repo_root / "configs/monitoring/alerts.yml")
    queries = dashboard_queries(dashboard) + [(f"alert {name} signal", signal) for name, _, signal in alerts]

    metrics_cfg = MetricsConfig(enabled=True, port_base=0, bind="127.0.0.1", sd_dir=str(sd_dir), job_id=JOB_ID)
    outcome: dict[str, Any] = {}

    def run_job() -> None:
        try:
            outcome["results"] = run_distributed(
                train_with_metrics, world_size=2, args=(str(run_dir), metrics_cfg, str(stop_file), 150.0), timeout=240)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = exc

    with start_prometheus(prom_cfg, tmp_path / "prom") as prom:
        evaluator = EvalMetrics(metrics_cfg, run_dir=run_dir)  # the FID watcher beside the run
        evaluator.start()
        job = threading.Thread(target=run_job, daemon=True)
        job.start()
        try:
            sd_file = sd_dir / f"{RUN}-{JOB_ID}.json"
            deadline = time.monotonic() + 60
            while not sd_file.exists() and "error" not in outcome and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sd_file.exists(), f"no file_sd file from the run: {outcome.get('error')}"
            targets = json.loads(sd_file.read_text())
            assert [g["labels"]["rank"] for g in targets] == ["0", "1"]

            evaluator.record(step=5, fid=80.0, kid_mean=0.08, kid_std=0.01, seconds=1.0)
            evaluator.record(step=10, fid=70.0, kid_mean=0.07, kid_std=0.01, seconds=1.0)

            # Poll (targets are applied every ~5 s; rates need a few scrapes): every query must get data.
            deadline = time.monotonic() + 90
            missing = queries
            while missing and time.monotonic() < deadline and "error" not in outcome:
                time.sleep(2)
                missing = _empty(prom, missing)
            assert "error" not in outcome, outcome.get("error")
            assert not missing, "expressions without data:\n" + "\n".join(f"{w}: {e}" for w, e in missing)

            # Both ranks and the evaluator were discovered and are up.
            active = prom.api("targets")["activeTargets"]
            up = {(t["labels"].get("rank"), t["labels"].get("role")): t["health"] for t in active
                  if t["labels"]["job"] == TRAIN_SCRAPE_JOB and t["labels"].get("run") == RUN}
            assert up == {("0", None): "up", ("1", None): "up", (None, "eval"): "up"}, active
            ranks_up = prom.query(f'up{{job="{TRAIN_SCRAPE_JOB}", run="{RUN}", rank!=""}}')
            assert sorted(r["metric"]["rank"] for r in ranks_up) == ["0", "1"]
            assert all(r["value"][1] == "1" for r in ranks_up)

            # Full alert expressions evaluate, nothing fires for a healthy run, every rule is healthy.
            for name, expr, _signal in alerts:
                assert prom.query(expr) == [], f"alert {name} fires on a healthy run: {expr}"
            rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            # Rules are evaluated every second here; by now each has run many times.
            assert all(not r["lastEvaluation"].startswith("0001-") for r in rules), rules
            assert {r["name"] for r in rules} == {name for name, _, _ in alerts}
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

            # Labels the dashboard relies on came through honor_labels unchanged (no exported_* copies).
            steps = prom.query(f'spade_step{{run="{RUN}", job_id="{JOB_ID}"}}')
            assert sorted(r["metric"]["rank"] for r in steps) == ["0", "1"]
            assert not any(k.startswith("exported_") for r in steps for k in r["metric"])
        finally:
            stop_file.touch()
            job.join(240)
            evaluator.close()

    assert not job.is_alive(), "training job did not stop"
    assert "error" not in outcome, outcome.get("error")
    results = outcome["results"]
    assert not any(r["timed_out"] for r in results), "the job ran into its own time limit"
    assert results[0]["steps"] == results[1]["steps"] > 5
    assert list(sd_dir.iterdir()) == [], "discovery files must be removed when the job and evaluator exit"
    log_lines = (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()
    assert len(log_lines) == results[0]["steps"]
