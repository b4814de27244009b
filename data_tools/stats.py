"""``spade-data stats``: class frequencies and image sizes per split, read from the manifest only.

Cheap on any dataset size (no tar is opened); useful to spot a wrong --label-nc, an unexpected
don't-care share, or odd image sizes before spending GPU hours. The per-shard class mix shows how
far each shard's class distribution is from its split's (total variation distance: 0 = the same
mix, 1 = no class in common): shards written in a sorted order of a dataset grouped by city or
scene stand out, shuffled shards (``spade-data shard --shuffle-seed``) stay close.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

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
            "shuffle_seed": entry.get("shuffle_seed"),
            "shard_mix": shard_mix(manifest, entry["shards"], histogram[:label_nc]),
        }
    return result


def _distribution(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0] * len(counts)


def shard_mix(manifest: dict, shards: list[dict], split_counts: list[int]) -> Optional[dict]:
    """Per shard: classes present, its most frequent class, and the total variation distance of its class
    distribution (don't care left out) to the split's; None for manifests without per-shard histograms."""
    if not shards or any("class_histogram" not in s for s in shards):
        return None
    label_nc = manifest["label_nc"]
    split_dist = _distribution(split_counts)
    rows = []
    for shard in shards:
        counts = shard["class_histogram"][:label_nc]
        dist = _distribution(counts)
        top = max(range(label_nc), key=lambda cid: counts[cid])
        rows.append({"file": shard["file"], "classes_present": sum(1 for c in counts if c),
                     "top_class": class_name(manifest, top), "top_fraction": dist[top],
                     "tv_distance": 0.5 * sum(abs(a - b) for a, b in zip(dist, split_dist))})
    distances = [r["tv_distance"] for r in rows]
    return {"mean_tv_distance": sum(distances) / len(distances), "max_tv_distance": max(distances), "shards": rows}


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
        mix = entry["shard_mix"]
        order = "sorted by key" if entry["shuffle_seed"] is None else f"shuffled, seed {entry['shuffle_seed']}"
        if mix is None:
            lines.append(f"  shard class mix: not in this manifest (written by an older spade-data; {order})")
            continue
        lines.append(f"  shard class mix ({order}): distance to the split's mix mean {mix['mean_tv_distance']:.3f}, "
                     f"max {mix['max_tv_distance']:.3f} (0 = same mix, 1 = nothing in common)")
        lines.append(f"  {'shard':<32} {'classes':>7} {'distance':>8}  most frequent class")
        for row in mix["shards"]:
            lines.append(f"  {row['file']:<32} {row['classes_present']:>7} {row['tv_distance']:>8.3f}  "
                         f"{row['top_class']} ({100 * row['top_fraction']:.0f}%)")
    return "\n".join(lines)
