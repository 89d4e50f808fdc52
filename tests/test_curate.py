"""`curate` against an independent pure-Python computation of the same filters, per schema variant."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.curate import STATS_NAME, CurateConfig, curate
from meissonic_cli.errors import ConfigError, InputError, OutputExistsError
from meissonic_cli.shapes.source import SCHEMAS, synthetic_table

ROWS = 600


def _write_source(tmp_path: Path, schema: str, files: int = 2, rows: int = ROWS, seed: int = 1) -> Path:
    table = synthetic_table(rows, schema=schema, seed=seed)
    folder = tmp_path / f"src-{schema}"
    folder.mkdir()
    per = -(-rows // files)
    for k in range(files):
        pq.write_table(table.slice(k * per, per), folder / f"part-{k:05d}.parquet")
    return folder


def _rows(folder: Path) -> list[dict]:
    out: list[dict] = []
    for path in sorted(folder.glob("*.parquet")):
        out.extend(pq.read_table(path).to_pylist())
    return out


def _null(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def reference(rows: list[dict], names: dict, cfg: CurateConfig) -> tuple[list[tuple[str, int, int]], list[dict]]:
    """Rows removed (NULL/NaN, by value) per step, in curate's documented order, and the rows kept."""
    cfg = cfg.resolved()
    g = lambda row, role: row[names[role]]  # noqa: E731
    steps = []

    def num(flag, role, ok):
        if getattr(cfg, flag) is not None:
            steps.append((flag, lambda r: _null(g(r, role)), lambda r: ok(g(r, role), getattr(cfg, flag))))

    num("min_aesthetic", "aesthetic", lambda v, t: v >= t)
    num("max_watermark", "watermark", lambda v, t: v < t)
    num("max_unsafe", "unsafe", lambda v, t: v < t)
    num("min_similarity", "similarity", lambda v, t: v >= t)
    size_null = lambda r: _null(g(r, "width")) or _null(g(r, "height"))  # noqa: E731
    if cfg.min_side is not None:
        steps.append(("min_side", size_null, lambda r: min(g(r, "width"), g(r, "height")) >= cfg.min_side))
    num("min_width", "width", lambda v, t: v >= t)
    num("min_height", "height", lambda v, t: v >= t)
    if cfg.max_aspect_ratio is not None:
        steps.append(("max_aspect_ratio", size_null, lambda r: min(g(r, "width"), g(r, "height")) > 0 and
                      max(g(r, "width"), g(r, "height")) <= cfg.max_aspect_ratio * min(g(r, "width"), g(r, "height"))))
    steps.append(("present", lambda r: not g(r, "url") or g(r, "caption") is None or not g(r, "caption").strip(" "),
                  lambda r: True))
    if cfg.min_caption_words is not None:
        steps.append(("min_words", lambda r: False, lambda r: len(g(r, "caption").split()) >= cfg.min_caption_words))
    if cfg.max_caption_words is not None:
        steps.append(("max_words", lambda r: False, lambda r: len(g(r, "caption").split()) <= cfg.max_caption_words))

    counts = []
    for name, is_null, ok in steps:
        nulls = [r for r in rows if is_null(r)]
        rest = [r for r in rows if not is_null(r)]
        kept = [r for r in rest if ok(r)]
        counts.append((name, len(nulls), len(rest) - len(kept)))
        rows = kept
    if cfg.dedup_url:
        seen, kept = set(), []
        for r in rows:
            if g(r, "url") not in seen:
                seen.add(g(r, "url"))
                kept.append(r)
        counts.append(("url duplicates", 0, len(rows) - len(kept)))
        rows = kept
    if cfg.dedup_hash and names.get("hash"):
        seen, kept = set(), []
        for r in rows:
            h = g(r, "hash")
            if h is None or h not in seen:
                seen.add(h)
                kept.append(r)
        counts.append(("hash duplicates", 0, len(rows) - len(kept)))
        rows = kept
    return counts, rows


FILTERS = {
    "laion2b-en-aesthetic": dict(preset="stage1", max_unsafe=0.5, min_similarity=0.25, max_aspect_ratio=2.0,
                                 min_caption_words=4, max_caption_words=10),
    "laion-aesthetics-v2": dict(min_aesthetic=6.0, max_watermark=0.4, max_unsafe=0.6, min_width=200, min_height=150),
    "laion2b-en": dict(max_watermark=0.5, min_side=128, max_aspect_ratio=1.5, min_similarity=0.2),
    "lowercase": dict(preset="stage2", max_caption_words=6, dedup_hash=False),
}


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no-dedup"])
@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_counts_match_independent_computation(tmp_path, schema, dedup):
    src = _write_source(tmp_path, schema)
    filters = dict(FILTERS[schema])
    if not dedup:  # the one-pass path: no dedup, and no word filters (those materialise the rows)
        filters = {k: v for k, v in filters.items() if "caption_words" not in k}
        filters.update(dedup_url=False, dedup_hash=False)
    cfg = CurateConfig(inputs=[str(src)], output=str(tmp_path / "out"), **filters)
    result = curate(cfg)

    expected_counts, expected_rows = reference(_rows(src), SCHEMAS[schema], cfg)
    got = [(s["removed_null_or_nan"], s["removed"]) for s in result.stats["steps"]]
    assert got == [(n, v) for _, n, v in expected_counts]
    assert result.stats["rows_in"] == ROWS
    assert result.stats["rows_out"] == len(expected_rows) > 0
    # every filter really removed something on this dirty data (the synthetic source fails each one)
    assert all(n + v > 0 for name, n, v in expected_counts if "duplicates" not in name)

    out = pq.read_table(tmp_path / "out").to_pylist()
    names = SCHEMAS[schema]
    assert [r["url"] for r in out] == [r[names["url"]] for r in expected_rows]
    assert [r["caption"] for r in out] == [r[names["caption"]] for r in expected_rows]
    if names["aesthetic"]:
        assert [r["aesthetic"] for r in out] == pytest.approx([float(r[names["aesthetic"]]) for r in expected_rows])
    assert [r["pwatermark"] for r in out] == pytest.approx([float(r[names["watermark"]]) for r in expected_rows])

    stats = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert stats["rows_out"] == len(out)
    assert stats["columns"]["url"] == names["url"]
    aest = stats["histograms"].get("aesthetic")
    if names["aesthetic"]:
        valid = [r[names["aesthetic"]] for r in _rows(src) if not _null(r[names["aesthetic"]])]
        assert sum(aest["in"]) == len(valid)  # every schema here filters on the aesthetic score
        assert sum(aest["out"]) == len(out)
        expected = [0] * 10
        for r in out:
            expected[min(max(int(r["aesthetic"]), 0), 9)] += 1
        assert aest["out"] == expected
    else:
        assert aest is None
    # A score no filter reads is not read for an input histogram (that needs --all-histograms).
    sim = stats["histograms"]["similarity"]
    assert (sim["in"] is None) == (cfg.min_similarity is None)
    assert sum(sim["out"]) == sum(not _null(r["similarity"]) for r in out)


def test_dedup_keeps_first_url_then_first_hash(tmp_path):
    src = _write_source(tmp_path, "laion2b-en-aesthetic", files=3)
    cfg = CurateConfig(inputs=[str(src)], output=str(tmp_path / "out"))
    result = curate(cfg)
    expected_counts, expected_rows = reference(_rows(src), SCHEMAS["laion2b-en-aesthetic"], cfg)
    assert [s["step"] for s in result.stats["steps"]] == ["url and caption present", "url duplicates",
                                                          "hash duplicates"]
    assert [(s["removed_null_or_nan"], s["removed"]) for s in result.stats["steps"]] == \
        [(n, v) for _, n, v in expected_counts]
    assert expected_counts[1][2] > 10 and expected_counts[2][2] > 10
    out = pq.read_table(tmp_path / "out")
    assert out.column("url").to_pylist() == [r["URL"] for r in expected_rows]
    assert len(set(out.column("url").to_pylist())) == out.num_rows


def test_inputs_as_files_glob_and_dir_agree(tmp_path):
    src = _write_source(tmp_path, "laion2b-en-aesthetic", files=3)
    files = sorted(str(p) for p in src.glob("*.parquet"))
    runs = [[str(src)], files, [str(src / "*.parquet")], files[:1] + [str(src)]]
    outs = []
    for k, inputs in enumerate(runs):
        r = curate(CurateConfig(inputs=inputs, dry_run=True, min_aesthetic=5.0))
        outs.append((r.stats["rows_in"], r.stats["rows_out"]))
    assert len(set(outs)) == 1 and outs[0][0] == ROWS


def test_preset_and_explicit_override(tmp_path):
    src = _write_source(tmp_path, "laion2b-en-aesthetic")
    r = curate(CurateConfig(inputs=[str(src)], dry_run=True, preset="stage1", min_aesthetic=6.0))
    assert r.stats["filters"] == {"min_aesthetic": 6.0, "max_watermark": 0.5, "min_side": 256}
    r2 = curate(CurateConfig(inputs=[str(src)], dry_run=True, preset="stage3"))
    assert r2.stats["filters"]["min_side"] == 1024 and r2.stats["filters"]["min_aesthetic"] == 8.0


def test_sample_and_limit_are_reproducible(tmp_path):
    src = _write_source(tmp_path, "laion2b-en-aesthetic")

    def urls(seed, out, **kw):
        curate(CurateConfig(inputs=[str(src)], output=str(tmp_path / out), seed=seed, **kw))
        return pq.read_table(tmp_path / out).column("url").to_pylist()

    full = urls(0, "full")
    a, b, c = urls(3, "a", sample_fraction=0.5), urls(3, "b", sample_fraction=0.5), urls(4, "c", sample_fraction=0.5)
    assert a == b and a != c
    assert set(a) <= set(full) and 0.3 * len(full) < len(a) < 0.7 * len(full)
    la, lb = urls(7, "la", limit=25), urls(7, "lb", limit=25)
    assert la == lb and len(la) == 25 and set(la) <= set(full)
    assert la == [u for u in full if u in set(la)]  # output keeps input order
    both = curate(CurateConfig(inputs=[str(src)], dry_run=True, seed=3, sample_fraction=0.5, limit=10))
    names = [s["step"] for s in both.stats["steps"]]
    assert names[-2].startswith("sample fraction") and names[-1].startswith("limit")
    assert both.stats["steps"][-2]["remaining"] == len(a) and both.stats["rows_out"] == 10


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no-dedup"])
def test_shards_follow_input_files_in_order(tmp_path, dedup):
    src = _write_source(tmp_path, "laion2b-en-aesthetic", files=6)
    kw = dict(min_aesthetic=4.0, dedup_url=dedup, dedup_hash=dedup)
    one = curate(CurateConfig(inputs=[str(src)], output=str(tmp_path / "one"), **kw))
    n = one.stats["rows_out"]
    urls = pq.read_table(tmp_path / "one").column("url").to_pylist()
    per_file, k = [], 0  # rows each input file contributes: the output is an in-order subsequence
    for path in sorted(src.glob("*.parquet")):
        start = k
        for u in pq.read_table(path).column("URL").to_pylist():
            if k < len(urls) and u == urls[k]:
                k += 1
        per_file.append(k - start)
    assert k == n
    limit = max(per_file) + 1  # two files never fit one shard, one always does
    many = curate(CurateConfig(inputs=[str(src)], output=str(tmp_path / "many"), shard_rows=limit, **kw))
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in many.shards]
    assert sizes == [n for n in per_file if n] and sum(sizes) == n and len(sizes) > 1
    assert many.stats["shards"] == [f"part-{k:05d}.parquet" for k in range(len(sizes))]
    two = per_file[0] + per_file[1]
    pairs = curate(CurateConfig(inputs=[str(src)], output=str(tmp_path / "pairs"), shard_rows=two, **kw))
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in pairs.shards]
    ends = {sum(per_file[:i]) for i in range(len(per_file) + 1)}
    assert all(s <= two for s in sizes) and {sum(sizes[:i]) for i in range(len(sizes) + 1)} <= ends
    # With dedup the rows per file are exact; one-pass plans on the rows passing the numeric filters
    # (before the caption check), so it may close a shard earlier.
    assert sizes[0] == two if dedup else sizes[0] in (per_file[0], two)
    for out in ("many", "pairs"):
        assert pq.read_table(tmp_path / out).column("url").to_pylist() == urls


def test_keep_col_and_column_override(tmp_path):
    table = synthetic_table(100, schema="laion2b-en-aesthetic", seed=2)
    table = table.rename_columns([{"aesthetic": "my_score"}.get(c, c) for c in table.column_names])
    table = table.append_column("license", pa.array(["cc-by"] * 100))
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(InputError, match="columns present: URL, TEXT"):
        curate(CurateConfig(inputs=[str(tmp_path / "a.parquet")], dry_run=True, min_aesthetic=5))
    r = curate(CurateConfig(inputs=[str(tmp_path / "a.parquet")], output=str(tmp_path / "o"), min_aesthetic=5,
                            aesthetic_col="MY_SCORE", keep_cols=["LICENSE"]))
    out = pq.read_table(tmp_path / "o")
    assert out.column_names[-1] == "license" and set(out.column("license").to_pylist()) == {"cc-by"}
    assert r.stats["columns"]["aesthetic"] == "my_score"
    assert min(out.column("aesthetic").to_pylist()) >= 5


def test_bad_inputs_give_clear_errors_and_keep_output(tmp_path):
    src = _write_source(tmp_path, "laion2b-en", files=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        curate(CurateConfig(inputs=[str(src)], output=str(out)))
    with pytest.raises(InputError, match="does not exist"):
        curate(CurateConfig(inputs=[str(tmp_path / "nope.parquet")], output=str(out), overwrite=True))
    fake = tmp_path / "fake.parquet"
    fake.write_text("URL,TEXT\nhttp://x,y\n")
    with pytest.raises(InputError, match="not a parquet file"):
        curate(CurateConfig(inputs=[str(fake)], output=str(out), overwrite=True))
    with pytest.raises(InputError, match=r"--min-aesthetic needs a aesthetic column.*columns present: URL, TEXT"):
        curate(CurateConfig(inputs=[str(src)], output=str(out), overwrite=True, preset="stage1"))
    with pytest.raises(InputError, match="--url-col 'link_url' is not a column"):
        curate(CurateConfig(inputs=[str(src)], output=str(out), overwrite=True, url_col="link_url"))
    with pytest.raises(ConfigError, match="--sample-fraction"):
        curate(CurateConfig(inputs=[str(src)], output=str(out), sample_fraction=1.5))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not list(tmp_path.glob(".out.tmp-*"))

    r = curate(CurateConfig(inputs=[str(src)], output=str(out), overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [STATS_NAME, "part-00000.parquet"]
    assert r.output == out


def test_cli_dry_run_and_errors(tmp_path):
    src = _write_source(tmp_path, "laion2b-en-aesthetic", files=1)
    runner = CliRunner()
    res = runner.invoke(app, ["curate", str(src), "--preset", "stage1", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "read_parquet" in res.output and "aesthetic >= 4.5" in res.output and "rows out" in res.output
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, ["curate", str(src), "-o", str(tmp_path / "out"), "--min-aesthetic", "5",
                              "--no-dedup-hash"])
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert stats["dedup"] == {"url": True, "hash": False}
    res = runner.invoke(app, ["curate", str(src), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "already exists" in res.output
    res = runner.invoke(app, ["curate", str(tmp_path / "missing"), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "meissonic_cli", "curate", str(tmp_path / "nope.parquet"),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: input") and "Traceback" not in proc.stderr


def test_curate_does_not_import_torch():
    code = ("import sys; import meissonic_cli.data.curate, meissonic_cli.commands.curate, meissonic_cli.shapes.source; "
            "print('torch' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
