"""Grafana dashboard for spade-dist runs, generated from code.

The checked-in ``configs/monitoring/grafana/spade_dist.json`` is this module's output (a test compares
them): edit the panels here, then regenerate with

    python -m spade_dist.monitoring.dashboard --write

Plain dicts rather than a builder library: the JSON is what Grafana imports, so writing it directly
keeps every field visible and the output byte-stable. The dashboard has a ``datasource`` variable
(any Prometheus data source) plus ``run``, ``job_id`` and a multi-select ``rank`` variable fed by
``label_values`` queries. Grafana loads dashboards two ways, and each gets its own file from the one
:func:`build_dashboard`:

- ``grafana/spade_dist.json`` for the UI import: ``__inputs`` asks for the Prometheus data source, and
  the import substitutes the answer for ``${DS_PROMETHEUS}``, the ``datasource`` variable's default;
- ``grafana/provisioned/spade_dist.json`` for file provisioning (the dashboard provider's path), which
  substitutes nothing: no ``__inputs``, and the variable defaults to the uid of the provisioned data
  source (read from ``provisioning/datasources/spade_prometheus.yaml``).

Metric names come from :mod:`spade_dist.monitoring.exporter`; ``TRAIN_SCRAPE_JOB`` is the
scrape job name of ``configs/monitoring/prometheus.yml`` (a test checks they agree).
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Any, Iterator, Optional

import yaml

from spade_dist.monitoring.services import TRAIN_SCRAPE_JOB
from spade_dist.resources import monitoring_dir

DASHBOARD_UID = "spade-dist-training"
GRAFANA_DIR = monitoring_dir() / "grafana"
IMPORT_FILE = GRAFANA_DIR / "spade_dist.json"  # for Grafana's UI import
PROVISIONED_FILE = GRAFANA_DIR / "provisioned" / "spade_dist.json"  # the dashboard provider's path
DATASOURCE_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "spade_prometheus.yaml"

_SEL = 'run="$run", job_id="$job_id"'
# Per-rank series are also filtered by the ranks selected in the `rank` variable (all by default).
_RANK_SEL = _SEL + ', rank=~"$rank"'
_INPUT = "DS_PROMETHEUS"  # the data source the UI import asks for (__inputs)
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_RATE = "[$__rate_interval]"


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": _DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def _panel(panel_id: int, title: str, kind: str, grid: tuple[int, int, int, int], unit: str,
           targets: list[tuple[str, str]], description: str = "",
           limits: Optional[tuple[float, float]] = None) -> dict[str, Any]:
    x, y, w, h = grid
    defaults: dict[str, Any] = {"unit": unit}
    if limits is not None:
        defaults["min"], defaults["max"] = limits
    return {
        "id": panel_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": _DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
        if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }


def _row(panel_id: int, title: str, y: int) -> dict[str, Any]:
    return {"id": panel_id, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def _variable(name: str, label: str, query: str, multi: bool = False) -> dict[str, Any]:
    """A ``label_values`` query variable; ``multi``: several values, "All" (= any value) by default."""
    var: dict[str, Any] = {
        "name": name, "label": label, "type": "query", "datasource": _DATASOURCE,
        "definition": query, "query": {"query": query, "refId": f"{name}-query"},
        "refresh": 2, "sort": 3 if multi else 1, "includeAll": multi, "multi": multi,
        "current": {}, "options": [], "hide": 0,
    }
    if multi:
        var["allValue"] = ".+"
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return var


def provisioned_datasource() -> dict[str, str]:
    """``{"name", "uid"}`` of the Prometheus data source that ``DATASOURCE_FILE`` provisions."""
    (source,) = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    return {"name": source["name"], "uid": source["uid"]}


def build_dashboard(provisioned: bool = False) -> dict[str, Any]:
    """The dashboard as a dict, ready for ``json.dumps``: for Grafana's UI import, or (``provisioned``)
    for file provisioning, its data source variable then defaulting to the provisioned data source."""
    s, rs = _SEL, _RANK_SEL
    panels: list[dict[str, Any]] = []
    ids = iter(range(1, 1000))

    panels.append(_row(next(ids), "Progress", 0))
    panels += [
        _panel(next(ids), "Throughput", "timeseries", (0, 1, 12, 8), "short", [
            (f"sum(rate(spade_samples_total{{{s}}}{_RATE}))", "images/s (job)"),
            (f"spade_images_per_second{{{rs}}}", "rank {{rank}} (last interval)"),
        ], "Images per second over all ranks (from the samples counter) and per selected rank."),
        _panel(next(ids), "Step time breakdown", "timeseries", (12, 1, 6, 8), "s", [
            (f"histogram_quantile(0.5, sum by (le, phase) (rate(spade_step_seconds_bucket{{{s}}}{_RATE})))", "p50 {{phase}}"),
            (f"histogram_quantile(0.95, sum by (le, phase) (rate(spade_step_seconds_bucket{{{s}}}{_RATE})))", "p95 {{phase}}"),
        ], "Per-step seconds waiting for data vs computing."),
        _panel(next(ids), "Data-wait share", "timeseries", (18, 1, 6, 8), "percentunit", [
            (f'sum(rate(spade_step_seconds_sum{{{s}, phase="data"}}{_RATE})) / sum(rate(spade_step_seconds_sum{{{s}}}{_RATE}))',
             "data-wait share"),
        ], "Share of the step time spent waiting for data (data wait / total step time); high = input-bound.",
            limits=(0, 1)),
        _panel(next(ids), "Step", "stat", (0, 9, 6, 4), "short", [
            (f"max(spade_step{{{s}}})", "step"),
        ]),
        _panel(next(ids), "Epoch", "stat", (6, 9, 6, 4), "short", [
            (f"max(spade_epoch{{{s}}})", "epoch"),
        ]),
        _panel(next(ids), "Ranks and restarts", "stat", (12, 9, 6, 4), "short", [
            (f"max(spade_world_size{{{s}}})", "world size"),
            (f"max(spade_run_restarts{{{s}}})", "restarts"),
        ], "Ranks of the current (re)start (an elastic job changes it) and how often the run resumed "
           "from its checkpoints."),
        _panel(next(ids), "Skipped steps and samples", "stat", (18, 9, 6, 4), "short", [
            (f"sum(spade_nonfinite_steps_skipped_total{{{s}}})", "non-finite steps"),
            (f"sum(spade_corrupt_samples_skipped_total{{{s}}})", "corrupt samples"),
        ]),
    ]
    panels.append(_row(next(ids), "Optimisation", 13))
    panels += [
        _panel(next(ids), "Losses", "timeseries", (0, 14, 12, 8), "short", [
            (f"avg by (term) (spade_loss{{{s}}})", "{{term}}"),
        ], "Latest value of each loss term, averaged over ranks."),
        _panel(next(ids), "Learning rate", "timeseries", (12, 14, 6, 8), "short", [
            (f"max by (net) (spade_learning_rate{{{s}}})", "{{net}}"),
        ]),
        _panel(next(ids), "Gradient norm", "timeseries", (18, 14, 6, 8), "short", [
            (f"max by (net) (spade_grad_norm{{{s}}})", "{{net}}"),
        ]),
    ]
    # FID belongs to the run, not to one job: the evaluator may run as its own Slurm job (another
    # job_id) and a requeued training job keeps evaluating the same run.
    r = 'run="$run"'
    panels.append(_row(next(ids), "Evaluation", 22))
    panels += [
        _panel(next(ids), "FID", "timeseries", (0, 23, 12, 8), "short", [
            (f"max(spade_eval_fid{{{r}}})", "FID (last checkpoint)"),
            (f"max(spade_eval_best_fid{{{r}}})", "best FID"),
        ], "Published by the evaluation watcher (spade-eval), whichever job runs it."),
        _panel(next(ids), "KID", "timeseries", (12, 23, 12, 8), "short", [
            (f"max(spade_eval_kid{{{r}}})", "KID"),
        ]),
        _panel(next(ids), "Semantic fidelity", "timeseries", (0, 31, 12, 8), "percentunit", [
            (f"max(spade_eval_miou{{{r}}})", "mIoU"),
            (f"max(spade_eval_pixel_accuracy{{{r}}})", "pixel accuracy"),
            (f"max(spade_eval_real_miou{{{r}}})", "mIoU, real images"),
            (f"max(spade_eval_real_pixel_accuracy{{{r}}})", "pixel accuracy, real images"),
        ], "The segmenter (eval.segmenter) on the generated images against their label maps, and on the "
           "real images (the upper bound a generator is measured against).", limits=(0, 1)),
        _panel(next(ids), "Best checkpoint", "stat", (12, 31, 6, 8), "short", [
            (f"max(spade_eval_best_step{{{r}}})", "step (eval.best_metric)"),
            (f"max(spade_eval_best_miou{{{r}}})", "best mIoU"),
        ], "The checkpoint of eval/best.json, chosen by eval.best_metric."),
        _panel(next(ids), "Evaluation time", "timeseries", (18, 31, 6, 8), "s", [
            (f"max(spade_eval_seconds{{{r}}})", "seconds per checkpoint"),
        ]),
    ]
    panels.append(_row(next(ids), "Checkpoints", 39))
    panels += [
        _panel(next(ids), "Checkpoint age", "stat", (0, 40, 8, 6), "s", [
            (f"time() - max(spade_checkpoint_last_success_timestamp_seconds{{{s}}} > 0)", "age"),
        ], "Seconds since the newest successful checkpoint."),
        _panel(next(ids), "Checkpoint save time", "timeseries", (8, 40, 8, 6), "s", [
            (f"max(spade_checkpoint_save_seconds{{{s}}})", "save seconds"),
        ]),
        _panel(next(ids), "Checkpoint size", "timeseries", (16, 40, 8, 6), "bytes", [
            (f"max(spade_checkpoint_bytes{{{s}}})", "bytes (all ranks' files)"),
        ]),
    ]
    panels.append(_row(next(ids), "Health", 46))
    panels += [
        _panel(next(ids), "Rank targets up", "timeseries", (0, 47, 8, 8), "short", [
            (f'up{{job="{TRAIN_SCRAPE_JOB}", {rs}}}', "rank {{rank}} ({{node}})"),
        ], "1 = Prometheus scrapes the rank's exporter."),
        _panel(next(ids), "Heartbeat age", "timeseries", (8, 47, 8, 8), "s", [
            (f"time() - spade_heartbeat_timestamp_seconds{{{rs}}}", "rank {{rank}}"),
        ], "Seconds since each rank's training loop last reported."),
        _panel(next(ids), "Device memory", "timeseries", (16, 47, 8, 8), "bytes", [
            (f"spade_device_memory_bytes{{{rs}}}", "rank {{rank}}"),
        ]),
    ]
    # Run health (docs/HEALTH.md): every rank judges the same rank-averaged numbers, so max over ranks
    # is the job's value.
    panels.append(_row(next(ids), "Run health", 55))
    panels += [
        _panel(next(ids), "Health events", "timeseries", (0, 56, 8, 8), "short", [
            (f"sum by (signal, action) (increase(spade_health_events_total{{{s}}}[15m]))", "{{signal}} ({{action}})"),
        ], "Health signals that fired in the last 15 minutes, by what their policy did (warn / rewind / stop)."),
        _panel(next(ids), "Health streaks", "timeseries", (8, 56, 8, 8), "short", [
            (f'max by (signal) (spade_health_signal{{{s}, signal=~"nonfinite_streak|saturated_steps|diverged_steps"}})',
             "{{signal}}"),
        ], "Consecutive steps skipped as non-finite, with D loss below / above its healthy range."),
        _panel(next(ids), "Loss spike score", "timeseries", (16, 56, 8, 8), "short", [
            (f'max by (term) (spade_health_signal{{{s}, signal="spike_score"}})', "{{term}}"),
        ], "Robust deviations of each loss term above its running median (fires above train.health.spike_mads)."),
        _panel(next(ids), "Generator output diversity", "timeseries", (0, 64, 12, 8), "short", [
            (f'max(spade_health_signal{{{s}, signal="diversity"}})', "EMA generator diversity"),
        ], "Mean pairwise feature distance of the EMA generator's outputs on a fixed label batch."),
        _panel(next(ids), "Ranks drifted", "timeseries", (12, 64, 12, 8), "short", [
            (f'max(spade_health_signal{{{s}, signal="drifted_ranks"}})', "ranks differing"),
        ], "Ranks whose parameter checksum differs from the others' at the last consistency check."),
    ]
    if provisioned:
        source = provisioned_datasource()
        current = {"text": source["name"], "value": source["uid"]}
        header: dict[str, Any] = {}
    else:
        current = {"text": f"${{{_INPUT}}}", "value": f"${{{_INPUT}}}"}
        header = {"__inputs": [{"name": _INPUT, "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                                "pluginName": "Prometheus", "description": "Prometheus that scrapes spade-dist runs"}]}
    return {
        **header,
        "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
                       {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"}],
        "uid": DASHBOARD_UID,
        "title": "spade-dist training",
        "tags": ["spade-dist", "training"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": current,
             "options": [], "hide": 0, "refresh": 1, "includeAll": False, "multi": False},
            _variable("run", "Run", "label_values(spade_step, run)"),
            _variable("job_id", "Job", 'label_values(spade_step{run="$run"}, job_id)'),
            _variable("rank", "Rank", 'label_values(spade_step{run="$run", job_id="$job_id"}, rank)', multi=True),
        ]},
        "panels": panels,
    }


def dashboard_json(provisioned: bool = False) -> str:
    """The exact text of the checked-in dashboard file (``IMPORT_FILE``, or ``PROVISIONED_FILE``)."""
    return json.dumps(build_dashboard(provisioned), indent=2, sort_keys=True) + "\n"


def panel_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(panel title, PromQL)`` for every query target of every panel (rows included)."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))
    yield from walk(dashboard.get("panels", []))


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def variable_selectors(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(variable, series selector, label)`` of every ``label_values(selector, label)`` variable."""
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = _LABEL_VALUES.match(var["query"]["query"])
        if match is None:
            raise ValueError(f"dashboard variable {var['name']}: unsupported query {var['query']['query']!r}")
        yield var["name"], match["selector"], match["label"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the spade-dist Grafana dashboard JSON.")
    parser.add_argument("--write", action="store_true",
                        help=f"write {IMPORT_FILE} and {PROVISIONED_FILE} (default: print the import file)")
    args = parser.parse_args(argv)
    if not args.write:
        print(dashboard_json(), end="")
        return 0
    for path, provisioned in ((IMPORT_FILE, False), (PROVISIONED_FILE, True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dashboard_json(provisioned))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
