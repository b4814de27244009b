"""``spade-serve``: paint a label map in the browser, see the generator's image (docs/SERVE.md).

Any user error (missing checkpoint, busy port, bad shards) exits with code 2 and one line on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from spade_dist.cli.common import (
    CliParser,
    add_config_options,
    add_model_source,
    add_overrides,
    fail,
    make_parser,
    model_source,
    overrides,
)


def build_parser() -> CliParser:
    parser = make_parser("spade-serve", __doc__)
    add_model_source(parser, checkpoint_help="a checkpoint step directory, a spade-dist generator file, or an "
                     "official latest_net_G.pth (needs --preset/--config)",
                     run_help="a training run directory: serve its newest committed checkpoint and follow newer ones")
    parser.add_argument("--encoder", type=Path, help="official latest_net_E.pth, for style images with a VAE model")
    add_config_options(parser, "model options of an official checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0 = any free port)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: the GPU when present)")
    parser.add_argument("--shards", help="shard set whose label maps the page offers (manifest.json, folder, pattern)")
    parser.add_argument("--split", help="split of --shards (default: the config's data.val_split)")
    parser.add_argument("--manifest", type=Path, help="manifest.json of --shards when it is not beside them")
    parser.add_argument("--max-samples", type=int, default=64, help="label maps read from --shards (default 64)")
    parser.add_argument("--poll-seconds", type=float, default=5.0,
                        help="how often a run directory is checked for a newer committed checkpoint (default 5)")
    parser.add_argument("--max-batch", type=int, default=8, help="most queued requests per generator forward (default 8)")
    parser.add_argument("--max-upload-bytes", type=int, default=16 * 1024 * 1024,
                        help="largest accepted upload (default 16 MiB)")
    add_overrides(parser, example="model.ngf=16 (model options of an official checkpoint)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from spade_dist.data import CorruptRateError
    from spade_dist.data.stream import ShardError
    from spade_dist.serve import ModelSpec, ServeOptions, serve

    if not 0 <= args.port <= 65535:
        return fail("spade-serve", f"--port {args.port}: must be 0..65535")
    try:
        checkpoint = model_source("spade-serve", args)
    except ValueError as exc:
        return fail("spade-serve", exc)
    spec = ModelSpec(checkpoint=checkpoint, preset=args.preset, config=args.config, encoder=args.encoder,
                     overrides=tuple(overrides(args)))
    opts = ServeOptions(spec=spec, host=args.host, port=args.port, device=args.device, shards=args.shards,
                        split=args.split, manifest=args.manifest, max_samples=args.max_samples,
                        poll_seconds=args.poll_seconds, max_batch=args.max_batch,
                        max_upload_bytes=args.max_upload_bytes)
    try:
        serve(opts)
    # ServeError, GenerateError, ConfigError, ShardSourceError, checkpoint mismatches, file errors, bad shards
    except (ValueError, OSError, CorruptRateError, ShardError) as exc:
        return fail("spade-serve", exc)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
