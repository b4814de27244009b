#!/usr/bin/env bash
# Install the Debian packages the end-to-end tests start by themselves (no systemd is used):
# Slurm (slurm-wlm, munge), Prometheus (prometheus, promtool), the Pushgateway, and the headless
# browser of the spade-serve tests (chromium, chromium-driver; Playwright drives /usr/bin/chromium).
#   bash launch/install_services.sh              all of them (launch/test.sh)
#   bash launch/install_services.sh monitoring   only Prometheus and the Pushgateway (launch/prometheus_local.sh)
set -euo pipefail
case "${1:-all}" in
  all) only_monitoring=0 ;;
  monitoring) only_monitoring=1 ;;
  *) echo "usage: $0 [all|monitoring]" >&2; exit 2 ;;
esac
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null || need+=(prometheus-pushgateway)
if [ "$only_monitoring" = 0 ]; then
  command -v slurmctld >/dev/null || need+=(slurm-wlm)
  command -v munged >/dev/null || need+=(munge)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "[services] installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$only_monitoring" = 0 ]; then
  echo "[services] slurm $(slurmctld -V 2>/dev/null | cut -d' ' -f2), $(prometheus --version 2>&1 | head -n1)"
else
  echo "[services] $(prometheus --version 2>&1 | head -n1)"
fi
