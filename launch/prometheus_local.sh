#!/usr/bin/env bash
# Watch a run with a local Prometheus (+ Pushgateway) on 127.0.0.1, no systemd, until Ctrl-C or SIGTERM
# (either stops both services).
#   ./launch/prometheus_local.sh [RUN_DIR]        (default runs/quickstart)
# Scrapes the run's per-rank exporters through its discovery directory RUN_DIR/metrics (train with
# metrics.enabled=true), loads configs/monitoring/alerts.yml, and serves the UI on PROM_PORT (9090).
# Point Grafana at it and import configs/monitoring/grafana/spade_dist.json. See docs/MONITORING.md.
# Python: the active environment's (a virtualenv or conda env, or an installed wheel), else the
# checkout's .venv; set PYTHON to choose another. Installs only Prometheus and the Pushgateway.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || [ ! -x .venv/bin/python ]; then PYTHON=python3; else PYTHON=.venv/bin/python; fi
fi
"$PYTHON" -c "import spade_dist" 2>/dev/null || { echo "prometheus_local.sh: $PYTHON cannot import spade_dist; activate the environment it is installed in, or set PYTHON" >&2; exit 2; }
bash launch/install_services.sh monitoring
RUN_DIR=${1:-runs/quickstart}
WORKDIR=${PROM_WORKDIR:-work_data/prometheus/$(basename "$RUN_DIR")}
SD_DIR=$("$PYTHON" -m spade_dist.cli.run path --run-dir "$RUN_DIR" metrics)  # the run's discovery directory
mkdir -p "$SD_DIR" "$WORKDIR"
exec "$PYTHON" -m spade_dist.monitoring.services --sd-dir "$SD_DIR" --workdir "$WORKDIR" \
  --port "${PROM_PORT:-9090}" --pushgateway --pushgateway-port "${PUSHGATEWAY_PORT:-9091}"
