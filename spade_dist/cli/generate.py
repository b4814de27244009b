"""``spade-generate``: label maps + a generator checkpoint -> images and an ``index.html`` gallery.

Inputs
  --labels DIR|FILE   single-channel label PNGs (ids 0..label_nc-1, 255 = don't care)
  --instances DIR     instance PNGs with the same stems (required when the model uses edges)
  --images DIR        real photos with the same stems, shown beside the results (optional)
  --shards SPEC       instead of --labels: a shard split (``--split``, default data.val_split) read
                      through the project's eval loader, real photos included
  --checkpoint FILE   an official ``latest_net_G.pth`` (options from --preset/--config + overrides)
                      or a project generator file (it carries its own config), or a checkpoint step
                      directory (its EMA generator and config)
  --run-dir DIR       instead of --checkpoint: a training run (its newest committed checkpoint)

Preprocessing for generation (deliberately simple and deterministic, unlike training's random
crops): each label / instance map is resized with nearest neighbour to width ``data.crop_size`` and
height ``round(crop_size / aspect_ratio)`` - the size the generator was built for - so ids are never
blended. Real and style photos are resized bicubically to the same size. Shards go through the eval
loader instead, i.e. the official test-mode preprocessing of the config (no flip, load size = crop).

Outputs ``<out>/images/<key>_<k>.png`` (k = 0..num_per_label-1), ``<out>/labels/<key>.png``
(colourised label), ``<out>/real/<key>.png`` and ``<out>/index.html``. Keys are file stems with ``.``
replaced by ``_``, as in shards. Any user error (missing path, unreadable PNG, bad label id,
checkpoint mismatch) exits with code 2 and a one-paragraph message on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.cli.common import (
    add_config_options,
    add_model_source,
    add_overrides,
    fail,
    make_parser,
    model_source,
    overrides,
)
from spade_dist.generation import run


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("spade-generate", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", type=Path, help="folder of label PNGs (or one PNG)")
    source.add_argument("--shards", help="shards as data.val_shards takes them (manifest.json, folder, pattern)")
    parser.add_argument("--split", help="split of --shards (default: the config's data.val_split)")
    parser.add_argument("--manifest", type=Path, help="manifest.json of --shards when it is not beside them")
    parser.add_argument("--instances", type=Path, help="folder of instance PNGs with the same file stems")
    parser.add_argument("--images", type=Path, help="folder of real photos with the same stems, shown beside")
    add_model_source(parser, checkpoint_help="official latest_net_G.pth (needs --preset/--config), a spade-dist "
                     "generator file, or a checkpoint step directory",
                     run_help="a training run directory: its newest committed checkpoint (EMA generator)")
    parser.add_argument("--encoder", type=Path,
                        help="official latest_net_E.pth, for --style-image with an official VAE checkpoint")
    add_config_options(parser, "model options of an official checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random z (VAE generators)")
    parser.add_argument("--num-per-label", type=int, default=1, help="images per label (needs a VAE generator if > 1)")
    parser.add_argument("--style-image", type=Path, help="photo whose style the VAE encoder extracts")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N labels (sorted by name); 0 = all")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="label maps per generator call (default 8; images do not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is no terminal)")
    add_overrides(parser, "model.ngf=16 (official checkpoints only)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from spade_dist.data import CorruptRateError
    from spade_dist.data.stream import ShardError

    try:
        args.checkpoint = model_source("spade-generate", args)
        rows = run(args, overrides(args))
    # GenerateError, LabelError, ConfigError, CheckpointMismatchError, ShardSourceError, file errors, bad shards
    except (ValueError, OSError, CorruptRateError, ShardError) as exc:
        return fail("spade-generate", exc)
    generated = len(rows) * args.num_per_label
    print(f"spade-generate: {len(rows)} label map(s), {generated} generated image(s) -> {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
