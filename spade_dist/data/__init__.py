"""Streaming WebDataset input pipeline with an exact, topology-independent resumable position.

Public API (see docs/DATA.md)::

    loader = build_train_loader(cfg.data, rank=r, world_size=w)
    loader.set_epoch(e); len(loader); for batch in loader: ...
    pos = merge_positions([loader.state_dict() for each rank]); loader.load_state_dict(pos)
    eval_loader = build_eval_loader(cfg.data, split="val", rank=r, world_size=w)
"""
from spade_dist.data.decode import CorruptSample
from spade_dist.data.loader import CorruptRateError, ShardLoader, build_eval_loader, build_train_loader
from spade_dist.data.plan import merge_positions
from spade_dist.data.sources import ShardSourceError, resolve_shards
from spade_dist.data.stream import ShardError
from spade_dist.data.transforms import PREPROCESS_MODES, PreprocessOptions

__all__ = [
    "build_train_loader", "build_eval_loader", "merge_positions", "ShardLoader", "CorruptRateError",
    "CorruptSample", "ShardSourceError", "ShardError", "resolve_shards", "PREPROCESS_MODES", "PreprocessOptions",
]
