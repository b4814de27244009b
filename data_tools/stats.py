"""``spade-data stats``: class frequencies and image sizes per split, read from the manifest only.

Cheap on any dataset size (no tar is opened); useful to spot a wrong --label-nc, an unexpected
don't-care share, or odd image sizes before spending GPU hours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from data_tools.manifest import load_manifest


def class_name(manifest: dict, class_id: int) -> str:
    names = manifest.get("class_names")
    return names[class_id] if names and class_id < len(names) else f"class {class_id}"


def compute_stats(directory: Union[str, Path], top: int = 10) -> dict:
    """Per split: sample/shard/byte counts, size statistics and the ``top`` most frequent classes."""
    manifest = load_manifest(Path(directory))
    label_nc = manifest["label_nc"]
    result = {"name": manifest["name"], "dataset": manifest.get("dataset"), "label_nc": label_nc, "splits": {}}
    for split, entry in manifest["splits"].items():
        histogram = entry["class_histogram"]
        total = sum(histogram)
        classes = sorted(((count, cid) for cid, count in enumerate(histogram[:label_nc]) if count), reverse=True)
        result["splits"][split] = {
            "num_samples": entry["num_samples"],
            "num_shards": len(entry["shards"]),
            "bytes": sum(s["bytes"] for s in entry["shards"]),
            "image_size": entry["image_size"],
            "classes_present": len(classes),
            "dontcare_fraction": (histogram[label_nc] / total) if total else 0.0,
            "top_classes": [{"id": cid, "name": class_name(manifest, cid), "pixels": count,
                             "fraction": count / total if total else 0.0} for count, cid in classes[:top]],
            "skipped": len(entry.get("skipped", [])),
        }
    return result


def format_stats(stats: dict) -> str:
    """Human-readable table of :func:`compute_stats` output."""
    lines = [f"{stats['name']} ({stats['dataset']}, label_nc={stats['label_nc']})"]
    for split, entry in stats["splits"].items():
        width, height = entry["image_size"]["width"], entry["image_size"]["height"]
        lines.append("")
        lines.append(f"split {split}: {entry['num_samples']} samples in {entry['num_shards']} shards, "
                     f"{entry['bytes'] / 1e6:.1f} MB, {entry['skipped']} skipped")
        lines.append(f"  width  min {width['min']} max {width['max']} mean {width['mean']}")
        lines.append(f"  height min {height['min']} max {height['max']} mean {height['mean']}")
        lines.append(f"  {entry['classes_present']} classes present, don't care {100 * entry['dontcare_fraction']:.2f}%")
        lines.append(f"  {'id':>5}  {'class':<24} {'pixels':>14} {'share':>8}")
        for row in entry["top_classes"]:
            lines.append(f"  {row['id']:>5}  {row['name']:<24} {row['pixels']:>14} {100 * row['fraction']:>7.2f}%")
    return "\n".join(lines)
