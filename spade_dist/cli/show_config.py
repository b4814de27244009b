"""``spade-config``: print the resolved configuration (YAML), or selected keys for shell scripts.

    spade-config --config configs/coco_stuff.yaml model.ngf=32          # whole resolved config
    spade-config --config X --get train.backend eval.mode               # "ddp none" (one line)
    spade-config --preset coco_stuff --get data.label_nc                 # a shipped preset by name
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spade_dist.cli.common import add_overrides, fail, make_parser, overrides
from spade_dist.config import Config, ConfigError, load_config
from spade_dist.resources import preset_names, preset_path


def get_dotted(cfg: Config, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise ConfigError(f"unknown config key '{key}'")
        node = getattr(node, part)
    return node


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("spade-config", __doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="YAML config file")
    which.add_argument("--preset", help=f"shipped preset by name ({', '.join(preset_names())})")
    parser.add_argument("--get", nargs="+", metavar="KEY", help="print only these dotted keys, space separated")
    add_overrides(parser, "model.ngf=32")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config or preset_path(args.preset), overrides(args))
        if args.get:
            print(" ".join(str(get_dotted(cfg, k)) for k in args.get))
        else:
            print(cfg.to_yaml(), end="")
    except ConfigError as exc:
        return fail("spade-config", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
