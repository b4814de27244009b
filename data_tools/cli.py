"""``spade-data``: shard, verify, inspect and synthesise SPADE datasets (docs/DATA_TOOLS.md).

    spade-data synth --out data/landscapes --count 500 --val-count 50 --size 128
    spade-data shard --layout custom --root data/landscapes --out shards/landscapes --split train
    spade-data verify --deep shards/landscapes
    spade-data stats shards/landscapes

Exit codes: 0 success, 1 ``verify`` found problems (listed on stderr), 2 a user error: bad command line,
bad value, missing / unreadable / bad input data (one line ``spade-data COMMAND: error: ...``).
Also ``python -m data_tools``; this module only parses arguments, the work is in the library modules.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from data_tools.layouts import LAYOUTS, DataToolsError
from spade_dist.cli.common import add_subcommand, add_subparsers, fail, make_parser, positive_int
from spade_dist.monitoring import MetricsError
from spade_dist.progress import progress_wanted


def _byte_size(text: str) -> int:
    """Accepts plain bytes or K/M/G suffixes (powers of 1024), e.g. 512M."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip()
    try:
        if text and text[-1].lower() in units:
            return int(float(text[:-1]) * units[text[-1].lower()])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1000000, 512M, 1G)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("spade-data", __doc__)
    sub = add_subparsers(parser)

    shard = add_subcommand(sub, "shard", help="write deterministic tar shards + manifest.json for one split")
    shard.add_argument("--layout", required=True, choices=LAYOUTS, help="folder layout of --root")
    shard.add_argument("--root", required=True, help="dataset root folder")
    shard.add_argument("--out", required=True, help="output folder (shared by all splits of the dataset)")
    shard.add_argument("--split", default="train", help="split name (default train)")
    shard.add_argument("--name", default=None, help="shard file prefix (default: the layout name)")
    shard.add_argument("--max-count", type=positive_int, default=1000, help="samples per shard (default 1000)")
    shard.add_argument("--max-size", type=_byte_size, default=None, help="bytes per shard, e.g. 1G")
    shard.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="decode processes (output does not depend on it)")
    shard.add_argument("--max-side", type=positive_int, default=None,
                       help="downscale so the longer side is at most PX (re-encodes; labels nearest)")
    shard.add_argument("--skip-bad", action="store_true", help="skip bad samples, list them in the manifest")
    shard.add_argument("--label-nc", type=positive_int, default=None, help="number of classes (custom layout)")
    dontcare = shard.add_mutually_exclusive_group()
    dontcare.add_argument("--contain-dontcare-label", dest="dontcare", action="store_true", default=None,
                          help="255 is a valid 'don't care' id")
    dontcare.add_argument("--no-dontcare-label", dest="dontcare", action="store_false",
                          help="255 is an error like any id >= label_nc")
    shard.add_argument("--no-instance", action="store_true", help="do not store instance maps")
    shard.add_argument("--image-dir", default=None, help="custom: image folder ({split} allowed; default {split}/images)")
    shard.add_argument("--label-dir", default=None, help="custom: label folder (default {split}/labels)")
    shard.add_argument("--instance-dir", default=None, help="custom: instance map folder (optional)")
    shard.add_argument("--shard-slice", default=None, metavar="INDEX/COUNT",
                       help="write only shards n with n %% COUNT == INDEX (array jobs; then run merge-manifest)")
    order = shard.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0,
                       help="write samples in an order shuffled by this seed (default 0; same seed -> same shards)")
    order.add_argument("--no-shuffle", dest="shuffle_seed", action="store_const", const=None,
                       help="write samples sorted by key instead")
    shard.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is no terminal)")
    shard.add_argument("--pushgateway", metavar="HOST:PORT", default=None,
                       help="push the result (samples, shards, bytes, seconds) to this Prometheus Pushgateway")

    verify = add_subcommand(sub, "verify", help="check shards against manifest.json")
    verify.add_argument("dir", help="shard directory (holding manifest.json)")
    verify.add_argument("--deep", action="store_true", help="also decode and validate every sample")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is no terminal)")

    stats = add_subcommand(sub, "stats", help="class frequencies and image sizes from manifest.json")
    stats.add_argument("dir", help="shard directory (holding manifest.json)")
    stats.add_argument("--top", type=positive_int, default=10, help="classes listed per split")
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    synth = add_subcommand(sub, "synth", help="generate the procedural landscape dataset (custom layout)")
    synth.add_argument("--out", required=True, help="dataset folder to create (the custom layout)")
    synth.add_argument("--count", type=positive_int, required=True, help="training samples")
    synth.add_argument("--val-count", type=int, default=0, help="validation samples")
    synth.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files (default 0)")
    synth.add_argument("--size", type=positive_int, default=128, help="square image side in px")

    prepare = add_subcommand(sub, "prepare", help="arrange a downloaded dataset into its shard layout "
                             "(COCO-Stuff: instance maps from the annotation JSON)")
    prepare.add_argument("dataset", choices=("coco-stuff",), help="which dataset the downloads are")
    prepare.add_argument("--annotations", required=True, help="instances_{train,val}2017.json")
    prepare.add_argument("--images", required=True, help="downloaded image folder, e.g. train2017/")
    prepare.add_argument("--labels", required=True, help="label folder, e.g. stuffthingmaps_trainval2017/train2017/")
    prepare.add_argument("--root", required=True, help="dataset root to create ({split}_img, _label, _inst)")
    prepare.add_argument("--split", default="train", help="split name (default train)")
    prepare.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                         help="processes writing instance maps")
    prepare.add_argument("--limit", type=positive_int, default=None,
                         help="only the first N images of the annotation file")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")

    check = add_subcommand(sub, "check-layout", help="check a dataset folder against a layout without sharding")
    check.add_argument("--layout", required=True, choices=LAYOUTS, help="folder layout to check --root against")
    check.add_argument("--root", required=True, help="dataset root folder")
    check.add_argument("--split", action="append", default=None, help="split to check (repeatable; default train and val)")

    merge = add_subcommand(sub, "merge-manifest", help="assemble manifest.json after --shard-slice tasks finished")
    merge.add_argument("dir", help="the --out folder of the --shard-slice tasks")
    merge.add_argument("--split", action="append", default=None, help="only this split (repeatable)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "shard":
        from data_tools.shard import ShardSlice, shard_dataset
        started = time.monotonic()
        result = shard_dataset(
            args.layout, args.root, args.out, args.split, name=args.name, max_count=args.max_count,
            max_size=args.max_size, workers=args.workers, max_side=args.max_side, skip_bad=args.skip_bad,
            label_nc=args.label_nc, contain_dontcare_label=args.dontcare, no_instance=args.no_instance,
            image_dir=args.image_dir, label_dir=args.label_dir, instance_dir=args.instance_dir,
            shard_slice=ShardSlice.parse(args.shard_slice) if args.shard_slice else None,
            progress=progress_wanted(not args.no_progress), shuffle_seed=args.shuffle_seed)
        if "slice" in result:
            shards, skipped = result["shards"], 0  # skipped samples are counted once, by merge-manifest
            print(f"slice {result['slice']}: {len(result['shards'])} shards of split {args.split} in {args.out}; "
                  f"run `spade-data merge-manifest {args.out}` when all slices are done")
        else:
            entry = result["splits"][args.split]
            shards, skipped = entry["shards"], len(entry["skipped"])
            print(f"{entry['num_samples']} samples in {len(entry['shards'])} shards -> {args.out}"
                  f" ({len(entry['skipped'])} skipped)")
        if args.pushgateway:
            from data_tools.metrics import push_shard_metrics
            grouping = push_shard_metrics(args.pushgateway, args.name or args.layout, args.split, shards, skipped,
                                          time.monotonic() - started, args.shard_slice)
            print(f"pushed to {args.pushgateway}: job spade-data-shard, "
                  + ", ".join(f"{k} {v}" for k, v in grouping.items()))
        return 0
    if args.command == "verify":
        from data_tools.verify import check_directory
        problems = check_directory(args.dir, deep=args.deep, progress=progress_wanted(not args.no_progress))
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        if problems:
            print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
            return 1
        print(f"OK {args.dir}{' (deep)' if args.deep else ''}")
        return 0
    if args.command == "stats":
        from data_tools.stats import compute_stats, format_stats
        stats = compute_stats(args.dir, top=args.top)
        print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
        return 0
    if args.command == "synth":
        from data_tools.synth import generate_synthetic
        descriptor = generate_synthetic(args.out, args.count, seed=args.seed, size=args.size,
                                        val_count=args.val_count)
        print(f"{descriptor['splits']['train']} train + {descriptor['splits']['val']} val landscapes "
              f"({descriptor['size']} px, {descriptor['label_nc']} classes) -> {args.out}")
        return 0
    if args.command == "prepare":
        from data_tools.prepare import prepare_coco_stuff
        result = prepare_coco_stuff(args.annotations, args.images, args.labels, args.root, args.split,
                                    workers=args.workers, progress=not args.no_progress, limit=args.limit)
        print(f"{result.written} instance maps written, {result.skipped} already present -> "
              f"{result.root}/{args.split}_inst")
        return 0
    if args.command == "check-layout":
        from data_tools.layouts import LayoutOptions, check_layout
        for split in args.split or ["train", "val"]:
            print(check_layout(args.layout, Path(args.root), split, LayoutOptions()))
        return 0
    if args.command == "merge-manifest":
        from data_tools.manifest import merge_manifest
        manifest = merge_manifest(Path(args.dir), splits=args.split)
        counts = ", ".join(f"{split} {entry['num_samples']}" for split, entry in manifest["splits"].items())
        print(f"manifest.json in {args.dir}: {counts}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse restricts the choices


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (DataToolsError, MetricsError) as err:
        return fail(f"spade-data {args.command}", err)
    except BrokenPipeError:
        # Output piped into e.g. `head` that exited: not an error of ours; silence the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
