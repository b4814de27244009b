"""``spade-config``: print the resolved configuration (YAML), or selected keys for shell scripts.

    spade-config --config configs/coco_stuff.yaml model.ngf=32          # whole resolved config
    spade-config --config X --get train.backend eval.mode               # "ddp none" (one line)
    spade-config --preset coco_stuff --get data.label_nc                 # a shipped preset by name
    spade-config --config tiny                                          # the same, when no file ./tiny exists
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spade_dist.cli.common import add_config_options, add_overrides, config_source, fail, make_parser, overrides
from spade_dist.config import Config, ConfigError, load_config


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
    add_overrides(parser, "model.ngf=32")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(config_source(args), overrides(args))
        if args.get:
            print(" ".join(str(get_dotted(cfg, k)) for k in args.get))
        else:
            print(cfg.to_yaml(), end="")
    except ConfigError as exc:
        return fail("spade-config", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
