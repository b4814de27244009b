"""``spade-convert``: generator weights between the official NVlabs/SPADE format and ours.

    spade-convert to-official   --checkpoint G.pt  --out latest_net_G.pth
    spade-convert from-official --checkpoint latest_net_G.pth --out G.pt (--preset coco_stuff | --config my.yaml) [model.ngf=32 ...]

The project format is the single file written by ``spade_dist.models.compat.save_generator_file``
(a safetensors file when ``--out`` ends in ``.safetensors``; either form is read). A file that is not a
weights file (or holds pickled objects) is refused with one line, exit 2.
An official file carries no options, so ``from-official`` needs the preset or config it was trained
with; a wrong one fails with the mismatching keys and the option that probably differs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spade_dist.cli.common import (
    add_config_options,
    add_overrides,
    add_subcommand,
    add_subparsers,
    config_source,
    fail,
    fail_os,
    make_parser,
    overrides,
)
from spade_dist.config import ConfigError, load_config
from spade_dist.models.compat import (
    CheckpointMismatchError,
    load_generator_file,
    load_official_generator,
    save_generator_file,
    save_official_generator,
)


def build_parser() -> argparse.ArgumentParser:
    ap = make_parser("spade-convert", __doc__)
    sub = add_subparsers(ap)
    to = add_subcommand(sub, "to-official", help="project generator file -> official latest_net_G.pth state dict")
    to.add_argument("--checkpoint", required=True, help="generator file written by spade-dist")
    to.add_argument("--out", required=True, help="output .pth path")
    fr = add_subcommand(sub, "from-official", help="official state dict -> project generator file")
    fr.add_argument("--checkpoint", required=True, help="official latest_net_G.pth")
    fr.add_argument("--out", required=True, help="output project generator file")
    add_config_options(fr, "the config the checkpoint was trained with", required=True)
    add_overrides(fr, "model.ngf=32")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-official":
            G, _cfg = load_generator_file(args.checkpoint)
            save_official_generator(G, args.out)
        else:
            cfg = load_config(config_source(args), overrides(args))
            if cfg.model.netG != "spade":
                raise ConfigError(f"model.netG is '{cfg.model.netG}': only the SPADE generator has an official format")
            d, m = cfg.data, cfg.model
            G = load_official_generator(
                args.checkpoint, label_nc=d.label_nc, contain_dontcare_label=d.contain_dontcare_label,
                no_instance=d.no_instance, ngf=m.ngf, crop_size=d.crop_size, aspect_ratio=d.aspect_ratio,
                num_upsampling_layers=m.num_upsampling_layers, use_vae=m.use_vae, z_dim=m.z_dim, norm_G=m.norm_G,
                speed=cfg.speed,
            )
            save_generator_file(G, cfg, args.out)
    except (CheckpointMismatchError, ConfigError, FileNotFoundError, ValueError, TypeError) as exc:
        return fail("spade-convert", exc)
    except OSError as exc:  # the output: read-only directory, disk full
        return fail_os("spade-convert", exc)
    print(f"spade-convert: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
