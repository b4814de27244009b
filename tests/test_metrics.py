"""Per-rank exporter: metric names/labels, ports, taken-port error, file_sd discovery, jsonl log, EvalMetrics."""
from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spade_dist.config import MetricsConfig
from spade_dist.monitoring import MetricsError
from spade_dist.monitoring.discovery import resolve_run_labels
from spade_dist.monitoring.exporter import EvalMetrics, TrainingMetrics
from tests.dist_utils import free_port, run_distributed


def scrape(port: int) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from an exporter's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def make_cfg(**kw) -> MetricsConfig:
    return MetricsConfig(**{"enabled": True, "port_base": 0, "run_name": "toy", "job_id": "42", **kw})


def test_metric_names_labels_and_values(tmp_path: Path) -> None:
    m = TrainingMetrics(make_cfg(), run_dir=tmp_path / "run", rank=0, local_rank=0, world_size=2, node="n1", restarts=3)
    m.start()
    try:
        m.record_step(step=10, epoch=1, images=8, data_seconds=0.5, compute_seconds=1.5,
                      losses={"GAN": 1.25, "D_real": 0.5}, lrs={"G": 1e-4, "D": 4e-4}, grad_norms={"G": 3.0})
        m.record_step(step=20, epoch=1, images=16, data_seconds=1.0, compute_seconds=3.0, steps=10)
        m.record_nonfinite_skip()
        m.record_corrupt(3)
        m.record_device_memory(123456)
        m.record_checkpoint(seconds=2.5, bytes=4096, success=True)
        m.record_checkpoint(seconds=9.0, bytes=0, success=False)
        samples = scrape(m.port)
    finally:
        m.close()

    const = {"run": "toy", "job_id": "42", "rank": "0", "node": "n1"}

    def value(name: str, **extra: str) -> float:
        matches = [v for labels, v in samples[name] if labels == {**const, **extra}]
        assert len(matches) == 1, (name, extra, samples.get(name))
        return matches[0]

    assert value("spade_step") == 20
    assert value("spade_epoch") == 1
    assert value("spade_samples_total") == 24
    assert value("spade_images_per_second") == pytest.approx(16 / 4.0)
    assert value("spade_step_seconds_count", phase="data") == 11
    assert value("spade_step_seconds_sum", phase="data") == pytest.approx(1.5)
    assert value("spade_step_seconds_sum", phase="compute") == pytest.approx(4.5)
    assert value("spade_step_seconds_bucket", phase="compute", le="0.5") == 10  # the 10 steps of 0.3 s
    assert value("spade_loss", term="GAN") == 1.25
    assert value("spade_loss", term="D_real") == 0.5
    assert value("spade_learning_rate", net="D") == 4e-4
    assert value("spade_grad_norm", net="G") == 3.0
    assert value("spade_nonfinite_steps_skipped_total") == 1
    assert value("spade_corrupt_samples_skipped_total") == 3
    assert value("spade_device_memory_bytes") == 123456
    # The failed save counts as a failure and leaves the last success untouched.
    assert value("spade_checkpoint_save_seconds") == 2.5
    assert value("spade_checkpoint_bytes") == 4096
    assert value("spade_checkpoint_last_success_timestamp_seconds") > 1e9
    assert value("spade_checkpoint_saves_total", result="success") == 1
    assert value("spade_checkpoint_saves_total", result="failure") == 1
    assert value("spade_heartbeat_timestamp_seconds") >= value("spade_start_time_seconds")
    assert value("spade_world_size") == 2
    assert value("spade_run_restarts") == 3
    # Every spade_ metric carries the four identity labels; nothing leaks into the default registry.
    for name, rows in samples.items():
        assert name.startswith("spade_"), name
        for labels, _ in rows:
            assert {k: labels[k] for k in const} == const, (name, labels)


def test_serves_on_port_base_plus_local_rank(tmp_path: Path) -> None:
    port = free_port()
    m = TrainingMetrics(make_cfg(port_base=port - 1), run_dir=tmp_path, rank=3, local_rank=1, world_size=1)
    with m:
        assert m.port == port
        assert "spade_step" in scrape(port)
    with pytest.raises(OSError):  # closed: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_port_taken_names_port_and_config_key(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        m = TrainingMetrics(make_cfg(port_base=port), run_dir=tmp_path, rank=0, local_rank=0, world_size=1)
        with pytest.raises(MetricsError, match=rf"port {port} on 127\.0\.0\.1 is already in use.*metrics\.port_base"):
            m.start()
        m.close()
    assert not (tmp_path / "metrics").exists()


def test_disabled_serves_nothing_but_still_writes_the_training_log(tmp_path: Path) -> None:
    m = TrainingMetrics(make_cfg(enabled=False), run_dir=tmp_path, rank=0, local_rank=0, world_size=1)
    m.start()
    m.record_step(step=1, epoch=0, images=1, data_seconds=0.1, compute_seconds=0.1, losses={"GAN": 1.0})
    m.record_checkpoint(seconds=1.0, bytes=1)
    m.close()
    assert m.port is None
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "logs", "logs/train_metrics.jsonl"]  # no discovery file
    (record,) = [json.loads(line) for line in (tmp_path / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["losses"] == {"GAN": 1.0} and record["data_wait_share"] == 0.5
    assert m.registry.get_sample_value("spade_step", m._labels) == 0.0  # nothing exported
    # Other ranks write no log.
    other = TrainingMetrics(make_cfg(enabled=False), run_dir=tmp_path / "r1", rank=1, local_rank=1, world_size=2)
    other.start()
    other.record_step(step=1, epoch=0, images=1, data_seconds=0.1, compute_seconds=0.1)
    other.close()
    assert not (tmp_path / "r1").exists()


def test_labels_default_from_run_dir_and_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "977")
    assert resolve_run_labels(MetricsConfig(), tmp_path / "my-run") == ("my-run", "977")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert resolve_run_labels(MetricsConfig(), tmp_path / "my-run") == ("my-run", "local")
    with pytest.raises(MetricsError, match="metrics.job_id"):
        resolve_run_labels(MetricsConfig(job_id='a"b'), tmp_path)


def test_every_rank_of_an_elastic_job_has_one_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes of one elastic job may join as separate Slurm jobs (each its own SLURM_JOB_ID): every rank
    reports the elastic job's id, so dashboard panels filtered by job_id show the whole run."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "coco-1")
    labels = set()
    for slurm_job in ("977", "981"):  # a node of the first allocation, one that joined later
        monkeypatch.setenv("SLURM_JOB_ID", slurm_job)
        labels.add(resolve_run_labels(MetricsConfig(), tmp_path / "my-run"))
    assert labels == {("my-run", "coco-1")}
    assert resolve_run_labels(MetricsConfig(job_id="given"), tmp_path / "my-run") == ("my-run", "given")


def test_single_rank_sd_file_and_train_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    m = TrainingMetrics(make_cfg(), run_dir=run_dir, rank=0, local_rank=0, world_size=1, node="n1")
    m.start()
    sd_file = run_dir / "metrics" / "toy-42.json"
    groups = json.loads(sd_file.read_text())
    assert groups == [{"targets": [f"127.0.0.1:{m.port}"],
                       "labels": {"run": "toy", "job_id": "42", "rank": "0", "node": "n1"}}]
    m.record_step(step=5, epoch=0, images=4, data_seconds=1.0, compute_seconds=3.0,
                  losses={"GAN": 2.0, "D_fake": float("nan")}, lrs={"G": 1e-4, "D": 4e-4})
    sd_file.unlink()  # a cleanup of the shared directory while the job runs: the next log step restores it
    m.record_step(step=6, epoch=0, images=4, data_seconds=1.0, compute_seconds=3.0)
    assert json.loads(sd_file.read_text()) == groups
    m.close()
    assert not sd_file.exists()
    lines = (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["step"] == 5 and rec["epoch"] == 0
    assert rec["images_per_sec"] == pytest.approx(1.0)
    assert rec["data_wait_share"] == pytest.approx(0.25)
    assert rec["losses"] == {"GAN": 2.0, "D_fake": None}  # non-finite -> null: the file stays valid JSON
    assert rec["lr"] == {"G": 1e-4, "D": 4e-4}


def _two_rank_sd(rank: int, world_size: int, run_dir: str) -> dict:
    m = TrainingMetrics(make_cfg(), run_dir=run_dir, rank=rank, local_rank=rank, world_size=world_size,
                        node=f"node{rank}")
    m.start()
    import torch.distributed as dist

    dist.barrier()
    sd_file = Path(run_dir) / "metrics" / "toy-42.json"
    groups = json.loads(sd_file.read_text())
    served = scrape(m.port)["spade_world_size"][0][0]
    m.record_step(step=1, epoch=0, images=2, data_seconds=0.1, compute_seconds=0.3)
    dist.barrier()
    m.close()
    dist.barrier()
    return {"port": m.port, "groups": groups, "served_labels": served, "exists_after": sd_file.exists(),
            "log_exists": (Path(run_dir) / "logs" / "train_metrics.jsonl").exists()}


@pytest.mark.dist
def test_two_ranks_share_one_sd_file(tmp_path: Path) -> None:
    results = run_distributed(_two_rank_sd, world_size=2, args=(str(tmp_path / "run"),))
    ports = [r["port"] for r in results]
    assert ports[0] != ports[1]
    expected = [{"targets": [f"127.0.0.1:{ports[r]}"],
                 "labels": {"run": "toy", "job_id": "42", "rank": str(r), "node": f"node{r}"}} for r in range(2)]
    assert results[0]["groups"] == expected and results[1]["groups"] == expected
    assert results[1]["served_labels"] == {"run": "toy", "job_id": "42", "rank": "1", "node": "node1"}
    assert not results[0]["exists_after"]
    assert results[0]["log_exists"]


def _two_rank_port_taken(rank: int, world_size: int, run_dir: str, port_base: int) -> str:
    m = TrainingMetrics(make_cfg(port_base=port_base), run_dir=run_dir, rank=rank, local_rank=rank,
                        world_size=world_size)
    try:
        m.start()
    except MetricsError as exc:
        return str(exc)
    return "started"


@pytest.mark.dist
def test_taken_port_on_one_rank_fails_every_rank(tmp_path: Path) -> None:
    with socket.socket() as blocker:  # held by this process while both ranks start
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        results = run_distributed(_two_rank_port_taken, world_size=2, args=(str(tmp_path / "run"), port - 1), timeout=120)
    # Rank 1 (port_base + 1) hit the taken port; rank 0 gets the same error instead of waiting forever.
    for message in results:
        assert f"rank 1 (local rank 1): port {port} on 127.0.0.1 is already in use" in message
        assert "metrics.port_base" in message
    assert not (tmp_path / "run" / "metrics").exists()


def test_eval_metrics_serve_mode_publishes_and_tracks_best(tmp_path: Path) -> None:
    em = EvalMetrics(make_cfg(), run_dir=tmp_path / "run", node="evalnode")
    em.start()
    sd_file = tmp_path / "run" / "metrics" / "toy-42-eval.json"
    assert json.loads(sd_file.read_text()) == [{"targets": [f"127.0.0.1:{em.port}"],
                                               "labels": {"run": "toy", "job_id": "42", "role": "eval"}}]
    em.record(100, {"fid": 50.0, "kid_mean": 0.05, "kid_std": 0.01, "seconds": 3.0}, {"fid": 50.0, "kid": 0.05}, 100)
    # FID and KID only: no segmentation series exist yet.
    assert not any(name.startswith(("spade_eval_miou", "spade_eval_real")) for name in scrape(em.port))
    em.record(200, {"fid": 60.0, "kid_mean": 0.06, "kid_std": 0.02, "miou": 0.31, "pixel_accuracy": 0.6,
                    "real": {"miou": 0.5, "pixel_accuracy": 0.8}, "seconds": 2.0},
              {"fid": 50.0, "kid": 0.05, "miou": 0.31, "pixel_accuracy": 0.6}, 100)
    samples = scrape(em.port)
    em.close()
    assert not sd_file.exists()
    labels = {"run": "toy", "job_id": "42"}
    expected = {"spade_eval_fid": 60.0, "spade_eval_best_fid": 50.0, "spade_eval_kid": 0.06, "spade_eval_kid_std": 0.02,
                "spade_eval_best_kid": 0.05, "spade_eval_miou": 0.31, "spade_eval_best_miou": 0.31,
                "spade_eval_pixel_accuracy": 0.6, "spade_eval_real_miou": 0.5, "spade_eval_real_pixel_accuracy": 0.8,
                "spade_eval_best_step": 100.0, "spade_eval_step": 200.0, "spade_eval_seconds": 2.0}
    for name, value in expected.items():
        assert samples[name] == [(labels, value)], name


def test_grad_norm_tracker_reads_grads_before_they_are_zeroed_only_when_armed() -> None:
    import torch

    from spade_dist.train.grad_norm import GradNormTracker

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tracker = GradNormTracker({"G": opt})

    def step() -> float:
        net(torch.randn(4, 3)).pow(2).sum().backward()
        expected = float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())
        opt.step()
        opt.zero_grad(set_to_none=True)  # as the backends do: nothing left to read afterwards
        return expected

    step()
    assert tracker.collect() == {}  # not armed: nothing computed
    tracker.arm()
    expected = step()
    assert tracker.collect() == {"G": pytest.approx(expected, rel=1e-6)}
    step()
    assert tracker.collect() == {}  # collect() disarmed it
    tracker.close()
    tracker.arm()
    step()
    assert tracker.collect() == {}


def test_checkpoint_commit_hook_and_device_memory(tmp_path: Path) -> None:
    from spade_dist.monitoring.exporter import device_memory_bytes

    step_dir = tmp_path / "run" / "checkpoints" / "step-000000003"
    (step_dir / "sub").mkdir(parents=True)
    (step_dir / "a.bin").write_bytes(b"x" * 100)
    (step_dir / "sub" / "b.bin").write_bytes(b"y" * 28)
    m = TrainingMetrics(make_cfg(), run_dir=tmp_path / "run", rank=1, local_rank=0, world_size=2, node="n1")
    m.start()
    try:
        m.record_checkpoint_commit(3, step_dir, 1.5)
        m.record_device_memory(device_memory_bytes("cpu"))
        samples = scrape(m.port)
    finally:
        m.close()
    assert samples["spade_checkpoint_bytes"][0][1] == 128
    assert samples["spade_checkpoint_save_seconds"][0][1] == 1.5
    assert samples["spade_device_memory_bytes"][0][1] > 10 * 2**20  # a Python process with torch loaded
