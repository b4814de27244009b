"""Monitoring configs: promtool checks, dashboard JSON == generator, Pushgateway push/delete (real binary)."""
from __future__ import annotations

import json
import shutil
import string
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from spade_dist.config import MetricsConfig
from spade_dist.monitoring import MetricsError
from spade_dist.monitoring.dashboard import (
    TRAIN_SCRAPE_JOB,
    build_dashboard,
    dashboard_json,
    panel_expressions,
    variable_selectors,
)
from spade_dist.monitoring.exporter import EvalMetrics
from spade_dist.monitoring.pushgateway import delete_job_metrics, push_job_metrics
from spade_dist.monitoring.services import render_prometheus_config, start_pushgateway


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        raise FileNotFoundError("promtool not on PATH: run launch/install_services.sh")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_config(repo_root: Path) -> None:
    res = promtool("check", "config", str(repo_root / "configs/monitoring/prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules(repo_root: Path) -> None:
    res = promtool("check", "rules", str(repo_root / "configs/monitoring/alerts.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "9 rules found" in res.stdout


def test_promtool_test_rules(repo_root: Path) -> None:
    res = promtool("test", "rules", str(repo_root / "configs/monitoring/alerts_test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_unit_test(repo_root: Path) -> None:
    rules = yaml.safe_load((repo_root / "configs/monitoring/alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((repo_root / "configs/monitoring/alerts_test.yml").read_text())
    firing = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    assert alerts == {"SpadeTrainingStalled", "SpadeRankTargetDown", "SpadeNonFiniteStepsRising",
                      "SpadeFIDRegressed", "SpadeMIoURegressed", "SpadeCheckpointTooOld", "SpadeCorruptSampleRate",
                      "SpadeRunShrank",
                      "SpadeHealthSignalFired"}
    assert alerts == firing == quiet


def test_promtool_test_rules_fails_on_a_broken_rule(repo_root: Path, tmp_path: Path) -> None:
    # Guards the guard: a threshold raised so the alert cannot fire must make the unit tests fail.
    text = (repo_root / "configs/monitoring/alerts.yml").read_text()
    assert "> 900" in text
    (tmp_path / "alerts.yml").write_text(text.replace("> 900", "> 90000"))
    shutil.copy(repo_root / "configs/monitoring/alerts_test.yml", tmp_path / "alerts_test.yml")
    res = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert res.returncode != 0 and "SpadeTrainingStalled" in res.stdout + res.stderr


def test_scrape_config_matches_the_dashboard(repo_root: Path) -> None:
    cfg = yaml.safe_load((repo_root / "configs/monitoring/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    train = jobs[TRAIN_SCRAPE_JOB]
    assert train["honor_labels"] is True and train["file_sd_configs"]
    assert jobs["pushgateway"]["honor_labels"] is True
    assert cfg["rule_files"] == ["alerts.yml"]
    # Alerts reach people through an Alertmanager (a stub address to edit, documented in MONITORING.md).
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


def test_rendered_local_config_is_valid(tmp_path: Path) -> None:
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    out = render_prometheus_config(sd_dir, tmp_path / "p.yml", scrape_interval="1s", pushgateway="127.0.0.1:9999")
    cfg = yaml.safe_load(out.read_text())
    assert cfg["global"]["scrape_interval"] == "1s" and cfg["global"]["scrape_timeout"] == "1s"
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs[TRAIN_SCRAPE_JOB]["file_sd_configs"][0]["files"] == [str(sd_dir.resolve() / "*.json")]
    assert jobs["pushgateway"]["static_configs"] == [{"targets": ["127.0.0.1:9999"]}]
    res = promtool("check", "config", str(out))  # also loads the rule files by their absolute paths
    assert res.returncode == 0 and "SUCCESS: 1 rule files found" in res.stdout, res.stdout + res.stderr
    assert "alerting" not in cfg  # local stack without an Alertmanager
    no_gateway = yaml.safe_load(render_prometheus_config(sd_dir, tmp_path / "q.yml").read_text())
    assert [j["job_name"] for j in no_gateway["scrape_configs"]] == [TRAIN_SCRAPE_JOB]
    paged = render_prometheus_config(sd_dir, tmp_path / "a.yml", alertmanager="alerts.example:9093")
    assert yaml.safe_load(paged.read_text())["alerting"]["alertmanagers"] == [
        {"static_configs": [{"targets": ["alerts.example:9093"]}]}]
    res = promtool("check", "config", str(paged))
    assert res.returncode == 0, res.stdout + res.stderr


def test_checked_in_dashboard_equals_generator(repo_root: Path) -> None:
    for relpath, provisioned in (("spade_dist.json", False), ("provisioned/spade_dist.json", True)):
        checked_in = (repo_root / "configs/monitoring/grafana" / relpath).read_text()
        assert checked_in == dashboard_json(provisioned), "regenerate: python -m spade_dist.monitoring.dashboard --write"


# Panels of the evaluation watcher's series: they follow the run across jobs (separate eval job, requeues).
EVAL_PANELS = ("FID", "KID", "Semantic fidelity", "Best checkpoint", "Evaluation time")


def test_dashboard_structure() -> None:
    d = build_dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "run", "job_id", "rank"]
    assert [v[0] for v in variable_selectors(d)] == ["run", "job_id", "rank"]
    rank = d["templating"]["list"][3]
    assert rank["multi"] and rank["includeAll"] and rank["allValue"] == ".+"
    # UI import asks for the data source (__inputs); its answer is the datasource variable's default.
    assert [(i["name"], i["type"], i["pluginId"]) for i in d["__inputs"]] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    assert d["templating"]["list"][0]["current"]["value"] == "${DS_PROMETHEUS}"
    titles = {p["title"] for p in d["panels"]}
    for needed in ("Throughput", "Step time breakdown", "Data-wait share", "Losses", "Learning rate", "FID", "KID", "Semantic fidelity", "Checkpoint age",
                   "Checkpoint save time", "Checkpoint size", "Rank targets up", "Heartbeat age", "Device memory",
                   "Health events", "Health streaks", "Loss spike score", "Generator output diversity", "Ranks drifted"):
        assert needed in titles
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for title, expr in panel_expressions(d):
        assert 'run="$run"' in expr, (title, expr)
        # Training panels show one job; the evaluation panels follow the run across jobs.
        assert ('job_id="$job_id"' in expr) == (title not in EVAL_PANELS), (title, expr)
    per_rank = {title for title, expr in panel_expressions(d) if 'rank=~"$rank"' in expr}
    assert per_rank == {"Throughput", "Rank targets up", "Heartbeat age", "Device memory"}
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in d["panels"] if p["type"] != "row"}
    assert units["Data-wait share"] == "percentunit"  # a ratio, not seconds
    assert units["Step time breakdown"] == "s" and units["Checkpoint size"] == "bytes"
    share = next(p for p in d["panels"] if p["title"] == "Data-wait share")
    assert (share["fieldConfig"]["defaults"]["min"], share["fieldConfig"]["defaults"]["max"]) == (0, 1)
    for panel in d["panels"]:  # every query goes through the datasource variable
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel.get("targets", []))


def _grafana_env_substitute(text: str, env: dict[str, str]) -> str:
    """Grafana's provisioning interpolation of $VAR / ${VAR}; an unset variable is an error here."""
    return string.Template(text).substitute(env)


def test_grafana_provisioning_loads_the_generated_dashboard(repo_root: Path, tmp_path: Path) -> None:
    from spade_dist.resources import monitoring_dir

    grafana = monitoring_dir() / "grafana"
    assert grafana.resolve() == (repo_root / "configs/monitoring/grafana").resolve()
    # The documented recipe's environment (docs/MONITORING.md, "Grafana").
    env = {"PROMETHEUS_URL": "http://127.0.0.1:9090", "SPADE_GRAFANA_DASHBOARDS": str(grafana / "provisioned")}
    doc = (repo_root / "docs/MONITORING.md").read_text()
    for name in (*env, "GF_PATHS_PROVISIONING", "configs/monitoring/grafana/provisioning",
                 "SPADE_GRAFANA_DASHBOARDS=$PWD/configs/monitoring/grafana/provisioned "):
        assert name in doc, name
    provisioning = grafana / "provisioning"
    assert sorted(p.relative_to(provisioning).as_posix() for p in provisioning.rglob("*.yaml")) == [
        "dashboards/spade_dist.yaml", "datasources/spade_prometheus.yaml"]

    sources = yaml.safe_load(_grafana_env_substitute(
        (provisioning / "datasources/spade_prometheus.yaml").read_text(), env))
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"] is True
    assert source["url"] == "http://127.0.0.1:9090" and source["uid"] and source["name"]
    prom_cfg = yaml.safe_load((repo_root / "configs/monitoring/prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]

    providers = yaml.safe_load(_grafana_env_substitute(
        (provisioning / "dashboards/spade_dist.yaml").read_text(), env))
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["name"]
    # What Grafana's file provider loads: every *.json under the path, recursively.
    loaded = sorted(Path(provider["options"]["path"]).rglob("*.json"))
    assert [p.name for p in loaded] == ["spade_dist.json"]
    assert loaded[0].read_text() == dashboard_json(provisioned=True)
    text = loaded[0].read_text()
    dashboard = json.loads(text)
    # Provisioning substitutes no __inputs: the data source variable names the provisioned data source
    # itself (type and uid), not ${DS_PROMETHEUS}, and nothing is left for an import to fill in.
    variable = dashboard["templating"]["list"][0]
    assert variable["query"] == source["type"]
    assert variable["current"] == {"text": source["name"], "value": source["uid"]}
    assert "__inputs" not in dashboard and "DS_PROMETHEUS" not in text
    # The UI import copy keeps __inputs; both differ only there.
    imported = build_dashboard()
    assert imported["templating"]["list"][0]["current"]["value"] == "${DS_PROMETHEUS}"
    imported.pop("__inputs")
    imported["templating"]["list"][0]["current"] = variable["current"]
    assert imported == dashboard


def _gateway_samples(address: str) -> list:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("spade_")]


@pytest.mark.e2e
def test_pushgateway_push_and_delete(tmp_path: Path) -> None:
    with start_pushgateway(tmp_path / "gw") as gw:
        registry = CollectorRegistry()
        Gauge("spade_shard_samples", "Samples written by a shard job.", registry=registry).set(21)
        push_job_metrics(gw.address, "spade-data-shard", registry, {"dataset": "coco-stuff"})
        rows = [(s.name, s.labels, s.value) for s in _gateway_samples(gw.address)]
        assert ("spade_shard_samples", {"job": "spade-data-shard", "dataset": "coco-stuff", "instance": ""}, 21.0) in rows
        delete_job_metrics(gw.address, "spade-data-shard", {"dataset": "coco-stuff"})
        assert _gateway_samples(gw.address) == [], _gateway_samples(gw.address)

        # One-off evaluation: EvalMetrics pushes each result when metrics.pushgateway is set.
        cfg = MetricsConfig(enabled=True, pushgateway=gw.address, run_name="toy", job_id="9")
        em = EvalMetrics(cfg, run_dir=tmp_path / "run")
        em.start()  # push mode: no server, no discovery file
        assert em.port is None and not (tmp_path / "run").exists()
        em.record(300, {"fid": 42.5, "kid_mean": 0.02, "kid_std": 0.001}, {"fid": 42.5, "kid": 0.02}, 300)
        fids = [s for s in _gateway_samples(gw.address) if s.name == "spade_eval_fid"]
        assert [(s.labels, s.value) for s in fids] == [({"job": "spade-eval", "run": "toy", "job_id": "9",
                                                         "instance": ""}, 42.5)]
        em.close(delete_pushed=True)
        assert _gateway_samples(gw.address) == [], _gateway_samples(gw.address)
        address = gw.address
    with pytest.raises(MetricsError, match="metrics.pushgateway"):
        push_job_metrics(address, "spade-data-shard", registry, timeout=2)


@pytest.mark.e2e
def test_prometheus_scrapes_pushed_eval_results_with_their_labels(tmp_path: Path) -> None:
    """A one-off evaluation pushes; the shipped config's pushgateway job keeps job/run/job_id as pushed."""
    import time

    from spade_dist.monitoring.services import start_prometheus

    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    with start_pushgateway(tmp_path / "gw") as gw:
        cfg_path = render_prometheus_config(sd_dir, tmp_path / "prometheus.yml", scrape_interval="1s",
                                            pushgateway=gw.address)
        em = EvalMetrics(MetricsConfig(enabled=True, pushgateway=gw.address, run_name="toy", job_id="77"),
                         run_dir=tmp_path / "run")
        em.record(500, {"fid": 33.5, "kid_mean": 0.01, "kid_std": 0.001}, {"fid": 33.5, "kid": 0.01}, 500)
        with start_prometheus(cfg_path, tmp_path / "prom") as prom:
            deadline = time.monotonic() + 60
            result: list = []
            while not result and time.monotonic() < deadline:
                time.sleep(1)
                result = prom.query('spade_eval_fid{run="toy"}')
        em.close(delete_pushed=True)
    assert len(result) == 1, result
    labels = result[0]["metric"]
    assert labels["job"] == "spade-eval" and labels["job_id"] == "77" and float(result[0]["value"][1]) == 33.5
    assert not any(k.startswith("exported_") for k in labels), labels


@pytest.mark.e2e
def test_local_services_stop_their_children_on_sigterm(tmp_path: Path) -> None:
    """``python -m spade_dist.monitoring.services`` (what launch/prometheus_local.sh runs) stops Prometheus
    and the Pushgateway on SIGTERM as on Ctrl-C, instead of leaving them running without a parent."""
    import os
    import signal
    import time

    from spade_dist.monitoring.services import free_port
    from tests.dist_utils import process_alive
    from tests.kit import PYTHON, cli_env

    sd_dir = tmp_path / "metrics"
    sd_dir.mkdir()
    proc = subprocess.Popen([PYTHON, "-m", "spade_dist.monitoring.services", "--sd-dir", str(sd_dir), "--workdir",
                             str(tmp_path / "work"), "--port", str(free_port()), "--pushgateway", "--pushgateway-port",
                             str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    children: list[int] = []
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("pushgateway: ") and lines[1].startswith("prometheus: "), lines
        children = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert sorted(Path(os.readlink(f"/proc/{pid}/exe")).name for pid in children) == [
            "prometheus", "prometheus-pushgateway"]
        proc.terminate()
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 15
        while any(process_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(process_alive(pid) for pid in children)
    finally:  # nothing left running when the test fails
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
