"""THE monitoring test: a real Prometheus discovers a real 2-rank CPU ``spade-train`` run (gloo, synchronized
BN) through its file_sd file, and every PromQL expression of the Grafana dashboard and of the alert rules
returns data over the HTTP API.

The two training processes are started the way a launcher (torchrun, srun) starts them: one process per
rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The run trains until the test
sends SIGUSR1 (the preemption signal): it checkpoints, removes its discovery file and exits with the
requeue code. An EvalMetrics publisher stands in for the evaluation watcher (real scores need Inception weights and a segmenter).

The expressions are read from the checked-in dashboard JSON and alerts.yml, never retyped here. Alert
expressions have the form ``<signal> <op> <threshold>`` (see alerts.yml): a healthy run must not fire
them, so the test requires each *signal* to return data and each full expression (and rule) to evaluate
without error. Dashboard variables are substituted with the run's labels and ``$__rate_interval`` with
a window holding many 1 s scrapes.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from spade_dist.config import MetricsConfig
from spade_dist.monitoring.dashboard import TRAIN_SCRAPE_JOB, panel_expressions, variable_selectors
from spade_dist.monitoring.exporter import EvalMetrics
from spade_dist.monitoring.report import write_report
from spade_dist.monitoring.services import Prometheus, render_prometheus_config, start_prometheus
from tests.dist_utils import free_port
from tests.kit import REPO_ROOT, cli_env, synthetic_shards, tiny_config, train_cmd, wait_for

RUN, JOB_ID, EVAL_JOB_ID = "e2e-run", "4242", "4243"
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
    # $rank as Grafana sends the default "All" of the multi-select (allValue) and a two-rank selection.
    subst = {"$run": RUN, "$job_id": JOB_ID, "$__rate_interval": RATE_INTERVAL, "$rank": "(.+|0|1)"}
    out = []
    for title, expr in panel_expressions(dashboard):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"panel {title}: unsubstituted variable in {expr}"
        out.append((f"panel {title}", expr))
    for name, selector, _label in variable_selectors(dashboard):
        for var, value in subst.items():
            selector = selector.replace(var, value)
        out.append((f"variable {name}", selector))
    return out


def _empty(prom: Prometheus, queries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(what, expr) for what, expr in queries if not prom.query(expr)]


def start_training(tmp_path: Path, manifest: Path, run_dir: Path, sd_dir: Path) -> list[subprocess.Popen]:
    overrides = [
        f"data.shards={manifest}", "data.val_shards=", f"train.run_dir={run_dir}", "train.max_steps=100000",
        "train.log_every=1", "train.sample_every=1000000", "checkpoint.every_steps=3",
        "train.health.collapse_every=3", "train.health.consistency_every=3",  # every health panel gets data
        "checkpoint.async_save=false", "metrics.enabled=true", "metrics.port_base=0", "metrics.bind=127.0.0.1",
        f"metrics.sd_dir={sd_dir}", f"metrics.job_id='{JOB_ID}'",  # quoted: YAML would read 4242 as an int
    ]
    port = free_port()
    procs = []
    for rank in range(2):
        env = cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(tmp_path / f"train-rank{rank}.log", "wb")
        procs.append(subprocess.Popen(train_cmd("--resume", "none", *overrides), cwd=REPO_ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- rank {r} ---\n" + (tmp_path / f"train-rank{r}.log").read_text(errors="replace")[-3000:]
                     for r in range(2))


@pytest.mark.e2e
@pytest.mark.dist
def test_prometheus_discovers_two_rank_spade_train_and_every_expression_has_data(repo_root: Path, tmp_path: Path) -> None:
    sd_dir, run_dir = tmp_path / "sd", tmp_path / "runs" / RUN
    sd_dir.mkdir()
    # The shipped prometheus.yml with 1 s scrapes, this test's sd dir, no Pushgateway job.
    prom_cfg = render_prometheus_config(sd_dir, tmp_path / "prometheus.yml", scrape_interval="1s")
    dashboard = json.loads((repo_root / "configs/monitoring/grafana/spade_dist.json").read_text())
    alerts = alert_signals(repo_root / "configs/monitoring/alerts.yml")
    queries = dashboard_queries(dashboard) + [(f"alert {name} signal", signal) for name, _, signal in alerts]
    manifest = synthetic_shards(tmp_path / "data", count=16, val_count=4)
    requeue_code = tiny_config().checkpoint.requeue_exit_code

    with start_prometheus(prom_cfg, tmp_path / "prom") as prom:
        # The evaluation watcher, as its own (Slurm) job: same run label, another job_id, its own discovery file.
        evaluator = EvalMetrics(MetricsConfig(enabled=True, sd_dir=str(sd_dir), job_id=EVAL_JOB_ID), run_dir=run_dir)
        evaluator.start()
        procs = start_training(tmp_path, manifest, run_dir, sd_dir)
        try:
            sd_file = sd_dir / f"{RUN}-{JOB_ID}.json"
            wait_for(sd_file.exists, 120, "the file_sd file from spade-train", poll=0.2, procs=procs,
                     log=lambda: _logs(tmp_path))
            targets = json.loads(sd_file.read_text())
            assert [g["labels"]["rank"] for g in targets] == ["0", "1"]

            # Two scored checkpoints with every metric (what the watcher passes: the record, the best values).
            for step, fid, miou in ((3, 80.0, 0.30), (6, 70.0, 0.35)):
                record = {"fid": fid, "kid_mean": fid / 1000, "kid_std": 0.01, "miou": miou, "pixel_accuracy": 0.6,
                          "real": {"miou": 0.5, "pixel_accuracy": 0.8}, "seconds": 1.0}
                best = {"fid": fid, "kid": fid / 1000, "miou": miou, "pixel_accuracy": 0.6}
                evaluator.record(step, record, best, step)

            # Poll (targets are applied every ~5 s; rates need a few scrapes): every query must get data.
            deadline = time.monotonic() + 120
            missing = queries
            while missing and time.monotonic() < deadline and all(p.poll() is None for p in procs):
                time.sleep(2)
                missing = _empty(prom, missing)
            assert all(p.poll() is None for p in procs), "spade-train exited early:\n" + _logs(tmp_path)
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
            assert {r["name"] for r in rules} == {name for name, _, _ in alerts}
            # Rules are evaluated every second here; by now each has run many times.
            assert all(not r["lastEvaluation"].startswith("0001-") for r in rules), rules
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

            # Labels the dashboard relies on came through honor_labels unchanged (no exported_* copies).
            steps = prom.query(f'spade_step{{run="{RUN}", job_id="{JOB_ID}"}}')
            assert sorted(r["metric"]["rank"] for r in steps) == ["0", "1"]
            assert not any(k.startswith("exported_") for r in steps for k in r["metric"])
        finally:
            for p in procs:  # the preemption signal: checkpoint, clean up, exit with the requeue code
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(120))
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes.append(p.wait())
            evaluator.close()

    assert codes == [requeue_code, requeue_code], f"exit codes {codes}:\n" + _logs(tmp_path)
    assert list(sd_dir.iterdir()) == [], "discovery files must be removed when the job and evaluator exit"
    records = [json.loads(line) for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # log_every=1
    assert all(set(r["grad_norms"]) == {"G", "D"} for r in records)
    # The report for people without Grafana, from the same real run directory.
    page = write_report(run_dir).read_text()
    for chart in ("Losses", "Throughput", "Data-wait share", "Learning rate"):
        assert f'aria-label="{chart}"' in page
