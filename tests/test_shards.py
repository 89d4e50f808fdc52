"""Token shard format: writer/reader round trip, completeness marker, rank split and resume cursor."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from meissonic_cli.data.shards import (
    DataCursor,
    ShardStream,
    TokenSample,
    TokenShardWriter,
    list_token_shards,
    read_dataset_info,
    read_shard_stats,
    read_token_shard,
    safe_key,
    stats_path,
    write_dataset_info,
)
from meissonic_cli.errors import InputError


def _sample(i: int, mode: str = "full") -> TokenSample:
    rng = np.random.default_rng(i)
    return TokenSample(
        key=f"{i:09d}",
        codes=rng.integers(0, 8192, (4, 6)).astype(np.uint16),
        micro=np.array([640 + i, 480, 3, 5, 6.5], dtype=np.float32),
        caption=f"caption {i} é",
        text=rng.standard_normal((77, 8)).astype(np.float16) if mode == "full" else None,
        pooled=rng.standard_normal(8).astype(np.float16) if mode != "none" else None,
        meta={"url": f"http://x/{i}", "aesthetic": 6.5},
    )


def _write(directory, index, samples, failures=()):
    with TokenShardWriter(directory, index, source=f"src-{index}") as w:
        for s in samples:
            w.write(s)
        for key, reason in failures:
            w.add_failure(key, reason)
    return w


def test_round_trip_and_member_layout(tmp_path):
    samples = [_sample(i) for i in range(3)] + [_sample(3, "pooled"), _sample(4, "none")]
    _write(tmp_path, 0, samples, failures=[("bad", "corrupt jpeg")])
    shard = tmp_path / "tokens-00000.tar"
    stats = read_shard_stats(shard)
    assert stats["count"] == 5 and stats["failed"] == 1 and stats["failures"][0]["key"] == "bad"
    assert stats["bytes"] == shard.stat().st_size and stats["source"] == "src-0"

    with tarfile.open(shard) as tar:
        names = tar.getnames()
        codes = np.load(io.BytesIO(tar.extractfile("000000000.codes.npy").read()))
    assert "000000000.text.npy" in names and "000000003.text.npy" not in names and "000000004.pooled.npy" not in names
    assert {"000000000.micro.npy", "000000000.txt", "000000000.json"} <= set(names)
    assert codes.dtype == np.uint16 and codes.shape == (4, 6)

    got = list(read_token_shard(shard))
    assert [g.key for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples):
        assert np.array_equal(g.codes, s.codes) and g.codes.dtype == np.uint16
        assert g.micro.dtype == np.float32 and np.array_equal(g.micro, s.micro)
        assert g.caption == s.caption and g.meta == s.meta
        assert (g.text is None) == (s.text is None) and (g.pooled is None) == (s.pooled is None)
        if s.text is not None:
            assert g.text.dtype == np.float16 and np.array_equal(g.text, s.text)
    assert [g.key for g in read_token_shard(shard, start=3)] == ["000000003", "000000004"]


def test_incomplete_shards_are_ignored(tmp_path):
    with pytest.raises(InputError, match="does not exist.*meissonic tokenize"):
        list_token_shards(tmp_path / "missing")
    with pytest.raises(InputError, match="no complete token shards.*meissonic tokenize"):
        list_token_shards(tmp_path)
    _write(tmp_path, 0, [_sample(0)])
    _write(tmp_path, 1, [_sample(1)])
    stats_path(tmp_path / "tokens-00001.tar").unlink()  # as if interrupted before the stats file
    assert [p.name for p in list_token_shards(tmp_path)] == ["tokens-00000.tar"]


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with TokenShardWriter(tmp_path, 7) as w:
            w.write(_sample(0))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_samples(tmp_path):
    with TokenShardWriter(tmp_path, 0) as w:
        with pytest.raises(ValueError, match="safe_key"):
            w.write(TokenSample(key="a.b", codes=np.zeros((2, 2)), micro=np.zeros(5)))
        with pytest.raises(ValueError, match="shape"):
            w.write(TokenSample(key="a", codes=np.zeros((2, 2)), micro=np.zeros(4)))
        w.write(TokenSample(key="a", codes=np.zeros((2, 2)), micro=np.zeros(5)))
        with pytest.raises(ValueError, match="duplicate"):
            w.write(TokenSample(key="a", codes=np.zeros((2, 2)), micro=np.zeros(5)))
    assert safe_key("dir/img.001 copy") == "dir_img_001_copy"


def _keys(stream: ShardStream) -> list[str]:
    with stream:
        return [s.key for s in stream]


def test_rank_split_and_resume_cursor(tmp_path):
    for shard in range(5):
        _write(tmp_path, shard, [_sample(shard * 10 + j, "none") for j in range(3)])
    keys = {r: _keys(ShardStream.open(tmp_path, rank=r, world_size=2, epochs=1)) for r in (0, 1)}
    assert len(keys[0]) == 9 and len(keys[1]) == 6  # shards 0,2,4 and 1,3
    assert not set(keys[0]) & set(keys[1])
    assert keys[0][:3] == ["000000000", "000000001", "000000002"] and keys[1][0] == "000000010"

    stream = ShardStream.open(tmp_path, rank=0, world_size=2, epochs=1)
    for _ in range(5):
        next(stream)
    cursor = DataCursor(**stream.cursor.to_dict())  # resume right after the 5th sample
    stream.close()
    assert cursor.to_dict() == {"epoch": 0, "position": 1, "offset": 2}
    assert _keys(ShardStream.open(tmp_path, rank=0, world_size=2, epochs=1, cursor=cursor)) == keys[0][5:]

    # An endless stream continues into the next epoch; shuffling permutes shards and samples afresh each epoch.
    stream = ShardStream.open(tmp_path, shuffle=True, seed=1)
    epoch0 = [next(stream).key for _ in range(15)]
    assert stream.cursor.to_dict() == {"epoch": 1, "position": 0, "offset": 0}
    assert sorted(epoch0) == sorted(_keys(ShardStream.open(tmp_path, epochs=1)))
    assert epoch0 != sorted(epoch0)
    cur = DataCursor(**stream.cursor.to_dict())
    again = ShardStream.open(tmp_path, shuffle=True, seed=1, cursor=cur)
    assert [next(again).key for _ in range(7)] == [next(stream).key for _ in range(7)]
    again.close()
    stream.close()

    with pytest.raises(InputError, match="cannot feed 8 ranks"):
        ShardStream.open(tmp_path, rank=7, world_size=8)


def test_dataset_info(tmp_path):
    with pytest.raises(InputError, match="meissonic tokenize"):
        read_dataset_info(tmp_path)
    write_dataset_info(tmp_path, {"format": "meissonic-tokens", "resolution": 256, "grid": [16, 16]})
    assert read_dataset_info(tmp_path)["grid"] == [16, 16]
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="format"):
        read_dataset_info(tmp_path)


def test_damaged_tar_is_an_input_error(tmp_path):
    _write(tmp_path, 0, [_sample(i) for i in range(3)])
    shard = tmp_path / "tokens-00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged tar"):
        list(read_token_shard(shard))


def test_repeat_over_empty_shards_stops(tmp_path):
    _write(tmp_path, 0, [])
    assert _keys(ShardStream.open(tmp_path, epochs=1)) == []
    with pytest.raises(InputError, match="every token shard of this rank is empty"):
        next(ShardStream.open(tmp_path))
