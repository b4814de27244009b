"""``spade-export``: one generator file out of a training checkpoint.

    spade-export --run-dir RUN_DIR | --checkpoint RUN_DIR/checkpoints/step-000001234 --out G.pt [--raw] [--official latest_net_G.pth]

``--run-dir`` takes the run's newest committed checkpoint. The default is the EMA generator (what the
samples and FID use); ``--raw`` takes the trained weights instead. ``--out`` writes the project's
single-file format (weights + resolved config, ``torch.load(weights_only=True)``-loadable, read by
``spade-generate`` and ``spade-eval``), as a safetensors file when it ends in ``.safetensors``;
``--official`` additionally writes ``latest_net_G.pth``-style weights for the official NVlabs/SPADE
code (SPADE generators only). Exit 2 for a missing / torn / crafted checkpoint, 74 when an output
cannot be written (read-only or full file system); one line either way.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spade_dist.checkpoint.layout import InvalidCheckpoint
from spade_dist.cli.common import add_model_source, fail, fail_os, make_parser, model_source
from spade_dist.generation import load_model


def build_parser() -> argparse.ArgumentParser:
    ap = make_parser("spade-export", __doc__)
    add_model_source(ap, checkpoint_help="a checkpoint step directory (RUN_DIR/checkpoints/step-...)",
                     run_help="a training run directory: its newest committed checkpoint")
    ap.add_argument("--out", help="project generator file to write (e.g. G.pt, or G.safetensors)")
    ap.add_argument("--raw", action="store_true", help="export the raw generator instead of the EMA one")
    ap.add_argument("--official", help="also write official-format weights (latest_net_G.pth)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out and not args.official:
        parser.error("give --out and/or --official")
    from spade_dist.models.compat import save_generator_file, save_official_generator

    try:
        loaded = load_model(model_source("spade-export", args), use_ema=not args.raw)
        G, cfg = loaded.generator, loaded.cfg
        if args.out:
            save_generator_file(G, cfg, args.out)
            print(f"spade-export: wrote {'raw' if args.raw else 'EMA'} generator to {args.out}")
        if args.official:
            save_official_generator(G, args.official)
            print(f"spade-export: wrote official-format weights to {args.official}")
    except (FileNotFoundError, InvalidCheckpoint, KeyError, ValueError, TypeError) as exc:
        return fail("spade-export", exc)
    except OSError as exc:  # the outputs: read-only directory, disk full
        return fail_os("spade-export", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
