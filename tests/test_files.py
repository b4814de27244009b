"""spade_dist.files: the one atomic-write guarantee every writer of the project relies on."""
import os
import stat

import pytest

from spade_dist.files import (
    TEMP_INFIX,
    append_jsonl,
    atomic_output,
    read_jsonl,
    remove_stale_temps,
    write_atomic,
    write_json_atomic,
)


def test_write_atomic_replaces_whole_file_and_is_0644(tmp_path):
    old = os.umask(0o077)
    try:
        path = write_atomic(tmp_path / "sub" / "a.json", "old")
        write_atomic(path, b"new")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = write_atomic(tmp_path / "a.bin", b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as handle:
            handle.write(b"half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_concurrent_writers_use_unique_temps_that_a_sweep_removes(tmp_path):
    final = tmp_path / "shard.tar"
    with atomic_output(final) as first, atomic_output(final) as second:
        temps = sorted(p.name for p in tmp_path.iterdir())
        assert len(temps) == 2 and all(name.startswith("shard.tar" + TEMP_INFIX) for name in temps)
        first.write(b"1")
        second.write(b"2")
    assert final.read_bytes() == b"1"  # the outer block ended last
    (tmp_path / f"shard.tar{TEMP_INFIX}12345").write_bytes(b"crash leftover")
    assert [p.name for p in remove_stale_temps(final)] == [f"shard.tar{TEMP_INFIX}12345"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]


def test_write_json_atomic_is_indented_and_newline_terminated(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"b": 1, "a": "é"}, sort_keys=True)
    assert path.read_text(encoding="utf-8") == '{\n "a": "é",\n "b": 1\n}\n'


def test_jsonl_append_cuts_a_torn_tail_and_the_reader_ignores_one(tmp_path):
    path = tmp_path / "eval" / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"step": 2, "fi')  # a writer killed mid-line
    assert read_jsonl(path) == [{"step": 1}]
    append_jsonl(path, {"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(KeyError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_jsonl(path, error=KeyError)
    assert read_jsonl(tmp_path / "missing.jsonl") == []
