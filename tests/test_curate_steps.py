"""curate's SQL builder (data/curate_steps.py) on its own: histogram bins, the shard plan and the
message for a filter whose column is missing (issue 15: the survivors of a mutation run)."""

from __future__ import annotations

import math

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meissonic_cli.data import curate_steps
from meissonic_cli.data.curate import CurateConfig, curate
from meissonic_cli.data.curate_steps import bin_expr, hist_list, plan_shards
from meissonic_cli.errors import InputError


def test_hist_list_sums_keys_into_their_bins_and_clamps_the_ends() -> None:
    keys = {0.0: 3, -math.inf: 1, -2.0: 2, 4.0: 5, 9.0: 1, 12.0: 2, math.inf: 4, None: 7, math.nan: 9}
    assert hist_list(keys, 10) == [6, 0, 0, 0, 5, 0, 0, 0, 0, 7]
    assert hist_list(None, 3) == [0, 0, 0] and hist_list({}, 2) == [0, 0]


@pytest.mark.parametrize(("per_file", "shard_rows", "expected"), [
    ([4, 4, 6, 4], 10, [[0, 1], [2, 3]]),  # the second shard counts from zero again
    ([3, 0, 4], 10, [[0, 2]]),  # a file with no rows left is skipped, the walk goes on
    ([0, 0], 10, [[]]),  # nothing left: one empty shard
    ([12, 1], 10, [[0], [1]]),  # a file bigger than a shard is a shard of its own
    ([5, 5, 5], 10, [[0, 1], [2]]),  # exactly full is still one shard
])
def test_plan_shards(per_file: list[int], shard_rows: int, expected: list[list[int]]) -> None:
    assert plan_shards(per_file, shard_rows) == expected


def test_bin_expr_counts_bins_from_the_low_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    db = duckdb.connect()
    values = [-1.0, -0.95, -0.5, 0.0, 0.49, 0.99]
    monkeypatch.setitem(curate_steps.HISTOGRAMS, "offset", (-1.0, 1.0, 4))  # bins of width 0.5 from -1
    sql = f"SELECT {bin_expr('v', 'offset')} FROM (SELECT unnest(?) AS v)"
    assert [r[0] for r in db.execute(sql, [values]).fetchall()] == [0, 0, 1, 2, 2, 3]
    monkeypatch.setitem(curate_steps.HISTOGRAMS, "one", (1.0, 2.0, 4))  # a low edge of exactly 1
    sql = f"SELECT {bin_expr('v', 'one')} FROM (SELECT unnest(?) AS v)"
    assert [r[0] for r in db.execute(sql, [[1.0, 1.3, 1.5, 1.99]]).fetchall()] == [0, 1, 2, 3]
    monkeypatch.setitem(curate_steps.HISTOGRAMS, "zero", (0.0, 0.5, 10))  # the similarity bins
    sql = f"SELECT {bin_expr('v', 'zero')} FROM (SELECT unnest(?) AS v)"
    assert [r[0] for r in db.execute(sql, [[0.0, 0.049, 0.05, 0.49]]).fetchall()] == [0, 0, 1, 9]


def _parquet(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_missing_filter_column_names_what_was_looked_for(tmp_path) -> None:
    laion = [_parquet(tmp_path / f"l{i}.parquet", {"URL": ["u"], "TEXT": ["a cat"]}) for i in range(2)]
    with pytest.raises(InputError) as err:
        curate(CurateConfig(inputs=laion, output=str(tmp_path / "o1"), schema="laion", min_aesthetic=5))
    assert "have none (looked for aesthetic, AESTHETIC_SCORE)" in str(err.value)

    datacomp = _parquet(tmp_path / "d.parquet", {"url": ["u"], "text": ["a cat"]})
    with pytest.raises(InputError) as err:
        curate(CurateConfig(inputs=[datacomp], output=str(tmp_path / "o2"), schema="datacomp", max_unsafe=0.5))
    assert "has none (looked for nothing: the datacomp schema has no unsafe column)" in str(err.value)

    with pytest.raises(InputError) as err:
        curate(CurateConfig(inputs=[datacomp], output=str(tmp_path / "o3"), min_similarity=0.3))
    assert ("has none (looked for similarity, clip_similarity, clip_score, clip_similarity_vitl14, "
            "clip_l14_similarity_score)") in str(err.value)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
    assert "pass --similarity-col NAME or curate those files separately" in str(err.value)


@pytest.mark.parametrize(("flag", "lacking"), [
    ("min_side", "width"), ("min_side", "height"), ("max_aspect_ratio", "width"), ("max_aspect_ratio", "height"),
    ("min_width", "width"), ("min_height", "height")])
def test_size_filters_name_themselves_when_a_size_column_is_missing(tmp_path, lacking: str, flag: str) -> None:
    cols = {"url": ["u"], "caption": ["a cat"], "width": [64.0], "height": [64.0]}
    del cols[lacking]
    src = _parquet(tmp_path / "s.parquet", cols)
    with pytest.raises(InputError, match=rf"^--{flag.replace('_', '-')} needs a {lacking} column but "):
        curate(CurateConfig(inputs=[src], output=str(tmp_path / "o"), **{flag: 2}))


def test_stats_name_every_step_with_its_flag_and_column(tmp_path) -> None:
    src = _parquet(tmp_path / "laion.parquet", {
        "URL": ["u0", "u1"], "TEXT": ["a red cat", "dog"], "WIDTH": [512.0, 100.0], "HEIGHT": [512.0, 400.0],
        "similarity": [0.35, 0.31], "punsafe": [0.01, 0.2], "pwatermark": [0.1, 0.2], "AESTHETIC_SCORE": [6.5, 5.5]})
    result = curate(CurateConfig(
        inputs=[src], output=str(tmp_path / "o"), min_aesthetic=5, max_watermark=0.5, max_unsafe=0.25,
        min_similarity=0.3, min_side=64, min_width=32, min_height=32, max_aspect_ratio=2, min_caption_words=1,
        max_caption_words=50, dedup_url=False, dedup_hash=False))
    steps = [(s["step"], s["flag"], s["column"], s["removed"]) for s in result.stats["steps"]]
    assert steps == [
        ("aesthetic >= 5", "--min-aesthetic", "AESTHETIC_SCORE", 0),
        ("pwatermark < 0.5", "--max-watermark", "pwatermark", 0),
        ("punsafe < 0.25", "--max-unsafe", "punsafe", 0),
        ("similarity >= 0.3", "--min-similarity", "similarity", 0),
        ("min(width, height) >= 64", "--min-side", "WIDTH", 0),
        ("width >= 32", "--min-width", "WIDTH", 0),
        ("height >= 32", "--min-height", "HEIGHT", 0),
        ("aspect ratio <= 2", "--max-aspect-ratio", "WIDTH", 1),  # 100 x 400
        ("url and caption present", None, None, 0),
        ("caption words >= 1", "--min-caption-words", "TEXT", 0),
        ("caption words <= 50", "--max-caption-words", "TEXT", 0),
    ]
