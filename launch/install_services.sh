#!/usr/bin/env bash
# Install the Debian packages the end-to-end tests start by themselves (no systemd is used):
# Slurm (slurm-wlm, munge), Prometheus (prometheus, promtool), the Pushgateway, and the headless
# browser of the spade-serve tests (chromium, chromium-driver; Playwright drives /usr/bin/chromium).
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null || need+=(prometheus-pushgateway)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "[services] installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "[services] slurm $(slurmctld -V 2>/dev/null | cut -d' ' -f2), $(prometheus --version 2>&1 | head -n1)"
