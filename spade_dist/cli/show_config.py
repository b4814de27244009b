"""``spade-config``: print the resolved configuration (YAML), or selected keys for shell scripts.

    spade-config --config configs/coco_stuff.yaml model.ngf=32          # whole resolved config
    spade-config --config X --get train.backend eval.mode               # "ddp none" (one line)
    spade-config --preset coco_stuff --get data.label_nc                 # a shipped preset by name
    spade-config --config tiny                                          # the same, when no file ./tiny exists
    spade-config --preset coco_stuff_512 --plan --gpu-memory 40 --gpus 8 # batch / accumulation / savings / precision
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spade_dist.cli.common import add_config_options, add_overrides, config_source, fail, make_parser, overrides
from spade_dist.config import Config, ConfigError, load_config
from spade_dist.memory_plan import DEFAULT_MARGIN, PAPER_GLOBAL_BATCH, describe


def get_dotted(cfg: Config, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise ConfigError(f"unknown config key '{key}'")
        node = getattr(node, part)
    return node


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("spade-config", __doc__)
    add_config_options(parser, "the config to print", required=True)
    parser.add_argument("--get", nargs="+", metavar="KEY", help="print only these dotted keys, space separated")
    parser.add_argument("--plan", action="store_true",
                        help="print the per-GPU batch, accumulation, activation checkpointing and precision that fit "
                             "(docs/PERFORMANCE.md, memory) and whether the configured batch fits")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="--plan: memory of one GPU in GiB")
    parser.add_argument("--gpus", type=int, default=8, help="--plan: number of GPUs (default 8)")
    parser.add_argument("--global-batch", type=int, default=PAPER_GLOBAL_BATCH,
                        help=f"--plan: samples per update over all GPUs (default {PAPER_GLOBAL_BATCH}, the paper's)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help=f"--plan: share of GPU memory kept free for the CUDA allocator, workspaces and "
                             f"context (default {DEFAULT_MARGIN})")
    add_overrides(parser, "model.ngf=32")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plan and not args.gpu_memory:
        parser.error("--plan needs --gpu-memory GIB")
    try:
        cfg = load_config(config_source(args), overrides(args))
        if args.plan:
            text, fits = describe(cfg, args.gpu_memory, args.gpus, args.global_batch, args.margin)
            print(text)
            if not fits:
                print("spade-config: warning: the configured data.batch_size will not fit; see the plan above",
                      file=sys.stderr)
        elif args.get:
            print(" ".join(str(get_dotted(cfg, k)) for k in args.get))
        else:
            print(cfg.to_yaml(), end="")
    except ConfigError as exc:
        return fail("spade-config", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
