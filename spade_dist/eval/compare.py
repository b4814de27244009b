"""``spade-eval compare``: scores of several runs / results in one table, protocols kept apart.

A source is a run directory (its ``eval/metrics.jsonl``), a ``metrics.jsonl`` file, or one JSON result
(``spade-eval once --out``, ``eval/best.json``); every ``ok`` score in it becomes a row. Per metric,
the rows' protocol hashes are compared: when they are all equal the column header names the hash;
otherwise every cell is tagged with a letter per protocol (``[A]``, ``[B]``) and a note under the
table names the protocol fields that differ, so numbers made differently never sit side by side
unmarked. The segmenter's scores on the real images (the paper's "real" row) follow per protocol.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spade_dist.eval.protocol import protocol_groups, protocol_letter, protocol_notes
from spade_dist.eval.scores import METRICS, metric_value, protocol_hash_of
from spade_dist.files import read_jsonl
from spade_dist.run_dir import RunDir


@dataclass(frozen=True)
class ScoreRow:
    label: str
    record: dict[str, Any]


def read_scores(source: str) -> list[ScoreRow]:
    """The ``ok`` scores of ``source`` (see the module doc); FileNotFoundError / ValueError name it."""
    path = Path(source)
    if path.is_dir():
        path, name = RunDir(path).eval_metrics_log, path.name
    else:
        name = path.stem
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such result file or run directory with eval/metrics.jsonl")
    if path.suffix == ".jsonl":
        records = read_jsonl(path)
    else:
        try:
            records = [json.loads(path.read_text())]
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON result ({exc})") from exc
    rows = []
    for record in records:
        if not isinstance(record, dict) or record.get("status", "ok") != "ok":
            continue
        step = record.get("step")
        rows.append(ScoreRow(f"{name}@{step}" if step is not None else name, record))
    if not rows:
        raise ValueError(f"{source}: holds no scores")
    return rows


def format_table(rows: list[ScoreRow]) -> list[str]:
    """The table's lines: one row per score, one column per metric present, then the real images'
    segmentation scores and the protocol notes."""
    records = [row.record for row in rows]
    labels = [row.label for row in rows]
    metrics = [m for m in METRICS if protocol_groups(records, m)]
    header, cells, notes = ["source"], [[label] for label in labels], []
    for metric in metrics:
        groups = protocol_groups(records, metric)
        letters = {digest: protocol_letter(k) for k, digest in enumerate(groups)}
        mixed = len(groups) > 1
        header.append(METRICS[metric].label + ("" if mixed else f" ({next(iter(groups))})"))
        for i, record in enumerate(records):
            value = metric_value(record, metric)
            text = "-" if value is None else f"{value:.4f}"
            if value is not None and mixed:
                text += f" [{letters[protocol_hash_of(record, metric)]}]"
            cells[i].append(text)
        notes += protocol_notes(records, labels, metric)
    widths = [max(len(line[c]) for line in [header, *cells]) for c in range(len(header))]
    table = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in [header, *cells]]
    real_lines = []
    for metric in ("miou", "pixel_accuracy"):
        for digest, members in protocol_groups(records, metric).items():
            value = metric_value(records[members[0]].get("real") or {}, metric)
            if value is not None:
                real_lines.append(f"real images, {METRICS[metric].label} ({digest}): {value:.4f}")
    return table + ([""] + real_lines if real_lines else []) + ([""] + notes if notes else [])
