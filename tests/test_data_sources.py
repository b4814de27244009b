"""Shard specifications: manifest, directory, brace, glob, pipe:, and the errors naming the pattern."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from spade_dist.data import ShardSourceError, resolve_shards
from tests.kit import write_shards


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path, [3, 2, 4], extra_splits={"val": [2]})
    return tmp_path


def test_all_spec_kinds_give_the_same_shards(shard_dir: Path) -> None:
    specs = [str(shard_dir / "manifest.json"), str(shard_dir), str(shard_dir / "toy-train-{000000..000002}.tar"),
             str(shard_dir / "toy-train-*.tar")]
    results = [resolve_shards(spec, "train") for spec in specs]
    for r in results:
        assert [s.name for s in r.shards] == ["toy-train-000000.tar", "toy-train-000001.tar", "toy-train-000002.tar"]
        assert r.num_samples == 9
        assert r.shards[1].keys == ("train_00003", "train_00004")


def test_pipe_urls_need_and_use_the_manifest(shard_dir: Path) -> None:
    spec = f"pipe:cat {shard_dir}/toy-train-000001.tar :: pipe:cat {shard_dir}/toy-train-000002.tar"
    with pytest.raises(ShardSourceError, match="need data.manifest"):
        resolve_shards(spec, "train")
    result = resolve_shards(spec, "train", str(shard_dir / "manifest.json"))
    assert [s.url for s in result.shards] == [f"pipe:cat {shard_dir}/toy-train-000001.tar",
                                              f"pipe:cat {shard_dir}/toy-train-000002.tar"]
    assert result.num_samples == 6


def test_no_glob_match_names_the_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(ShardSourceError, match=re.escape(f"no shards match the glob '{pattern}'")):
        resolve_shards(pattern, "train")


def test_brace_pattern_with_missing_files_names_pattern_and_file(shard_dir: Path) -> None:
    pattern = str(shard_dir / "toy-train-{000000..000005}.tar")
    with pytest.raises(ShardSourceError, match=r"3 file\(s\) do not exist.*toy-train-000003.tar"):
        resolve_shards(pattern, "train")


def test_missing_manifest_names_path_and_pattern(shard_dir: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(shard_dir / "toy-train-000000.tar", lonely)
    pattern = str(lonely / "toy-train-*.tar")
    with pytest.raises(ShardSourceError, match=re.escape(f"no manifest for shard pattern '{pattern}': {lonely}/manifest.json does not exist")):
        resolve_shards(pattern, "train")


def test_unknown_split_and_unlisted_shard(shard_dir: Path) -> None:
    with pytest.raises(ShardSourceError, match="has no split 'test'"):
        resolve_shards(str(shard_dir), "test")
    with pytest.raises(ShardSourceError, match="toy-val-000000.tar .* is not in split 'train'"):
        resolve_shards(str(shard_dir / "toy-val-000000.tar"), "train")


def test_empty_spec_is_an_error() -> None:
    with pytest.raises(ShardSourceError, match="no shards configured"):
        resolve_shards("  ", "train")
