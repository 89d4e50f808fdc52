"""`curate` on the real metadata schemas: per-file columns, COYO/DataComp presets, dirty numbers, Unicode words.

Every case writes its own small parquet files shaped like the published ones (laion-art,
improved_aesthetics, COYO-700M, DataComp, img2dataset's `txt`) and checks the rows kept against
values worked out here, with rows placed exactly on each threshold.
"""

from __future__ import annotations

import json
import math
import sys
import unicodedata

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.curate import (
    ROLE_CANDIDATES,
    SCHEMA_MARKERS,
    SCHEMAS,
    SPACE_CODEPOINTS,
    STATS_NAME,
    CurateConfig,
    curate,
    detect_columns,
    detect_schema,
    word_count,
)
from meissonic_cli.errors import ConfigError, InputError

DEDUP = pytest.mark.parametrize("dedup", [False, True], ids=["one-pass", "dedup"])


def _write(path, columns: dict, types: dict | None = None):
    types = types or {}
    pq.write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()}), path)
    return path


def _urls(out) -> list[str]:
    return pq.read_table(out).column("url").to_pylist()


def _run(tmp_path, inputs, name="out", **kw):
    out = tmp_path / name
    result = curate(CurateConfig(inputs=[str(p) for p in inputs], output=str(out), **kw))
    return result, out


def _steps(result) -> dict[str, tuple[int, int]]:
    return {s["step"]: (s["removed_null_or_nan"], s["removed"]) for s in result.stats["steps"]}


# ---------------------------------------------------------------- thresholds


def _boundary_table() -> tuple[dict, list[str]]:
    """One row per side of every threshold of the stage-1-like filters below; returns (columns, urls kept)."""
    below = math.nextafter
    rows = [  # url, aesthetic, pwatermark, punsafe, similarity, width, height, caption, kept
        ("on-aesthetic", 4.5, 0.1, 0.1, 0.3, 300, 300, "a b c", True),
        ("under-aesthetic", below(4.5, 0), 0.1, 0.1, 0.3, 300, 300, "a b c", False),
        ("on-watermark", 5.0, 0.5, 0.1, 0.3, 300, 300, "a b c", False),
        ("under-watermark", 5.0, below(0.5, 0), 0.1, 0.3, 300, 300, "a b c", True),
        ("on-unsafe", 5.0, 0.1, 0.6, 0.3, 300, 300, "a b c", False),
        ("under-unsafe", 5.0, 0.1, below(0.6, 0), 0.3, 300, 300, "a b c", True),
        ("on-similarity", 5.0, 0.1, 0.1, 0.25, 300, 300, "a b c", True),
        ("under-similarity", 5.0, 0.1, 0.1, below(0.25, 0), 300, 300, "a b c", False),
        ("on-side", 5.0, 0.1, 0.1, 0.3, 256, 512, "a b c", True),
        ("under-side", 5.0, 0.1, 0.1, 0.3, 512, 255, "a b c", False),
        ("on-aspect", 5.0, 0.1, 0.1, 0.3, 600, 300, "a b c", True),
        ("over-aspect", 5.0, 0.1, 0.1, 0.3, 601, 300, "a b c", False),
        ("on-min-words", 5.0, 0.1, 0.1, 0.3, 300, 300, "a b", True),
        ("under-min-words", 5.0, 0.1, 0.1, 0.3, 300, 300, "a", False),
        ("on-max-words", 5.0, 0.1, 0.1, 0.3, 300, 300, "a b c d", True),
        ("over-max-words", 5.0, 0.1, 0.1, 0.3, 300, 300, "a b c d e", False),
        ("inf-aesthetic", float("inf"), 0.1, 0.1, 0.3, 300, 300, "a b c", False),
        ("minus-inf-watermark", 5.0, float("-inf"), 0.1, 0.3, 300, 300, "a b c", False),
        ("nan-side", 5.0, 0.1, 0.1, 0.3, float("nan"), 300, "a b c", False),
    ]
    names = ["URL", "aesthetic", "pwatermark", "punsafe", "similarity", "WIDTH", "HEIGHT", "TEXT"]
    cols = {n: [r[k] for r in rows] for k, n in enumerate(names)}
    return cols, [r[0] for r in rows if r[-1]]


BOUNDARY_FILTERS = dict(min_aesthetic=4.5, max_watermark=0.5, max_unsafe=0.6, min_similarity=0.25, min_side=256,
                        max_aspect_ratio=2.0, min_caption_words=2, max_caption_words=4)


@DEDUP
def test_rows_exactly_on_each_threshold(tmp_path, dedup):
    cols, kept = _boundary_table()
    src = _write(tmp_path / "b.parquet", cols, {"WIDTH": pa.float64(), "HEIGHT": pa.float64()})
    result, out = _run(tmp_path, [src], dedup_url=dedup, dedup_hash=dedup, **BOUNDARY_FILTERS)
    assert _urls(out) == kept
    steps = _steps(result)
    assert steps["aesthetic >= 4.5"] == (1, 1)  # inf is not a value; 4.5 - ulp is
    assert steps["pwatermark < 0.5"] == (1, 1)  # -inf; exactly 0.5
    assert steps["min(width, height) >= 256"] == (1, 1)
    assert result.stats["rows_out"] == len(kept)


@DEDUP
def test_numbers_stored_as_strings_parse_or_count_as_unparseable(tmp_path, dedup):
    values = ["5.0", "None", "", "4.5", "nan", "inf", " 6 ", "abc", None, "1e1", "-3"]
    n = len(values)
    src = _write(tmp_path / "s.parquet", {"URL": [f"u{k}" for k in range(n)], "TEXT": ["x"] * n,
                                          "aesthetic": values, "WIDTH": ["300"] * n, "HEIGHT": [300] * n})
    result, out = _run(tmp_path, [src], min_aesthetic=4.5, min_side=256, dedup_url=dedup, dedup_hash=dedup)
    assert _urls(out) == ["u0", "u3", "u6", "u9"]
    assert result.stats["unparseable"] == {"aesthetic": 3, "width": 0}  # 'None', '', 'abc'
    assert _steps(result)["aesthetic >= 4.5"] == (6, 1)  # + NULL, 'nan', 'inf'; '-3' is a value
    written = pq.read_table(out)
    assert written.column("aesthetic").to_pylist() == [5.0, 4.5, 6.0, 10.0]
    assert written.schema.field("width").type == pa.float64()


def test_caption_of_only_a_tab_is_present_spaces_are_not(tmp_path):
    blanks = [chr(c) for c in SPACE_CODEPOINTS]  # every whitespace character alone, then 3 of each
    captions = ["", None, " a ", *blanks, *(c * 3 for c in blanks)]
    n = len(captions)
    src = _write(tmp_path / "c.parquet", {"url": [f"u{k}" for k in range(n)], "caption": captions})
    result, out = _run(tmp_path, [src], dedup_url=False, dedup_hash=False)
    present = [f"u{k}" for k, c in enumerate(captions)
               if c and any(unicodedata.category(ch) != "Zs" for ch in c)]
    assert _urls(out) == present
    assert {"u3", f"u{3 + len(blanks)}"} <= set(present)  # "\t" and "\t\t\t" are captions
    nbsp = captions.index("\xa0")
    assert f"u{nbsp}" not in present  # NBSP alone is not
    assert _steps(result)["url and caption present"] == (n - len(present), 0)


# ---------------------------------------------------------------- words


def test_space_class_is_pythons_isspace():
    assert {chr(c) for c in SPACE_CODEPOINTS} == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}


@DEDUP
def test_word_counts_split_on_unicode_whitespace(tmp_path, dedup):
    captions = ["Reed\xa0Handbill", "one", "a\u2009b\u3000c", "x\u200by", "tab\tand\nnewline", "\x1cA\x1fB"]
    n = len(captions)
    src = _write(tmp_path / "w.parquet", {"url": [f"u{k}" for k in range(n)], "txt": captions})
    _, out = _run(tmp_path, [src], min_caption_words=2, max_caption_words=2, dedup_url=dedup, dedup_hash=dedup)
    assert _urls(out) == [f"u{k}" for k, c in enumerate(captions) if len(c.split()) == 2]
    assert _urls(out) == ["u0", "u5"]  # NBSP splits; ZERO WIDTH SPACE does not, as in str.split()


@settings(max_examples=200, deadline=None)
# Letters and signs that spell the regex itself (x, X, braces, backslash) are words like any other.
@given(st.text(alphabet=st.sampled_from(["a", "x", "X", "{", "}", "\\", "^", "]", "é", "中", "\u200b",
                                         *map(chr, SPACE_CODEPOINTS[::3])]), max_size=20))
def test_word_count_matches_str_split(text):
    # The SQL is built here, not at import, so the test exercises the word_count of the moment.
    assert _DB.execute(f"SELECT {word_count('$1')}", [text]).fetchone()[0] == len(text.split())


_DB = duckdb.connect()


# ---------------------------------------------------------------- column detection


@DEDUP
def test_laion_subsets_with_different_score_names_in_one_call(tmp_path, dedup):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "a-laion-art.parquet", {
        "URL": ["art0", "art1", "art2"], "TEXT": ["x", "y", "z"], "aesthetic": [8.5, 7.0, 9.1],
        "WIDTH": [512, 512, 512], "HEIGHT": [512, 512, 512], "pwatermark": [0.1, 0.1, 0.1]})
    _write(src / "b-improved.parquet", {
        "URL": ["imp0", "imp1"], "TEXT": ["p", "q"], "AESTHETIC_SCORE": [8.0, 5.0],
        "WIDTH": [600, 600], "HEIGHT": [600, 600], "pwatermark": [0.2, 0.2], "punsafe": [0.01, 0.02]})
    result, out = _run(tmp_path, [src], min_aesthetic=8, dedup_url=dedup, dedup_hash=dedup)
    assert _urls(out) == ["art0", "art2", "imp0"]
    assert result.stats["rows_in"] == 5
    assert result.stats["columns"]["aesthetic"] == "aesthetic | AESTHETIC_SCORE"
    assert [f["columns"]["aesthetic"] for f in result.stats["files"]] == ["aesthetic", "AESTHETIC_SCORE"]
    assert _steps(result)["aesthetic >= 8"] == (0, 2)  # nothing dropped as NULL for a missing name
    table = pq.read_table(out)
    assert table.column("aesthetic").to_pylist() == [8.5, 9.1, 8.0]
    assert table.column("punsafe").to_pylist() == [None, None, 0.01]  # only the improved file has it
    # A file with no aesthetic column at all is refused by name, not silently emptied.
    _write(src / "c-no-score.parquet", {"URL": ["n0"], "TEXT": ["t"]})
    with pytest.raises(InputError, match=r"--min-aesthetic needs a aesthetic column but .*c-no-score.parquet has none"):
        _run(tmp_path, [src], name="o2", min_aesthetic=8)
    with pytest.raises(InputError, match=r"--max-watermark needs a watermark column but .*c-no-score"):
        _run(tmp_path, [src], name="o3", max_watermark=0.5)
    # Without those filters its rows go through, with the scores it lacks as NULL.
    result, out = _run(tmp_path, [src], name="o5", dedup_url=dedup, dedup_hash=dedup)
    assert pq.read_table(out).column("aesthetic").to_pylist() == [8.5, 7.0, 9.1, 8.0, 5.0, None]
    assert _urls(out) == ["art0", "art1", "art2", "imp0", "imp1", "n0"]


@DEDUP
def test_txt_caption_and_sha256_hashes(tmp_path, dedup):
    a = _write(tmp_path / "a.parquet", {"url": ["a0", "a1", "a2"], "txt": ["x", "y", "z"],
                                        "sha256": ["h1", "h2", "h1"]})
    b = _write(tmp_path / "b.parquet", {"url": ["b0", "b1"], "txt": ["x", "y"], "sha256hash": ["h2", "h3"]})
    result, out = _run(tmp_path, [a, b], dedup_url=dedup, dedup_hash=dedup)
    assert result.stats["columns"] == {"url": "url", "caption": "txt", "hash": "sha256 | sha256hash"}
    assert _urls(out) == (["a0", "a1", "b1"] if dedup else ["a0", "a1", "a2", "b0", "b1"])
    assert pq.read_table(out).column("caption").to_pylist()[:2] == ["x", "y"]


def _coyo(n: int) -> dict:
    return {
        "id": list(range(n)), "url": [f"c{k}" for k in range(n)], "text": ["a pomsky dog"] * n,
        "width": [1000, 300, 100, 800][:n], "height": [988, 300, 900, 800][:n],
        "image_phash": ["c9b6", "c9b7", "c9b8", "c9b6"][:n], "text_length": [12] * n, "word_count": [3] * n,
        "num_tokens_bert": [5] * n, "num_tokens_gpt": [4] * n, "num_faces": [0] * n,
        "clip_similarity_vitb32": [0.43] * n, "clip_similarity_vitl14": [0.35, 0.2, 0.3, 0.3][:n],
        "nsfw_score_opennsfw2": [0.0003, 0.01, 0.01, 0.9][:n], "nsfw_score_gantman": [0.03] * n,
        "watermark_score": [0.1, 0.4, 0.2, 0.3][:n], "aesthetic_score_laion_v2": [5.4, 4.5, 6.0, 7.0][:n],
    }


@DEDUP
def test_coyo_columns_detected_and_preset(tmp_path, dedup):
    src = _write(tmp_path / "coyo.parquet", _coyo(4))
    assert detect_schema(list(_coyo(1))) == "coyo"
    kw = dict(preset="stage1", max_unsafe=0.5, min_similarity=0.25, dedup_url=dedup, dedup_hash=dedup)
    result, out = _run(tmp_path, [src], **kw)
    # c1: similarity 0.2; c2: side 100; c3: NSFW 0.9. c0 passes everything.
    assert _urls(out) == ["c0"]
    assert result.stats["files"][0]["schema"] == "coyo"
    assert result.stats["columns"] == {
        "url": "url", "caption": "text", "width": "width", "height": "height",
        "similarity": "clip_similarity_vitl14", "hash": "image_phash", "unsafe": "nsfw_score_opennsfw2",
        "watermark": "watermark_score", "aesthetic": "aesthetic_score_laion_v2"}
    explicit, out2 = _run(tmp_path, [src], name="explicit", schema="coyo", **kw)
    assert _urls(out2) == ["c0"] and explicit.stats["schema"] == "coyo"
    with pytest.raises(InputError, match="the datacomp schema has no aesthetic column"):
        _run(tmp_path, [src], name="wrong", schema="datacomp", **kw)


def _datacomp(n: int) -> tuple[dict, dict]:
    cols = {
        "uid": [f"{k:032x}" for k in range(n)], "url": [f"d{k}" for k in range(n)], "text": ["a photo"] * n,
        "original_width": [512, 200, 640, 512][:n], "original_height": [512, 512, 480, 512][:n],
        "clip_b32_similarity_score": [0.3] * n, "clip_l14_similarity_score": [0.31, 0.3, 0.2, 0.33][:n],
        "face_bboxes": [[[0.1, 0.2, 0.3, 0.4]], [], [[0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.1, 0.1]], []][:n],
        "sha256": ["s0", "s1", "s2", "s0"][:n],
    }
    return cols, {"face_bboxes": pa.list_(pa.list_(pa.float32())), "original_width": pa.int64(),
                  "original_height": pa.int64(), "clip_l14_similarity_score": pa.float32()}


@DEDUP
def test_datacomp_columns_detected_and_preset(tmp_path, dedup):
    cols, types = _datacomp(4)
    src = _write(tmp_path / "datacomp.parquet", cols, types)
    assert detect_schema(list(cols)) == "datacomp"
    kw = dict(min_side=256, min_similarity=0.25, keep_cols=["uid", "face_bboxes"], dedup_url=dedup, dedup_hash=dedup)
    result, out = _run(tmp_path, [src], **kw)
    # d1: side 200; d2: similarity 0.2; d3 repeats d0's sha256.
    assert _urls(out) == (["d0"] if dedup else ["d0", "d3"])
    assert result.stats["columns"]["similarity"] == "clip_l14_similarity_score"
    assert result.stats["columns"]["hash"] == "sha256"
    table = pq.read_table(out)
    assert table.column_names[-2:] == ["uid", "face_bboxes"]
    assert table.column("face_bboxes").to_pylist()[0] == [[pytest.approx(0.1), pytest.approx(0.2),
                                                           pytest.approx(0.3), pytest.approx(0.4)]]
    _, out2 = _run(tmp_path, [src], name="explicit", schema="datacomp", **kw)
    assert _urls(out2) == _urls(out)
    with pytest.raises(InputError, match="datacomp schema has no aesthetic column"):
        _run(tmp_path, [src], name="o3", schema="datacomp", min_aesthetic=5)


def test_mixed_schemas_coyo_and_datacomp_in_one_call(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "1-coyo.parquet", _coyo(4))
    cols, types = _datacomp(4)
    _write(src / "2-datacomp.parquet", cols, types)
    result, out = _run(tmp_path, [src], min_side=256, min_similarity=0.25, dedup_url=False, dedup_hash=False)
    assert _urls(out) == ["c0", "c3", "d0", "d3"]
    assert [f["schema"] for f in result.stats["files"]] == ["coyo", "datacomp"]
    table = pq.read_table(out)
    assert table.column("hash").to_pylist() == ["c9b6", "c9b6", "s0", "s0"]
    assert table.column("aesthetic").to_pylist() == [5.4, 7.0, None, None]


def test_schema_flag_on_the_cli(tmp_path):
    src = _write(tmp_path / "coyo.parquet", _coyo(4))
    runner = CliRunner()
    res = runner.invoke(app, ["curate", str(src), "--schema", "coyo", "--preset", "stage1", "--all-histograms",
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert stats["schema"] == "coyo" and stats["rows_out"] == 2
    assert sum(stats["histograms"]["punsafe"]["in"]) == 4  # --all-histograms: unfiltered scores too
    res = runner.invoke(app, ["curate", str(src), "--schema", "webvid", "--dry-run"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "--schema must be one of" in res.output


def test_unknown_schema_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="laion, coyo, datacomp"):
        curate(CurateConfig(inputs=[str(tmp_path)], dry_run=True, schema="LAION-5B"))


# ---------------------------------------------------------------- properties of detection


_OTHER = st.sampled_from(["id", "LANGUAGE", "NSFW", "LICENSE", "key", "status", "exif", "uid", "num_faces"])


def _case(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c.lower() for c, f in zip(name, flips + [False] * len(name)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(role=st.sampled_from(list(ROLE_CANDIDATES)), data=st.data())
def test_detection_finds_any_candidate_in_any_case(role, data):
    candidate = data.draw(st.sampled_from(ROLE_CANDIDATES[role]))
    name = _case(candidate, data.draw(st.lists(st.booleans(), max_size=len(candidate))))
    others = data.draw(st.lists(_OTHER, max_size=4, unique=True))
    present = data.draw(st.permutations(others + [name]))
    found = detect_columns(present, {})
    assert found[role] == name
    # Whatever else is present, every role found is a present column and no column serves two roles.
    assert set(found.values()) <= set(present)
    assert len(set(found.values())) == len(found)


@settings(max_examples=100, deadline=None)
@given(schema=st.sampled_from(list(SCHEMAS)), extra=st.lists(_OTHER, max_size=3, unique=True), data=st.data())
def test_schema_detection_and_strict_names(schema, extra, data):
    names = [n for names in SCHEMAS[schema].values() for n in names[:1]]
    present = data.draw(st.permutations(names + [e for e in extra if e not in names]))
    assert detect_schema(present) == schema
    strict = detect_columns(present, {}, schema, strict=True)
    assert strict == {role: names[0] for role, names in SCHEMAS[schema].items()}
    # Markers of two schemas at once: ambiguous, the generic names decide.
    other = next(s for s in SCHEMA_MARKERS if s != schema)
    assert detect_schema(present + [SCHEMA_MARKERS[other][0]]) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                                 st.text(max_size=6)), min_size=1, max_size=12))
def test_any_strings_in_a_score_column_never_fail_the_run(tmp_path_factory, values):
    folder = tmp_path_factory.mktemp("prop")
    n = len(values)
    src = _write(folder / "p.parquet", {"url": [f"u{k}" for k in range(n)], "text": ["x"] * n, "aesthetic": values},
                 {"aesthetic": pa.string()})
    result = curate(CurateConfig(inputs=[str(src)], output=str(folder / "out"), min_aesthetic=0.5,
                                 dedup_url=False, dedup_hash=False))

    def parse(v):
        try:
            return float(v.strip())
        except (AttributeError, ValueError):
            return None

    null, value = _steps(result)["aesthetic >= 0.5"]
    assert null + value + result.stats["rows_out"] == n
    # Values Python and DuckDB both read as numbers agree on which rows pass.
    written = set(_urls(folder / "out"))
    for k, v in enumerate(values):
        x = parse(v)
        plain = v is not None and v.isascii() and "_" not in v and not any(c.isspace() and c != " " for c in v)
        if x is not None and plain:
            assert (f"u{k}" in written) == (math.isfinite(x) and x >= 0.5), v
    assert result.stats["unparseable"]["aesthetic"] <= sum(v is not None for v in values)


@pytest.mark.parametrize("shard_rows", [1_000_000, 60])
def test_many_files_and_histograms_plan_shards_without_a_file_key(tmp_path, shard_rows):
    # 12 files x 4 histogrammed filter columns: too many (code, file, bins) groups for one GROUP BY,
    # so the stats scan drops the file from its key and counts rows per file only when shards need it.
    from meissonic_cli.shapes.source import synthetic_table

    table = synthetic_table(600, seed=3)
    src = tmp_path / "src"
    src.mkdir()
    for k in range(12):
        pq.write_table(table.slice(50 * k, 50), src / f"part-{k:02d}.parquet")
    kw = dict(min_aesthetic=5, max_watermark=0.5, max_unsafe=0.5, min_similarity=0.2, all_histograms=True,
              dedup_url=False, dedup_hash=False, shard_rows=shard_rows)
    result, out = _run(tmp_path, [src], **kw)

    def ok(r):
        vals = [r["aesthetic"], r["pwatermark"], r["punsafe"], r["similarity"]]
        if any(v is None or not math.isfinite(v) for v in vals) or not r["URL"] or not (r["TEXT"] or "").strip(" "):
            return False
        return vals[0] >= 5 and vals[1] < 0.5 and vals[2] < 0.5 and vals[3] >= 0.2

    expected = [r["URL"] for r in table.to_pylist() if ok(r)]
    assert _urls(out) == expected
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in result.shards]
    assert sum(sizes) == len(expected) and (len(sizes) == 1) == (shard_rows > len(expected))
    assert all(s <= shard_rows for s in sizes)
    assert sum(result.stats["histograms"]["punsafe"]["in"]) == sum(
        r["punsafe"] is not None and math.isfinite(r["punsafe"]) for r in table.to_pylist())
