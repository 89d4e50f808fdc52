"""Token shard guards: refused input, error messages, small helpers and writer/stream details.

Complements tests/test_shards.py (round trip, rank split, resume): each test here pins one behaviour
a mutation run showed was not pinned yet.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from meissonic_cli.data.shards import (
    ShardStream,
    TokenSample,
    TokenShardWriter,
    decode_sample,
    is_complete,
    iter_tar_groups,
    list_token_shards,
    rank_shards,
    read_dataset_info,
    read_shard_stats,
    read_token_shard,
    remove_stale_temp_files,
    safe_key,
    shard_name,
    split_member_name,
    stats_path,
    write_dataset_info,
)
from meissonic_cli.errors import InputError


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _codes() -> bytes:
    return _npy(np.arange(6, dtype=np.uint16).reshape(2, 3))


def _micro() -> bytes:
    return _npy(np.array([64, 48, 0, 0, 5.0], dtype=np.float32))


def _raw_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A plain tar holding `members` (name -> bytes) in order, written without the shard writer."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(i: int, **kw) -> TokenSample:
    return TokenSample(key=f"{i:05d}", codes=np.full((2, 3), i, dtype=np.uint16),
                       micro=np.array([64, 48, 0, 0, 5.0], dtype=np.float32), caption=f"c{i}", **kw)


def _write(directory: Path, index: int, samples: list[TokenSample]) -> Path:
    with TokenShardWriter(directory, index) as w:
        for s in samples:
            w.write(s)
    return w.path


# --------------------------------------------------------------------------------------------
# Reading: refused input and messages

UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Trap:
    """Unpickling this object calls `_record_unpickling`: proof that a pickle was executed."""

    def __reduce__(self):
        return _record_unpickling, ("trap",)


def test_pickled_codes_are_refused_and_never_unpickled(tmp_path):
    UNPICKLED.clear()
    evil = _npy(np.array([_Trap()], dtype=object), allow_pickle=True)
    shard = _raw_tar(tmp_path / "tokens-00000.tar", {"a.codes.npy": evil, "a.micro.npy": _micro()})
    # One input error naming the shard, the sample and the member; nothing in the file may run.
    with pytest.raises(InputError, match=r"tokens-00000\.tar: sample 'a' has an unreadable codes\.npy .*pickle"):
        list(read_token_shard(shard))
    with pytest.raises(InputError, match="x.tar: sample 'a' has an unreadable codes.npy"):
        decode_sample("a", {"codes.npy": evil, "micro.npy": _micro()}, "x.tar")
    with pytest.raises(InputError, match="unreadable micro.npy"):
        decode_sample("a", {"codes.npy": _codes(), "micro.npy": b"\x93NUMPY garbage"}, "x.tar")
    assert UNPICKLED == []


def test_sample_without_caption_decodes_with_empty_caption():
    sample = decode_sample("a", {"codes.npy": _codes(), "micro.npy": _micro()}, "x.tar")
    assert sample.caption == "" and sample.meta == {} and sample.text is None and sample.pooled is None
    assert sample.codes.shape == (2, 3)


@pytest.mark.parametrize("missing", ["codes.npy", "micro.npy"])
def test_sample_lacking_arrays_is_not_a_token_shard(tmp_path, missing):
    fields = {"codes.npy": _codes(), "micro.npy": _micro(), "txt": b"hi"}
    del fields[missing]
    with pytest.raises(InputError) as err:
        decode_sample("img7", fields, "/data/tokens-00003.tar")
    text = str(err.value)
    assert "/data/tokens-00003.tar" in text and "'img7'" in text and "not a token shard" in text


def test_decode_error_in_a_shard_names_that_shard(tmp_path):
    shard = _raw_tar(tmp_path / "tokens-00000.tar",
                     {"ok.codes.npy": _codes(), "ok.micro.npy": _micro(), "bad.codes.npy": _codes()})
    got = []
    with pytest.raises(InputError) as err:
        for s in read_token_shard(shard):
            got.append(s.key)
    assert got == ["ok"]
    assert str(err.value).startswith(f"{shard}: sample 'bad'")


def test_is_complete_needs_shard_and_stats(tmp_path):
    shard = tmp_path / shard_name(0)
    assert not is_complete(shard)
    stats_path(shard).write_text("{}")
    assert not is_complete(shard)  # stats without the tar
    stats_path(shard).unlink()
    _raw_tar(shard, {"a.codes.npy": _codes()})
    assert not is_complete(shard)  # tar without stats: an interrupted run
    stats_path(shard).write_text("{}")
    assert is_complete(shard) and is_complete(str(shard))


def test_iter_tar_groups_honours_member_limit(tmp_path):
    shard = _raw_tar(tmp_path / "t.tar", {"a.txt": b"x" * 10, "a.json": b"{}", "b.txt": b"y" * 200})
    assert [k for k, _ in iter_tar_groups(shard, max_member_bytes=200)] == ["a", "b"]
    with pytest.raises(InputError, match=r"'b\.txt' is 200 bytes, over the limit of 199"):
        list(iter_tar_groups(shard, max_member_bytes=199))


def test_rank_shards_defaults_and_messages():
    shards = [Path(f"tokens-{i:05d}.tar") for i in range(3)]
    assert rank_shards(shards) == shards  # rank 0 of 1: everything
    assert rank_shards(shards[:1]) == shards[:1]
    with pytest.raises(InputError, match=r"^rank 2 is not in \[0, world_size=2\)$"):
        rank_shards(shards, 2, 2)
    with pytest.raises(InputError, match=r"^rank 0 is not in \[0, world_size=0\)$"):
        rank_shards(shards, 0, 0)
    with pytest.raises(InputError, match=r"3 token shard\(s\) cannot feed 4 ranks.*or train on fewer ranks$"):
        rank_shards(shards, 3, 4)


def test_missing_dataset_info_hints_at_tokenize(tmp_path):
    with pytest.raises(InputError) as err:
        read_dataset_info(tmp_path)
    text = str(err.value)
    assert str(tmp_path / "dataset.json") in text and "not a token dataset" in text
    assert f"run `meissonic tokenize --out {tmp_path}` first" in text


# --------------------------------------------------------------------------------------------
# Small helpers


def test_remove_stale_temp_files_only_removes_that_shards_temporaries(tmp_path):
    stale = [tmp_path / f".{shard_name(3)}.tmp-{pid}" for pid in (12, 4567)]
    keep = [tmp_path / f".{shard_name(4)}.tmp-12", tmp_path / shard_name(3), tmp_path / "other.txt"]
    for p in stale + keep:
        p.write_bytes(b"x")
    remove_stale_temp_files(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    remove_stale_temp_files(tmp_path, 3)  # nothing left to remove: no error


def test_safe_key_of_empty_name():
    assert safe_key("") == "_"


def test_split_member_name_keeps_directories():
    assert split_member_name("dir/key.ext") == ("dir/key", "ext")
    assert split_member_name("a/b/key.codes.npy") == ("a/b/key", "codes.npy")
    assert split_member_name("key.txt") == ("key", "txt")
    assert split_member_name("dir/noext") == ("dir/noext", "")


def test_tar_groups_with_directories_stay_apart(tmp_path):
    shard = _raw_tar(tmp_path / "t.tar", {"x/k.txt": b"1", "x/k.json": b"{}", "y/k.txt": b"2"})
    assert [(k, sorted(g)) for k, g in iter_tar_groups(shard)] == [("x/k", ["json", "txt"]), ("y/k", ["txt"])]


# --------------------------------------------------------------------------------------------
# ShardStream


def _dataset(tmp_path: Path, sizes: list[int]) -> list[Path]:
    return [_write(tmp_path, i, [_sample(i * 10 + j) for j in range(n)]) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [[0, 0, 1], [0, 0, 0, 2], [0, 1]])
def test_endless_stream_skips_up_to_all_but_one_empty_shard(tmp_path, sizes):
    shards = _dataset(tmp_path, sizes)
    with ShardStream(shards) as stream:
        keys = [next(stream).key for _ in range(3 * sum(sizes))]
    last = len(sizes) - 1
    assert keys == [f"{last * 10 + j:05d}" for j in range(sizes[-1])] * 3


@pytest.mark.parametrize("n", [1, 2, 3])
def test_endless_stream_over_only_empty_shards_fails_after_one_full_round(tmp_path, n):
    shards = _dataset(tmp_path, [0] * n)
    stream = ShardStream(shards)
    with pytest.raises(InputError, match="every token shard of this rank is empty"):
        next(stream)
    # every shard was looked at (one full round) before giving up
    assert (stream.cursor.epoch, stream.cursor.position) == (1, 0)
    stream.close()


def test_stream_keeps_only_current_and_next_shard_loaded(tmp_path):
    shards = _dataset(tmp_path, [2] * 6)
    most = 0
    with ShardStream(shards) as stream:
        for _ in range(2 * 12):  # two epochs
            next(stream)
            most = max(most, len(stream._loaded))
    assert most <= 2


# --------------------------------------------------------------------------------------------
# TokenShardWriter


def test_writer_output_is_reproducible_with_zero_mtime(tmp_path):
    samples = [_sample(i, pooled=np.ones(4, dtype=np.float16), meta={"i": i}) for i in range(3)]
    a = _write(tmp_path / "a", 0, samples)
    b = _write(tmp_path / "b", 0, samples)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert members and all(m.mtime == 0 for m in members)


def test_writer_creates_missing_parent_folders(tmp_path):
    out = tmp_path / "deep" / "er" / "tokens"
    path = _write(out, 2, [_sample(0)])
    assert path == out / "tokens-00002.tar" and is_complete(path)


def test_writer_stats_name_the_shard(tmp_path):
    path = _write(tmp_path, 5, [_sample(0)])
    stats = read_shard_stats(path)
    assert stats["shard"] == "tokens-00005.tar" == path.name
    assert json.loads(stats_path(path).read_text())["shard"] == path.name


def test_writer_stores_non_json_meta_as_text(tmp_path):
    meta = {"source": tmp_path / "img.jpg", "n": 3}
    path = _write(tmp_path, 0, [_sample(0, meta=meta)])
    (got,) = read_token_shard(path)
    assert got.meta == {"source": str(tmp_path / "img.jpg"), "n": 3}


def test_writer_stores_pooled_and_text_as_float16(tmp_path):
    pooled = np.linspace(0, 1, 8, dtype=np.float32)
    text = np.linspace(0, 1, 77 * 4, dtype=np.float64).reshape(77, 4)
    path = _write(tmp_path, 0, [_sample(0, pooled=pooled, text=text)])
    (got,) = read_token_shard(path)
    assert got.pooled.dtype == np.float16 and np.array_equal(got.pooled, pooled.astype(np.float16))
    assert got.text.dtype == np.float16 and got.text.shape == (77, 4)


# --------------------------------------------------------------------------------------------
# More survivors of a second (fresh) sample: messages name the shard and sample, files are
# written with sorted keys, the writer closes once, the stream prefetches and seeds by default


def test_unreadable_members_name_the_shard_and_the_sample() -> None:
    bad = b"\x93NUMPY garbage"
    for member in ("micro.npy", "pooled.npy", "text.npy"):
        fields = {"codes.npy": _codes(), "micro.npy": _micro(), member: bad}
        with pytest.raises(InputError, match=rf"^/d/tokens-00001\.tar: sample 'k9' has an unreadable {member} "):
            decode_sample("k9", fields, "/d/tokens-00001.tar")


def test_an_oversized_member_names_its_tar(tmp_path):
    shard = _raw_tar(tmp_path / "tokens-00004.tar", {"b.txt": b"y" * 200})
    with pytest.raises(InputError, match=r"tokens-00004\.tar"):
        list(iter_tar_groups(shard, max_member_bytes=10))


def test_missing_dataset_and_shard_messages(tmp_path):
    with pytest.raises(InputError) as err:
        list_token_shards(tmp_path / "nowhere")
    assert str(err.value) == (f"token dataset {tmp_path / 'nowhere'} does not exist; "
                              f"run `meissonic tokenize --out {tmp_path / 'nowhere'}` first")
    with pytest.raises(InputError) as err:
        list(read_token_shard(tmp_path / "tokens-00000.tar"))
    assert str(err.value) == f"token shard {tmp_path / 'tokens-00000.tar'} not found"


def test_dataset_info_and_shard_stats_are_written_with_sorted_keys(tmp_path):
    write_dataset_info(tmp_path, {"zeta": 1, "alpha": {"y": 2, "b": 3}, "mid": [1]})
    text = (tmp_path / "dataset.json").read_text()
    assert list(json.loads(text)) == ["alpha", "mid", "zeta"] and text.index('"b"') < text.index('"y"')
    shard = _write(tmp_path, 0, [_sample(1)])
    stats = json.loads(stats_path(shard).read_text())
    assert list(stats) == sorted(stats)


def test_writer_closes_once(tmp_path):
    with TokenShardWriter(tmp_path, 0) as w:
        w.write(_sample(1))
        first = w.close()
        stats_file = tmp_path / "tokens-00000.stats.json"
        before = (w.path.read_bytes(), stats_file.read_bytes())
    w.abort()  # after close: nothing to drop
    assert first["count"] == 1 and (w.path.read_bytes(), stats_file.read_bytes()) == before
    assert is_complete(w.path)


def test_stream_prefetches_the_next_shard_while_reading_this_one(tmp_path):
    shards = _dataset(tmp_path, [3, 3, 3])
    with ShardStream(shards) as stream:
        next(stream)
        assert len(stream._loaded) == 2  # this shard and the next one, requested ahead


def test_shuffled_stream_default_seed_is_zero(tmp_path):
    shards = _dataset(tmp_path, [1] * 8)
    with ShardStream(shards, shuffle=True) as a, ShardStream(shards, shuffle=True, seed=0) as b, \
            ShardStream(shards, shuffle=True, seed=1) as c:
        first, zero, one = ([next(s).key for _ in range(8)] for s in (a, b, c))
    assert first == zero and first != one and sorted(first) == sorted(one)


def test_non_finite_features_are_a_damaged_shard() -> None:
    """NaN or infinity in a float member (text, pooled, micro) is refused with the shard and sample named:
    `tokenize` never writes one, so the file was damaged after its stats file called it complete."""
    base = {"codes.npy": _codes(), "micro.npy": _micro()}
    cases = [("pooled.npy", _npy(np.array([0.5, np.nan, 1.0], dtype=np.float16))),
             ("text.npy", _npy(np.full((2, 3), np.inf, dtype=np.float16))),
             ("micro.npy", _npy(np.array([64, 48, 0, 0, -np.inf], dtype=np.float32)))]
    for member, data in cases:
        with pytest.raises(InputError, match=rf"^/d/tokens-00002\.tar: sample 'k3' has non-finite values \(NaN or "
                                             rf"infinity\) in {member}; the shard is damaged: re-run `meissonic tokenize`"):
            decode_sample("k3", {**base, member: data}, "/d/tokens-00002.tar")
    finite = decode_sample("k3", {**base, "pooled.npy": _npy(np.array([0.5, -2.0], dtype=np.float16))}, "x.tar")
    assert finite.pooled.tolist() == [0.5, -2.0]
