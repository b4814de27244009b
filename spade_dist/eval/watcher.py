"""The evaluation follower: score a run's committed checkpoints as they appear, without blocking training.

State lives only in the run directory, so a restarted watcher resumes exactly:

- ``eval/metrics.jsonl``: one line per checkpoint handled, ``status`` ``ok`` (step, the scores of
  ``eval.metrics``, protocol, protocol_hash, seconds, checkpoint, time; docs/EVALUATION.md) or
  ``skipped`` (step, reason, checkpoint, time). Steps listed here are never evaluated again.
- ``eval/best.json``: the ``ok`` line with the best ``eval.best_metric`` among the lines computed
  under the current protocol (+ ``generator`` and ``best_metric``); ``eval/best_generator.pt``: that EMA generator
  (``spade_dist.models.compat.save_generator_file`` format).
- ``eval/fid.html``: the metrics over the steps for the gallery.

Policies: ``every`` scores every committed checkpoint in step order; ``newest`` only the newest one
not yet scored (older unscored ones are passed over); ``every_k`` every K-th committed checkpoint the
watcher sees after the last scored one. Whatever the policy, the last checkpoint of a finished run is
scored. The watcher stops once the run's ``DONE`` marker exists and every committed checkpoint it should
score is done, or when the training process it follows (``parent_pid``) is gone.

With several ranks (``torch.distributed`` initialised), rank 0 decides what to score and broadcasts it;
only rank 0 writes files.
"""
from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch.distributed as dist

from spade_dist.eval.evaluate import CheckpointUnavailable, Evaluator
from spade_dist.eval.protocol import protocol_differences
from spade_dist.eval.report import write_fid_page
from spade_dist.eval.scores import METRICS, best_record, better, metric_value, protocol_hash_of
from spade_dist.files import append_jsonl, read_jsonl, write_json_atomic
from spade_dist.run_dir import RunDir

BEST_GENERATOR_NAME = "best_generator.pt"
FID_PAGE_NAME = "fid.html"
LOCK_NAME = "watcher.lock"
MARKER_NAME = "COMMITTED"  # docs/FORMATS.md: written last into checkpoints/step-XXXXXXXXX/
POLICIES = ("every", "newest", "every_k")


class WatcherBusy(RuntimeError):
    """Another watcher already follows this run directory (two would write every line twice)."""


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path


def committed_checkpoints(run_dir: Union[str, Path]) -> list[CheckpointRef]:
    """Committed step directories of a run, oldest first (the FORMATS.md layout)."""
    ckpt_dir = RunDir(run_dir).checkpoints
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        name = entry.name
        if name.startswith("step-") and name[5:].isdigit() and (entry / MARKER_NAME).is_file():
            found.append(CheckpointRef(int(name[5:]), entry))
    return sorted(found, key=lambda ref: ref.step)


def read_records(metrics_path: Path) -> list[dict]:
    """metrics.jsonl lines; a torn last line (the watcher was killed mid-write) is ignored."""
    return read_jsonl(metrics_path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EvalWatcher:
    """Follows ``run_dir``'s checkpoints with an :class:`Evaluator`; :meth:`run` until the run is done."""

    def __init__(self, run_dir: Union[str, Path], evaluator: Evaluator, policy: str = "every", every_k: int = 1,
                 poll_seconds: float = 5.0, parent_pid: Optional[int] = None, metrics=None,
                 log: Callable[[str], None] = print) -> None:
        if policy not in POLICIES:
            raise ValueError(f"eval.policy: unknown policy {policy!r}; expected one of {list(POLICIES)}")
        if every_k < 1:
            raise ValueError(f"eval.every_k must be >= 1, got {every_k}")
        self.run_dir = Path(run_dir)
        self.eval_dir = RunDir(self.run_dir).eval
        self.metrics_path = RunDir(self.run_dir).eval_metrics_log
        self.evaluator = evaluator
        self.policy = policy
        self.every_k = every_k
        self.poll_seconds = poll_seconds
        self.parent_pid = parent_pid
        self.metrics = metrics  # spade_dist.monitoring.exporter.EvalMetrics or None (rank 0)
        self.log = log
        self.rank = evaluator.rank
        self.world_size = evaluator.world_size
        self.records = read_records(self.metrics_path) if self.rank == 0 else []
        self._seen_since_last: set[int] = set()  # every_k: checkpoints passed over since the last score

    # ---------------------------------------------------------------- decisions (rank 0)

    @property
    def done_steps(self) -> set[int]:
        return {int(r["step"]) for r in self.records}

    def run_finished(self) -> bool:
        if RunDir(self.run_dir).done.exists():
            return True
        return self.parent_pid is not None and not _process_alive(self.parent_pid)

    def select(self, finished: bool) -> list[CheckpointRef]:
        """What to score now, per the policy (the final checkpoint of a finished run always)."""
        done = self.done_steps
        last_done = max(done) if done else -1
        committed = committed_checkpoints(self.run_dir)
        if self.policy == "every":
            chosen = [c for c in committed if c.step not in done]
        else:
            newer = [c for c in committed if c.step > last_done]
            if self.policy == "newest":
                chosen = newer[-1:]
            else:
                chosen = []
                for ref in newer:
                    self._seen_since_last.add(ref.step)
                    if len(self._seen_since_last) >= self.every_k:
                        chosen.append(ref)
                        self._seen_since_last = set()
        if finished and committed and committed[-1].step not in done and committed[-1] not in chosen:
            chosen.append(committed[-1])
        return chosen

    def _broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---------------------------------------------------------------- actions

    def _append(self, record: dict) -> None:
        self.records.append(record)
        append_jsonl(self.metrics_path, record)  # we hold the run's eval lock: the only writer

    def _write_best(self, record: dict, generator, generator_cfg) -> None:
        from spade_dist.models.compat import save_generator_file

        save_generator_file(generator, generator_cfg, self.eval_dir / BEST_GENERATOR_NAME)
        write_json_atomic(RunDir(self.run_dir).eval_best,
                          {**record, "generator": BEST_GENERATOR_NAME, "best_metric": self.best_metric}, sort_keys=True)

    @property
    def best_metric(self) -> str:
        return self.evaluator.cfg.eval.best_metric

    def current_best(self) -> Optional[dict]:
        """best.json's record: the best ``eval.best_metric`` under the evaluator's current protocol."""
        metric = self.best_metric
        return best_record(self.records, metric, self.evaluator.protocol_hash[metric])

    def best_values(self) -> dict[str, float]:
        """Per metric of this evaluator, the best value so far under the current protocol (gauges)."""
        out = {}
        for metric, digest in self.evaluator.protocol_hash.items():
            best = best_record(self.records, metric, digest)
            if best is not None:
                out[metric] = metric_value(best, metric)
        return out

    def _note_protocol_change(self, record: dict) -> None:
        """Say so when a metric's protocol differs from the previous score's: the two do not compare."""
        previous = next((r for r in reversed(self.records) if r.get("status") == "ok"), None)
        if previous is None:
            return
        for metric in record["protocol_hash"]:
            if protocol_hash_of(previous, metric) != record["protocol_hash"][metric]:
                fields = "; ".join(protocol_differences(previous.get("protocol"), record["protocol"], metric)[:4])
                self.log(f"[eval] step {record['step']}: {METRICS[metric].label} protocol differs from step "
                         f"{previous['step']}'s ({fields}); the scores do not compare, best.json follows the new one")

    def evaluate_one(self, ref: CheckpointRef) -> dict:
        """Score one checkpoint and record the outcome; a vanished or unreadable one is recorded as skipped."""
        start = time.time()
        try:
            generator, generator_cfg = self.evaluator.load_checkpoint(ref.path)
            result = self.evaluator.evaluate(generator, extra={"checkpoint": str(ref.path)})
        except CheckpointUnavailable as exc:
            record = {"step": ref.step, "status": "skipped", "reason": str(exc), "checkpoint": str(ref.path),
                      "time": time.time(), "seconds": round(time.time() - start, 3)}
            if self.rank == 0:
                self._append(record)
                self.log(f"[eval] step {ref.step}: skipped: {exc}")
            return record
        record = {"step": ref.step, "status": "ok", **result.to_record(), "time": time.time()}
        if self.rank == 0:
            self._note_protocol_change(record)
            metric = self.best_metric
            value, previous_best = metric_value(record, metric), self.current_best()
            # best.json before the line: killed in between, the restart re-scores this step and rewrites it.
            if value is not None and (previous_best is None or
                                      better(value, metric_value(previous_best, metric), metric)):  # type: ignore[arg-type]
                self._write_best(record, generator, generator_cfg)
            self._append(record)
            best = self.current_best()
            if self.metrics is not None and best is not None:
                self.metrics.record(ref.step, record, self.best_values(), best["step"])
            scores = ", ".join(f"{METRICS[m].label} {record[METRICS[m].key]:.5g}" for m in self.evaluator.metrics)
            self.log(f"[eval] step {ref.step}: {scores} ({result.num_images} images, {record['seconds']:.1f}s)")
        return record

    def _write_page(self) -> None:
        write_fid_page(self.eval_dir / FID_PAGE_NAME, self.records, self.current_best(), self.run_dir.name)

    def poll(self) -> tuple[int, bool]:
        """One round: score what the policy selects now. Returns (number handled, run finished)."""
        finished = self.run_finished() if self.rank == 0 else False
        chosen = self.select(finished) if self.rank == 0 else []
        finished, chosen = self._broadcast((finished, chosen))
        for ref in chosen:
            self.evaluate_one(ref)
        if chosen and self.rank == 0:
            self._write_page()
        return len(chosen), finished

    def _acquire_lock(self):
        """An exclusive flock on eval/watcher.lock, released by the kernel when this process ends."""
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.eval_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise WatcherBusy(f"another watcher (pid {owner}) already follows {self.run_dir} "
                              f"(lock {self.eval_dir / LOCK_NAME}); not starting a second one") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def run(self, max_polls: Optional[int] = None) -> list[dict]:
        """Poll until the run is finished and nothing is left to score; returns all records.

        Raises :class:`WatcherBusy` (on every rank) when another watcher holds the run's lock.
        """
        lock, busy = None, None
        if self.rank == 0:
            try:
                lock = self._acquire_lock()
            except WatcherBusy as exc:
                busy = str(exc)
        busy = self._broadcast(busy)
        if busy is not None:
            raise WatcherBusy(busy)
        try:
            return self._run(max_polls)
        finally:
            if lock is not None:
                lock.close()

    def _run(self, max_polls: Optional[int]) -> list[dict]:
        polls = 0
        while True:
            handled, finished = self.poll()
            polls += 1
            if finished and handled == 0:
                break
            if max_polls is not None and polls >= max_polls:
                break
            if handled == 0:
                time.sleep(self.poll_seconds)
        if self.rank == 0:
            self._write_page()
        return self.records
