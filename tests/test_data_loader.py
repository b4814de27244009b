"""Single-process loader behaviour: batch layout rule, corrupt samples, rate limit, eval split, resume."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade_dist.data import CorruptRateError, ShardSourceError, build_eval_loader, build_train_loader, merge_positions
from spade_dist.data.plan import rank_batch_sizes, rank_reserves
from spade_dist.data.stream import ShardError
from tests.kit import make_sample, png_bytes, toy_data_config, write_manifest, write_shards, write_tar


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_rank_batch_sizes_full_batches_equal_counts_reserve_covers_the_rest(world: int, batch: int) -> None:
    for n in range(world * batch, 60):
        sizes = rank_batch_sizes(n, world, batch)
        reserves = rank_reserves(n, world, batch)
        assert len({len(s) for s in sizes}) == 1 and len(sizes[0]) >= 1, (n, sizes)
        assert all(b == batch for s in sizes for b in s), sizes  # only full batches (drop_last)
        assert sum(map(sum, sizes)) + sum(reserves) == n  # every sample planned: trained or in reserve
        assert sum(reserves) < world * batch and max(reserves) - min(reserves) <= 1


def test_fewer_samples_than_one_global_batch_is_a_clear_error(tmp_path: Path) -> None:
    write_shards(tmp_path, [5])
    with pytest.raises(ValueError, match=r"has 5 samples, fewer than one global batch \(3 ranks x data.batch_size 2\)"):
        build_train_loader(toy_data_config(str(tmp_path)), rank=0, world_size=3)


def test_odd_dataset_with_a_corrupt_sample_gives_full_batches_and_each_good_sample_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """23 samples, one corrupt, batch 2: the reserve refills the corrupt sample's place, so the 11 full
    batches hold the 22 good samples once each; no batch of one reaches BatchNorm (issue #27 row 1)."""
    _corrupt_dataset(tmp_path, 22, ["k005x"])
    loader = build_train_loader(toy_data_config(str(tmp_path), max_corrupt_fraction=0.5))
    with caplog.at_level(logging.WARNING, logger="spade_dist.data"):
        batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert [len(b["key"]) for b in batches] == [2] * 11 == [2] * len(loader)
    assert sorted(keys) == [f"k{i:03d}" for i in range(22)]
    assert loader.corrupt_samples == 1 and loader.dropped_samples == 0 and "k005x" in caplog.text
    assert loader.take_audit() == ([{"key": "k005x", "reason": "corrupt"}], [])
    assert np.unpackbits(np.frombuffer(loader.state_dict()["delivered"], np.uint8), count=23).all()


def test_left_over_samples_are_dropped_counted_and_accounted(tmp_path: Path) -> None:
    write_shards(tmp_path, [5, 4])
    loader = build_train_loader(toy_data_config(str(tmp_path), num_workers=2))
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [2, 2, 2, 2]
    retired, repeats = loader.take_audit()
    assert loader.dropped_samples == 1 and [r["reason"] for r in retired] == ["dropped"] and not repeats
    trained = {k for b in batches for k in b["key"]}
    assert trained | {retired[0]["key"]} == {f"train_{i:05d}" for i in range(9)} and len(trained) == 8
    assert np.unpackbits(np.frombuffer(loader.state_dict()["delivered"], np.uint8), count=9).all()


def _corrupt_dataset(root: Path, n_good: int, corrupt_keys: list[str]) -> None:
    """One shard: n_good good samples plus the corrupt ones (garbage image / size mismatch)."""
    samples = [(f"k{i:03d}", make_sample(f"k{i:03d}", 12, 10, seed=i)) for i in range(n_good)]
    for j, key in enumerate(corrupt_keys):
        members = make_sample(key, 12, 10, seed=100 + j)
        if j % 2 == 0:
            members["image.png"] = b"\x89PNG garbage"
        else:
            members["label.png"] = png_bytes(np.zeros((9, 12), dtype=np.uint8))
        samples.append((key, members))
    samples.sort()
    write_tar(root / "bad-train-000000.tar", samples)
    write_manifest(root, "bad", {"train": [("bad-train-000000.tar", [k for k, _ in samples])]})


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _corrupt_dataset(tmp_path, 9, ["k100x", "k101x"])
    loader = build_train_loader(toy_data_config(str(tmp_path), max_corrupt_fraction=0.5, corrupt_min_samples=4))
    expected_batches = len(loader)
    with caplog.at_level(logging.WARNING, logger="spade_dist.data"):
        batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert len(batches) == expected_batches == 5  # 11 samples / batch 2: 5 full batches + 1 in reserve
    # 9 good samples in 5 full batches: the reserve refills one corrupt place; the last batch is
    # completed with a repeat of a good sample (not counted in the position), see docs/DATA.md
    assert sorted(set(keys)) == [f"k{i:03d}" for i in range(9)] and len(keys) == 10
    assert loader.corrupt_samples == 2
    retired, repeats = loader.take_audit()
    assert sorted(r["key"] for r in retired) == ["k100x", "k101x"] and len(repeats) == 1
    assert np.unpackbits(np.frombuffer(loader.state_dict()["delivered"], np.uint8), count=11).all()
    assert "k100x" in caplog.text and "cannot be decoded" in caplog.text
    assert "k101x" in caplog.text and "is 12x10 but label is 12x9" in caplog.text
    assert "repeats 1 of them" in caplog.text
    assert all(len(b["key"]) == 2 for b in batches)


def test_corrupt_rate_limit_raises_with_rate_and_keys(tmp_path: Path) -> None:
    _corrupt_dataset(tmp_path, 6, [f"k5{i:02d}x" for i in range(6)])
    loader = build_train_loader(toy_data_config(str(tmp_path), max_corrupt_fraction=0.2, corrupt_min_samples=4,
                                         shuffle_buffer=0))
    with pytest.raises(CorruptRateError, match=r"samples read were corrupt \(\d+\.\d+% > data.max_corrupt_fraction "
                                               r"20.00%\); last corrupt keys: \['k5"):
        list(loader)


def test_missing_shard_file_is_a_clear_error(tmp_path: Path) -> None:
    write_shards(tmp_path, [3, 3])
    loader = build_train_loader(toy_data_config(str(tmp_path)))
    (tmp_path / "toy-train-000001.tar").unlink()
    with pytest.raises(ShardError, match="cannot open shard .*toy-train-000001.tar"):  # gone while training
        list(loader)
    with pytest.raises(ShardSourceError, match="toy-train-000001.tar .* does not exist"):  # gone at startup
        build_train_loader(toy_data_config(str(tmp_path)))


def test_eval_loader_each_sample_once_unpadded_deterministic(tmp_path: Path) -> None:
    write_shards(tmp_path, [4], extra_splits={"val": [3, 4]})
    cfg = toy_data_config(str(tmp_path / "toy-train-*.tar"), num_workers=2)
    per_rank = []
    for rank in range(3):
        loader = build_eval_loader(cfg, split="val", rank=rank, world_size=3, batch_size=2)
        first = list(loader)
        again = list(loader)
        assert [b["key"] for b in first] == [b["key"] for b in again]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
        assert len(first) == len(loader)
        per_rank.append([k for b in first for k in b["key"]])
    assert [len(k) for k in per_rank] == [3, 2, 2]
    flat = [k for keys in per_rank for k in keys]
    assert sorted(flat) == [f"val_{i:05d}" for i in range(4, 11)]


def test_resume_in_process_with_pipe_shards(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path, [5, 4])
    pipes = " :: ".join(f"pipe:cat {tmp_path}/toy-train-{i:06d}.tar" for i in range(2))
    cfg = toy_data_config(pipes, manifest=str(manifest), batch_size=3)
    loader = build_train_loader(cfg)
    loader.set_epoch(4)
    before = []
    for i, batch in enumerate(loader):
        before += batch["key"]
        if i == 1:
            break
    position = merge_positions([loader.state_dict()])
    resumed = build_train_loader(cfg)
    resumed.load_state_dict(position)
    resumed.set_epoch(4)  # the loop re-selecting the resumed epoch keeps the position
    after = [k for b in resumed for k in b["key"]]
    assert sorted(before + after) == [f"train_{i:05d}" for i in range(9)]
    assert resumed.epoch == 4
    nxt = [k for b in resumed for k in b["key"]]  # finished epoch -> next epoch, complete
    assert resumed.epoch == 5 and sorted(nxt) == [f"train_{i:05d}" for i in range(9)]


def test_position_from_other_dataset_or_seed_is_refused(tmp_path: Path) -> None:
    write_shards(tmp_path, [4])
    position = build_train_loader(toy_data_config(str(tmp_path))).state_dict()
    with pytest.raises(ValueError, match="another dataset or seed"):
        build_train_loader(toy_data_config(str(tmp_path), seed=99)).load_state_dict(position)


def test_resample_modes_agree_on_labels_and_jpeg_images(tmp_path: Path) -> None:
    samples = [(f"j{i}", make_sample(f"j{i}", 30, 20, seed=i, jpeg=True)) for i in range(3)]
    write_tar(tmp_path / "j-train-000000.tar", samples)
    write_manifest(tmp_path, "j", {"train": [("j-train-000000.tar", [k for k, _ in samples])]})
    batches = {}
    for backend in ("exact", "fast"):
        cfg = toy_data_config(str(tmp_path), load_size=24, crop_size=16, batch_size=3, image_resample=backend)
        (batches[backend],) = list(build_train_loader(cfg))
    pil, fast = batches["exact"], batches["fast"]
    assert pil["key"] == fast["key"]
    assert torch.equal(pil["label"], fast["label"]) and torch.equal(pil["instance"], fast["instance"])
    assert fast["image"].dtype == torch.uint8 and fast["image"].shape == (3, 3, 16, 16)
    assert (pil["image"].int() - fast["image"].int()).abs().float().mean() < 2.0


def test_resume_with_fewer_samples_left_than_one_global_batch_moves_on(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, [8])
    cfg = toy_data_config(str(tmp_path))
    first = build_train_loader(cfg)
    it = iter(first)
    delivered = [k for _ in range(3) for k in next(it)["key"]]  # 6 of 8 delivered
    it.close()
    position = first.state_dict()
    on_two = [build_train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    with caplog.at_level(logging.WARNING, logger="spade_dist.data"):
        for loader in on_two:
            loader.load_state_dict(position)
            expected = len(loader)  # epoch 0's last 2 samples are retired (2 ranks x batch 2) -> epoch 1 in full
            batches = list(loader)
            assert loader.epoch == 1 and len(batches) == expected == 2 and all(len(b["key"]) == 2 for b in batches)
            assert loader.dropped_samples == 2
    left = sorted({f"train_{i:05d}" for i in range(8)} - set(delivered))
    assert all(k in caplog.text for k in left) and "skipped for this epoch" in caplog.text


@pytest.mark.parametrize("workers", [0, 1])
def test_label_and_16bit_instance_ids_survive_end_to_end(tmp_path: Path, workers: int) -> None:
    """Also through a worker process, where id maps travel in their narrow PNG dtype and are
    widened to the batch format's int64 in the main process."""
    write_shards(tmp_path, [3], size=(10, 10))
    cfg = toy_data_config(str(tmp_path), preprocess_mode="crop", load_size=10, crop_size=10, no_flip=True, batch_size=3,
                   num_workers=workers)
    (batch,) = list(build_train_loader(cfg))
    assert batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == batch["instance"].dtype == torch.int64
    for i, key in enumerate(batch["key"]):
        members = make_sample(key, 10, 10, seed=int(key.split("_")[1]))
        label = np.asarray(Image.open(io.BytesIO(members["label.png"])))
        instance = np.asarray(Image.open(io.BytesIO(members["instance.png"])))
        assert instance.dtype == np.uint16 and instance.max() > 255 and (label == 255).any()
        np.testing.assert_array_equal(batch["label"][i, 0].numpy(), label)
        np.testing.assert_array_equal(batch["instance"][i, 0].numpy(), instance)
