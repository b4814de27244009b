#!/usr/bin/env bash
# Watch a run with a local Prometheus (+ Pushgateway) on 127.0.0.1, no systemd, until Ctrl-C or SIGTERM
# (either stops both services).
#   ./launch/prometheus_local.sh [RUN_DIR]        (default runs/quickstart)
# Scrapes the run's per-rank exporters through its discovery directory RUN_DIR/metrics (train with
# metrics.enabled=true), loads configs/monitoring/alerts.yml, and serves the UI on PROM_PORT (9090).
# Point Grafana at it and import configs/monitoring/grafana/spade_dist.json. See docs/MONITORING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_services.sh
RUN_DIR=${1:-runs/quickstart}
WORKDIR=${PROM_WORKDIR:-work_data/prometheus/$(basename "$RUN_DIR")}
SD_DIR=$(.venv/bin/python -m spade_dist.cli.run path "$RUN_DIR" metrics)  # the run's discovery directory
mkdir -p "$SD_DIR" "$WORKDIR"
exec .venv/bin/python -m spade_dist.monitoring.services --sd-dir "$SD_DIR" --workdir "$WORKDIR" \
  --port "${PROM_PORT:-9090}" --pushgateway --pushgateway-port "${PUSHGATEWAY_PORT:-9091}"
