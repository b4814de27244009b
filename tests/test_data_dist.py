"""Multi-process (gloo) loader guarantees: equal counts of full batches per rank, every sample accounted
exactly once per epoch (trained, or dropped as left over by the full batches), reshuffled epochs, and
resume from 2 ranks onto 1 and 3 ranks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spade_dist.config import DataConfig
from spade_dist.data import build_train_loader, merge_positions
from tests.dist_utils import run_distributed
from tests.kit import toy_data_config, write_shards

SHARD_SIZES = {3: [7, 2, 4], 4: [1, 6, 3, 5], 5: [2, 2, 9, 1, 4]}


def _cfg(shards: str) -> DataConfig:
    return toy_data_config(shards, num_workers=2, shuffle_buffer=3, seed=11)


def _epochs_on_ranks(rank: int, world: int, datasets: list[str], epochs: int) -> list[list[dict]]:
    """For each dataset and epoch: this rank's len(), batch sizes and keys in order. A gloo
    all_reduce per batch stands in for DDP/SyncBN: unequal batch counts would make it hang."""
    out = []
    for shards in datasets:
        loader = build_train_loader(_cfg(shards), rank=rank, world_size=world)
        per_epoch = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            expected = len(loader)
            sizes, keys = [], []
            for batch in loader:
                n = torch.tensor([batch["image"].shape[0]])
                dist.all_reduce(n)
                sizes.append(batch["image"].shape[0])
                keys += batch["key"]
                assert batch["label"].dtype == torch.int64 and batch["image"].dtype == torch.uint8
            dropped = [r["key"] for r in loader.take_audit()[0]]
            per_epoch.append({"len": expected, "sizes": sizes, "keys": keys, "dropped": dropped})
        out.append(per_epoch)
    return out


@pytest.mark.dist
def test_two_ranks_two_workers_equal_batches_exactly_once(tmp_path: Path) -> None:
    datasets = []
    for n_shards, sizes in SHARD_SIZES.items():
        root = tmp_path / f"s{n_shards}"
        write_shards(root, sizes)
        datasets.append(str(root / "toy-train-*.tar"))
    results = run_distributed(_epochs_on_ranks, world_size=2, args=(datasets, 2))
    for d, sizes in enumerate(SHARD_SIZES.values()):
        all_keys = sorted(f"train_{i:05d}" for i in range(sum(sizes)))
        orders = []
        for epoch in range(2):
            per_rank = [results[r][d][epoch] for r in range(2)]
            counts = {len(p["sizes"]) for p in per_rank} | {p["len"] for p in per_rank}
            assert len(counts) == 1, (sizes, epoch, per_rank)
            assert all(s == 2 for p in per_rank for s in p["sizes"])  # full batches only
            keys = per_rank[0]["keys"] + per_rank[1]["keys"]
            dropped = per_rank[0]["dropped"] + per_rank[1]["dropped"]
            assert len(dropped) < 4 and sorted(keys + dropped) == all_keys, (sizes, epoch)
            orders.append(keys)
        assert orders[0] != orders[1], f"epoch 2 repeats epoch 1's order for shards {sizes}"


def _run_partial(rank: int, world: int, shards: str, epoch: int, stop_after: int) -> dict:
    loader = build_train_loader(_cfg(shards), rank=rank, world_size=world)
    loader.set_epoch(epoch)
    keys = []
    for i, batch in enumerate(loader):
        keys += batch["key"]
        if i + 1 == stop_after:
            break
    return {"keys": keys, "position": loader.state_dict()}


def _resume(rank: int, world: int, shards: str, position: dict, collective: bool = True) -> dict:
    loader = build_train_loader(_cfg(shards), rank=rank, world_size=world)
    loader.load_state_dict(position)
    loader.set_epoch(position["epoch"])
    rest_len = len(loader)
    rest = []
    for batch in loader:
        if collective:
            dist.all_reduce(torch.ones(1))  # stands in for DDP: unequal batch counts would hang
        rest += batch["key"]
    rest += [r["key"] for r in loader.take_audit()[0]]  # dropped: accounted, not trained
    loader.set_epoch(position["epoch"] + 1)
    nxt = [k for batch in loader for k in batch["key"]] + [r["key"] for r in loader.take_audit()[0]]
    return {"rest": rest, "rest_len": rest_len, "next": nxt}


@pytest.mark.dist
def test_resume_from_two_ranks_on_one_and_three(tmp_path: Path) -> None:
    sizes = SHARD_SIZES[5]
    write_shards(tmp_path, sizes)
    shards = str(tmp_path / "toy-train-{000000..000004}.tar")
    all_keys = sorted(f"train_{i:05d}" for i in range(sum(sizes)))
    first = run_distributed(_run_partial, world_size=2, args=(shards, 1, 2))
    before = first[0]["keys"] + first[1]["keys"]
    assert len(before) == 8  # 2 batches of 2 on each rank
    position = merge_positions([r["position"] for r in first])
    for world in (1, 3):
        # One rank needs no process group (the loader never communicates): run it in-process.
        after = [_resume(0, 1, shards, position, False)] if world == 1 else \
            run_distributed(_resume, world_size=world, args=(shards, position))
        rest = [k for r in after for k in r["rest"]]
        assert len({r["rest_len"] for r in after}) == 1
        assert sorted(before + rest) == all_keys, f"resume on {world} rank(s) lost or repeated samples"
        assert sorted(k for r in after for k in r["next"]) == all_keys
