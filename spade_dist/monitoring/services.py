"""Start and stop a real Prometheus and Pushgateway on 127.0.0.1 (free ports, temp dirs), no systemd.

Used by the end-to-end tests and by the quickstart:

    with start_pushgateway(workdir) as gw:            # gw.address == "127.0.0.1:PORT"
        ...
    with start_prometheus(config_path, workdir) as prom:
        prom.query("up")                               # -> list of result dicts

``python -m spade_dist.monitoring.services --sd-dir RUN_DIR/metrics --workdir DIR --pushgateway`` runs
Prometheus with the shipped scrape config and alert rules pointed at a run's discovery directory (and a
Pushgateway) in the foreground until Ctrl-C or SIGTERM (either stops both); ``--config FILE`` loads a
config of your own instead.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import yaml

from spade_dist.resources import monitoring_dir

TRAIN_SCRAPE_JOB = "spade-train"  # the job name in configs/monitoring/prometheus.yml


class ServiceError(RuntimeError):
    """A service binary is missing, did not become ready, or answered an error."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"'{name}' not found on PATH; install it with launch/install_services.sh")
    return path


class Service:
    """A child process listening on ``host:port``; stop() terminates it (then kills after 10 s)."""

    def __init__(self, name: str, argv: list[str], host: str, port: int, log_path: Path) -> None:
        self.name, self.host, self.port, self.log_path = name, host, port, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServiceError(f"{self.name} not ready at {self.url}{path} after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Prometheus(Service):
    """A Prometheus server with small helpers for its HTTP API."""

    def api(self, endpoint: str, params: Optional[dict] = None) -> Any:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise ServiceError(f"Prometheus /api/v1/{endpoint} {params}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
        if body.get("status") != "success":
            raise ServiceError(f"Prometheus /api/v1/{endpoint} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; returns the result list (empty when no series match)."""
        data = self.api("query", {"query": expr})
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]


def render_prometheus_config(sd_dir: Union[str, Path], out: Union[str, Path], scrape_interval: str = "15s",
                             pushgateway: Optional[str] = None,
                             base: Optional[Union[str, Path]] = None, alertmanager: Optional[str] = None) -> Path:
    """Write the shipped ``prometheus.yml`` adapted to one machine: file_sd reading ``sd_dir``, rule
    files as absolute paths, the given scrape/evaluation interval, the Pushgateway job pointed at
    ``pushgateway`` (``host:port``) or dropped when None, and alerts sent to ``alertmanager``
    (``host:port``), or the ``alerting`` section dropped when None. Returns ``out``."""
    base = Path(base) if base is not None else monitoring_dir() / "prometheus.yml"
    cfg = yaml.safe_load(base.read_text())
    cfg["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    if _seconds(scrape_interval) < 10:
        cfg["global"]["scrape_timeout"] = scrape_interval
    cfg["rule_files"] = [str((base.parent / f).resolve()) for f in cfg.get("rule_files", [])]
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] == TRAIN_SCRAPE_JOB:
            job["file_sd_configs"] = [{"files": [str(Path(sd_dir).resolve() / "*.json")],
                                       "refresh_interval": scrape_interval}]
        elif job["job_name"] == "pushgateway":
            if pushgateway is None:
                continue
            job["static_configs"] = [{"targets": [pushgateway]}]
        jobs.append(job)
    cfg["scrape_configs"] = jobs
    if alertmanager is None:
        cfg.pop("alerting", None)
    else:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit) and duration[: -len(unit)].replace(".", "", 1).isdigit():
            return float(duration[: -len(unit)]) * units[unit]
    raise ServiceError(f"unsupported Prometheus duration {duration!r} (use e.g. 1s, 15s, 1m)")


def start_prometheus(config: Union[str, Path], workdir: Union[str, Path], port: int = 0,
                     host: str = "127.0.0.1", ready_timeout: float = 30.0) -> Prometheus:
    """Start ``prometheus`` with ``config``; TSDB and log under ``workdir``; wait until ready."""
    workdir = Path(workdir)
    (workdir / "tsdb").mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    argv = [_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={host}:{port}", "--web.enable-lifecycle", "--log.level=warn"]
    return _ready(Prometheus("prometheus", argv, host, port, workdir / "prometheus.log"), ready_timeout)


def start_pushgateway(workdir: Union[str, Path], port: int = 0, host: str = "127.0.0.1",
                      ready_timeout: float = 30.0) -> Service:
    """Start ``prometheus-pushgateway`` (in-memory, no persistence file); wait until ready."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    # Debian's build defaults --persistence.file to /var/lib/prometheus/pushgateway.data: every gateway
    # started on the machine would then share (and restore) the groups of all earlier ones.
    argv = [_binary("prometheus-pushgateway"), f"--web.listen-address={host}:{port}", "--log.level=warn",
            "--persistence.file="]
    return _ready(Service("pushgateway", argv, host, port, workdir / "pushgateway.log"), ready_timeout)


ServiceT = TypeVar("ServiceT", bound=Service)


def _ready(service: ServiceT, timeout: float) -> ServiceT:
    """Wait for the service's ``/-/ready``; a service that does not get there is stopped, not left behind."""
    try:
        service.wait_ready("/-/ready", timeout)
    except BaseException:
        service.stop()
        raise
    return service


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run Prometheus (and a Pushgateway) on 127.0.0.1 until Ctrl-C or SIGTERM.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sd-dir", type=Path, help="a run's discovery directory (metrics.sd_dir, default RUN_DIR/metrics)")
    source.add_argument("--config", type=Path, help="a prometheus.yml of your own")
    parser.add_argument("--workdir", required=True, type=Path, help="directory for the TSDB, logs and generated config")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--scrape-interval", default="5s")
    parser.add_argument("--pushgateway", action="store_true", help="also start a Pushgateway")
    parser.add_argument("--pushgateway-port", type=int, default=9091)
    parser.add_argument("--alertmanager", metavar="HOST:PORT",
                        help="send alerts to this Alertmanager (default: alerts only on Prometheus' /alerts page)")
    args = parser.parse_args(argv)
    services: list[Service] = []
    # SIGTERM / SIGHUP (a service manager, a closed terminal, kill) stop the children like Ctrl-C does.
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        gateway = None
        if args.pushgateway:
            services.append(start_pushgateway(args.workdir, args.pushgateway_port))
            gateway = services[-1].address
            print(f"pushgateway: {services[-1].url}", flush=True)
        config = args.config or render_prometheus_config(args.sd_dir, args.workdir / "prometheus.yml",
                                                         args.scrape_interval, gateway,
                                                         alertmanager=args.alertmanager)
        services.append(start_prometheus(config, args.workdir, args.port))
        print(f"prometheus: {services[-1].url}  (config {config})", flush=True)
        while all(s.proc.poll() is None for s in services):
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    finally:
        for s in reversed(services):
            s.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
