"""`curate`: filter LAION-style parquet metadata with DuckDB SQL, end to end.

Reads one or many parquet files (files, directories, globs), finds the columns it needs whatever
the dump calls them (per file, case-insensitively, with `--schema` presets for LAION, COYO-700M
and DataComp and explicit overrides), applies the filters in a fixed order, removes duplicate URLs
and hashes, optionally samples, and writes parquet shards with canonical column names (`url`,
`caption`, then the metadata kept) that `download` reads.

Filter order (the order of the stats report): aesthetic, watermark, unsafe, similarity, min side,
min width, min height, aspect ratio, url/caption present, caption words; then URL dedup, hash
dedup, sampling, limit. A row whose filtered column is NULL, NaN or +-inf (or a string that does
not parse as a number) is dropped and counted against that filter. A caption counts as present
unless it is NULL, empty or only space characters (Unicode Zs: space, NBSP, ideographic space...,
what DuckDB's trim() strips); a caption of a tab or a newline is present. Of duplicates the first
row in input order (file, row) is kept. Output rows keep input order; shards follow input files (see `--shard-rows`).

Speed: without dedup, sampling or word filters, the whole run is one scan of the numeric filter
columns (per-step counts and input histograms, all aggregates of one query) plus the filtering
`COPY` itself, the same query a user would write; output histograms come from reading back the
few numeric columns written. Dedup, sampling and word filters materialise the filtered rows once
and order them (their cost is reported separately by `benchmarks/curate_speed.py`).

The presets are the paper's data recipe (section 2.5): stage 1 trains at 256 px on LAION with
aesthetic >= 4.5 and watermark probability < 0.5; stage 2 (512 px) keeps aesthetic >= 8; stage 3
(1024 px) filters the stage-2 set by resolution and aesthetic. Stages 2 and 3 refine the stage-1
set, so they keep its watermark filter. Explicit flags override the preset.

No pandas and no torch here: this module must start fast, since `meissonic curate` is measured
as a whole process against a bare DuckDB query (`benchmarks/curate_speed.py`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meissonic_cli.atomic import atomic_directory, write_json
from meissonic_cli.config import Problems, field, flag_of
from meissonic_cli.data.columns import (  # noqa: F401 (re-exported)
    NUMERIC_ROLES,
    OUTPUT_NAMES,
    ROLE_CANDIDATES,
    SCHEMA_MARKERS,
    SCHEMAS,
    column_names,
    detect_columns,
    detect_schema,
    file_list,
    output_items,
    plan_runs,
    quote_ident,
    quote_lit,
    read_columns,
    resolve_inputs,
    run_sql,
    source_sql,
    subset_runs,
)
from meissonic_cli.data.curate_steps import (  # noqa: F401 (re-exported)
    HISTOGRAMS,
    SPACE_CODEPOINTS,
    bin_expr,
    build_steps,
    fail_case,
    hist_expr,
    hist_list,
    plan_shards,
    word_count,
)
from meissonic_cli.errors import InputError, OutputExistsError

if TYPE_CHECKING:
    import duckdb
    from rich.table import Table

PRESETS: dict[str, dict[str, float]] = {
    "stage1": {"min_aesthetic": 4.5, "max_watermark": 0.5, "min_side": 256},
    "stage2": {"min_aesthetic": 8.0, "max_watermark": 0.5, "min_side": 512},
    "stage3": {"min_aesthetic": 8.0, "max_watermark": 0.5, "min_side": 1024},
}

STATS_NAME = "_curate_stats.json"  # "_" prefix: pyarrow and Spark readers of the folder skip it


@dataclass
class CurateConfig:
    """Everything `meissonic curate` does; field help is the CLI help."""

    inputs: list[str] = field(
        default_factory=list,
        help="Parquet files, directories (searched recursively) or globs of LAION-style metadata."
    )
    output: str | None = field(
        None,
        help="Output directory for the curated parquet shards and _curate_stats.json.",
        flag="--out",
        short="-o",
        aliases=("--output",),
    )
    preset: str | None = field(
        None,
        help="The paper's filters: stage1 (aesthetic >= 4.5, watermark < 0.5, side >= 256), stage2 (aesthetic >= "
             "8, watermark < 0.5, side >= 512), stage3 (aesthetic >= 8, watermark < 0.5, side >= 1024). Explicit "
             "flags override it."
    )
    url_col: str | None = field(None, help="Column holding the image URL (default: detected, e.g. URL or url).")
    caption_col: str | None = field(None, help="Column holding the caption (default: detected, e.g. TEXT or caption).")
    aesthetic_col: str | None = field(
        None,
        help="Column holding the aesthetic score (default: detected, e.g. aesthetic or AESTHETIC_SCORE)."
    )
    watermark_col: str | None = field(
        None,
        help="Column holding the watermark probability (default: detected, e.g. pwatermark)."
    )
    unsafe_col: str | None = field(None, help="Column holding the NSFW probability (default: detected, e.g. punsafe).")
    similarity_col: str | None = field(
        None,
        help="Column holding the CLIP image-text similarity (default: detected, e.g. similarity)."
    )
    width_col: str | None = field(None, help="Column holding the original image width (default: detected, e.g. WIDTH).")
    height_col: str | None = field(
        None,
        help="Column holding the original image height (default: detected, e.g. HEIGHT)."
    )
    hash_col: str | None = field(
        None,
        help="Column holding the image hash used for dedup (default: detected, e.g. hash)."
    )
    min_aesthetic: float | None = field(None, help="Keep rows with aesthetic score >= this.")
    max_watermark: float | None = field(None, help="Keep rows with watermark probability < this (strictly).")
    max_unsafe: float | None = field(None, help="Keep rows with NSFW probability < this (strictly).")
    min_similarity: float | None = field(None, help="Keep rows with CLIP similarity >= this.")
    min_side: int | None = field(None, help="Keep rows whose shorter side is >= this many pixels.")
    min_width: int | None = field(None, help="Keep rows with width >= this many pixels.")
    min_height: int | None = field(None, help="Keep rows with height >= this many pixels.")
    max_aspect_ratio: float | None = field(None, help="Keep rows with longer side / shorter side <= this.")
    min_caption_words: int | None = field(
        None,
        help="Keep rows whose caption has >= this many whitespace-separated words."
    )
    max_caption_words: int | None = field(
        None,
        help="Keep rows whose caption has <= this many whitespace-separated words."
    )
    dedup_url: bool = field(True, help="Drop rows repeating an earlier row's URL.")
    dedup_hash: bool = field(
        True,
        help="Drop rows repeating an earlier row's hash (when a hash column exists; NULL hashes are kept)."
    )
    keep_cols: list[str] = field(
        default_factory=list,
        help="Extra input columns to copy to the output unchanged (repeatable).",
        flag="--keep-col",
    )
    sample_fraction: float | None = field(
        None,
        help="Keep a random fraction (0, 1] of the filtered rows, reproducible with --seed."
    )
    limit: int | None = field(None, help="Keep at most this many rows, chosen at random (reproducible with --seed).")
    seed: int = field(0, help="Seed for --sample-fraction and --limit.")
    schema: str | None = field(
        None,
        help="Column names of a known metadata schema: laion (URL, TEXT, aesthetic or AESTHETIC_SCORE, pwatermark, "
             "...), coyo (COYO-700M: url, text, aesthetic_score_laion_v2, watermark_score, clip_similarity_vitl14, "
             "...) or datacomp (url, text, original_width, clip_l14_similarity_score, sha256). Default: detected per "
             "file where unambiguous, else the generic candidate names.",
        panel="Columns",
    )
    shard_rows: int = field(
        1_000_000,
        help="Rows per output parquet shard: consecutive input files go to one shard until it would exceed this "
             "(an input file's rows are never split, so one large file makes one larger shard; without dedup the rows "
             "are counted before the url/caption check, so a shard can come out a little smaller).",
    )
    overwrite: bool = field(False, help="Replace an existing output directory (only once the new output is complete).")
    dry_run: bool = field(False, help="Print the SQL and the counts; write nothing.")
    all_histograms: bool = field(
        False,
        help="Also histogram the input's scores that no filter reads (e.g. punsafe, similarity under --preset "
             "stage1): one more column read each. Scores a filter reads and all output scores always are.",
    )

    def resolved(self) -> "CurateConfig":
        """A copy with the preset's filters filled in where no explicit value was given."""
        if not self.preset:
            return dataclasses.replace(self)
        values = {k: v for k, v in PRESETS.get(self.preset, {}).items() if getattr(self, k) is None}
        return dataclasses.replace(self, **values)

    def validate(self) -> None:
        p = Problems(self)
        f = lambda name: flag_of(CurateConfig, name)  # noqa: E731
        p.check(bool(self.inputs), "give at least one input parquet file, directory or glob")
        p.check(self.dry_run or bool(self.output), f"{f('output')} is required (or use {f('dry_run')})")
        p.check(self.preset is None or self.preset in PRESETS,
                f"{f('preset')} must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        p.check(self.schema is None or self.schema in SCHEMAS,
                f"{f('schema')} must be one of {', '.join(SCHEMAS)}, got {self.schema!r}")
        for name in ("min_side", "min_width", "min_height", "min_caption_words", "max_caption_words"):
            v = getattr(self, name)
            p.check(v is None or v >= 0, f"{f(name)} must be >= 0, got {v}")
        for name in ("min_aesthetic", "max_watermark", "max_unsafe", "min_similarity"):
            v = getattr(self, name)
            p.check(v is None or math.isfinite(v), f"{f(name)} must be a finite number, got {v}")
        p.check(self.max_aspect_ratio is None or self.max_aspect_ratio >= 1,
                f"{f('max_aspect_ratio')} must be >= 1, got {self.max_aspect_ratio}")
        p.check(self.min_caption_words is None or self.max_caption_words is None
                or self.min_caption_words <= self.max_caption_words,
                f"{f('min_caption_words')} must not exceed {f('max_caption_words')}")
        p.check(self.sample_fraction is None or 0 < self.sample_fraction <= 1,
                f"{f('sample_fraction')} must be in (0, 1], got {self.sample_fraction}")
        p.check(self.limit is None or self.limit >= 1, f"{f('limit')} must be >= 1, got {self.limit}")
        p.check(self.shard_rows >= 1, f"{f('shard_rows')} must be >= 1, got {self.shard_rows}")
        p.raise_if_any()


@dataclass
class CurateResult:
    """What `curate` did: the stats report (also saved as JSON), the SQL and the shards written."""

    stats: dict[str, Any]
    sql: str
    shards: list[Path]
    output: Path | None


# ---------------------------------------------------------------- running it


def _connect(temp_dir: Path | None) -> "duckdb.DuckDBPyConnection":
    import duckdb

    con = duckdb.connect(":memory:")
    if temp_dir is not None:
        # Large curations spill to disk; keep the spill beside the output, not in the working directory.
        con.execute(f"SET temp_directory = {quote_lit(str(temp_dir))}")
    return con


def curate(cfg: CurateConfig) -> CurateResult:
    """Filter, dedup and sample the inputs of `cfg`; write shards + stats unless `cfg.dry_run`."""
    cfg = cfg.resolved()
    cfg.validate()
    start = time.perf_counter()
    files = resolve_inputs(cfg.inputs)

    out = Path(cfg.output) if cfg.output else None
    if out is not None and not cfg.dry_run:
        from meissonic_cli.data.inputs import check_output_apart, check_output_parent

        check_output_parent(out, "--out")
        check_output_apart(out, cfg.inputs, files)
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; choose another --out")
        if out.exists() and any(out.iterdir()) and not cfg.overwrite:
            raise OutputExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it "
                                    "or choose another --out")

    if out is None or cfg.dry_run:
        return _curate(cfg, files, None, start)
    # Built in a hidden sibling folder that replaces `out` only when complete; a folder left by a
    # killed run is removed here.
    with atomic_directory(out) as tmp:
        result = _curate(cfg, files, tmp, start)
    result.output = out
    result.shards = [out / p.name for p in result.shards]
    return result


def _curate(cfg: CurateConfig, files: list[Path], tmp: Path | None, start: float) -> CurateResult:
    con = _connect((tmp / ".spill") if tmp is not None else None)
    runs = plan_runs(files, read_columns(con, files), schema=cfg.schema, keep_cols=cfg.keep_cols,
                     overrides={role: getattr(cfg, f"{role}_col") for role in ROLE_CANDIDATES})
    roles = [r for r in OUTPUT_NAMES if any(r in run.cols for run in runs)]
    taken = {OUTPUT_NAMES[r].lower(): r for r in roles}
    keep_cols: list[str] = []  # output names: as the first file holding the column spells it
    for c in cfg.keep_cols:
        if c.lower() in taken:
            role = taken[c.lower()]
            raise InputError(f"--keep-col {c!r} is already in the output as {OUTPUT_NAMES[role]!r} (the {role} "
                             "column); drop that --keep-col")
        name = next(run.keep[c.lower()] for run in runs if c.lower() in run.keep)
        if name.lower() not in {k.lower() for k in keep_cols}:
            keep_cols.append(name)
    dedup_hash = cfg.dedup_hash and "hash" in roles
    steps = build_steps(cfg, runs)
    num_steps = [(i, st) for i, st in enumerate(steps) if st.numeric]
    str_steps = [(i, st) for i, st in enumerate(steps) if not st.numeric]
    hist_roles = [r for r in HISTOGRAMS if r in roles]
    text_roles = [r for r in NUMERIC_ROLES if any(run.text(r) for run in runs)]
    num_roles = [r for r in roles if r in NUMERIC_ROLES]
    n_files = len(files)

    # 1. One scan of the numeric filter columns, one GROUP BY over (step code, input file, score bin):
    #    rows removed by each numeric step, rows of each file left, input histograms of the scores
    #    the filters read anyway, unparseable numbers. Scores no filter reads are histogrammed in the
    #    input only with --all-histograms (another column read; the output histograms always are).
    step_roles = {r for r in num_roles for _, st in num_steps if re.search(rf"\b{r}\b", st.keep_sql)}
    in_roles = [r for r in hist_roles if r in step_roles or cfg.all_histograms]
    stats_roles = [r for r in num_roles if r in step_roles or r in in_roles or r in text_roles]
    groups = (2 * len(num_steps) + 1) * n_files * 12 ** len(in_roles)
    file_key = f" * {n_files} + __file" if groups <= 2_000_000 else ""  # else counted per file only if needed
    stats_src = source_sql(runs, stats_roles, [], raw=text_roles, position=True)
    stats_sql = (f"SELECT ({fail_case(num_steps)}){file_key} AS k"
                 + "".join(f",\n  {bin_expr(r, r)} AS h_{r}" for r in in_roles)
                 + ",\n  count(*) AS n"
                 + "".join(f",\n  count(*) FILTER (WHERE __raw_{r} IS NOT NULL AND {r} IS NULL) AS bad_{r}"
                           for r in text_roles)
                 + f"\nFROM (\n  {stats_src})\nGROUP BY ALL")
    rows_in = 0
    by_code: dict[int, int] = {}
    passed = [0] * n_files  # rows of each file that pass every numeric step
    hist_in: dict[str, dict[Any, int]] = {r: {} for r in in_roles}
    unparseable = {OUTPUT_NAMES[r]: 0 for r in text_roles}
    one_shard: list[list[int]] | None = None
    for row in run_sql(con, stats_sql, "read the input").fetchall():
        code, f = divmod(int(row[0]), n_files) if file_key else (int(row[0]), 0)
        n = int(row[1 + len(in_roles)])
        rows_in += n
        by_code[code] = by_code.get(code, 0) + n
        if code == 0:
            passed[f] += n
        for k, r in enumerate(in_roles):
            hist_in[r][row[1 + k]] = hist_in[r].get(row[1 + k], 0) + n
        for k, r in enumerate(text_roles):
            unparseable[OUTPUT_NAMES[r]] += int(row[2 + len(in_roles) + k])
    if not file_key and n_files > 1:
        if sum(passed) > cfg.shard_rows:
            num_where = " AND ".join(st.keep_sql for _, st in num_steps) or "true"
            per_file = run_sql(con, f"SELECT __file, count(*) FROM ({stats_src}) WHERE {num_where} GROUP BY 1",
                            "count the rows of each input file").fetchall()
            passed = [0] * n_files
            for f, n in per_file:
                passed[int(f)] = int(n)
        else:  # it all fits one shard: no need to know which file holds what
            one_shard = [list(range(n_files))]

    words = any(st.role == "caption" for _, st in str_steps)
    fast = not (cfg.dedup_url or dedup_hash or cfg.sample_fraction is not None or cfg.limit is not None or words)
    out_items = ", ".join(output_items(roles, keep_cols))
    keep_where = "\n    AND ".join(st.keep_sql for st in steps)
    sql_parts: list[str] = []
    shards: list[Path] = []
    hist_out: dict[str, dict[Any, int]] = {r: {} for r in hist_roles}
    if fast:
        # 2. The filtering COPY itself, one per shard (input files in order, order preserved).
        plan = one_shard or plan_shards(passed, cfg.shard_rows)
        copy_sql = "COPY (SELECT {items}\n  FROM ({src})\n  WHERE {where})\nTO {path} (FORMAT parquet)"
        sql_parts.append(copy_sql.format(items=out_items, src=source_sql(runs, roles, keep_cols),
                                         where=keep_where, path="'part-NNNNN.parquet'"))
        written: list[tuple[Path, int]] = []
        if tmp is not None:
            for k, indices in enumerate(plan):
                sub = subset_runs(runs, indices) or runs[:1]
                where = keep_where if indices else "false"
                path = tmp / f".part-{k:05d}.parquet"
                n = run_sql(con, copy_sql.format(items=out_items, src=source_sql(sub, roles, keep_cols), where=where,
                                              path=quote_lit(str(path))), "write the output").fetchone()[0]
                written.append((path, int(n)))
            if len(written) > 1:  # a shard whose rows all failed the caption check: drop it
                written = [w for w in written if w[1]] or written[:1]
            for k, (path, n) in enumerate(written):
                shards.append(path.rename(tmp / f"part-{k:05d}.parquet"))
            remaining = sum(n for _, n in written)
            # 3. Output histograms: the few score columns written, read back (one GROUP BY).
            counts_sql = ("SELECT " + "".join(f"{bin_expr(quote_ident(OUTPUT_NAMES[r]), r)} AS h_{r}, " for r in hist_roles)
                          + f"count(*) FROM read_parquet({file_list(shards)})\nGROUP BY ALL")
            what = "read back the output"
        else:
            counts_sql = ("SELECT " + "".join(f"{bin_expr(r, r)} AS h_{r}, " for r in hist_roles)
                          + f"count(*) FROM ({source_sql(runs, roles, [])})\n  WHERE {keep_where}\nGROUP BY ALL")
            what = "count the rows kept"
        got_rows = run_sql(con, counts_sql, what).fetchall() if hist_roles or tmp is None else []
        if tmp is None:
            remaining = sum(int(r[-1]) for r in got_rows)
        for row in got_rows:
            for k, r in enumerate(hist_roles):
                hist_out[r][row[k]] = hist_out[r].get(row[k], 0) + int(row[-1])
        # Rows that passed the numeric steps and were not written failed the url/caption check.
        i_present = str_steps[0][0]
        by_code[2 * i_present + 1] = sum(passed) - remaining
        after: dict[str, int] = {}
    else:
        # 2. The rows the numeric filters kept, flagged by the string steps, dedup, sampling and limit.
        con.execute("SET preserve_insertion_order = false")  # the shards are ordered explicitly
        order = "__file, __row"
        url_first = (f"row_number() OVER (PARTITION BY url, __sfail ORDER BY {order}) = 1" if cfg.dedup_url
                     else "true")
        # Hash dedup runs on the URL-deduplicated rows: those sort first in each hash partition.
        hash_first = (f"hash IS NULL OR row_number() OVER (PARTITION BY hash ORDER BY NOT __url_first, {order}) = 1"
                      if dedup_hash else "true")
        pick = f"(hash(url, {int(cfg.seed)}) % 1000000)"
        sampled = f"{pick} < {round(cfg.sample_fraction * 1_000_000)}" if cfg.sample_fraction is not None else "true"
        num_where = "\n    AND ".join(st.keep_sql for _, st in num_steps) or "true"
        ranked_sql = (f"CREATE TEMP TABLE ranked AS\nWITH src AS ({source_sql(runs, roles, keep_cols, position=True)}),\n"
                      f"kept AS (SELECT *, {fail_case(str_steps)} AS __sfail FROM src\n  WHERE {num_where}),\n"
                      f"u AS (SELECT *, __sfail = 0 AND ({url_first}) AS __url_first FROM kept),\n"
                      f"h AS (SELECT *, __url_first AND ({hash_first}) AS __hash_first FROM u)\n"
                      f"SELECT *, __hash_first AND {sampled} AS __sampled, __hash_first AND {sampled} AS __keep FROM h")
        sql_parts.append(ranked_sql)
        run_sql(con, ranked_sql, "filter the input")
        if cfg.limit is not None:
            limit_sql = (f"CREATE OR REPLACE TEMP TABLE ranked AS SELECT * REPLACE (__keep AND row_number() OVER "
                         f"(PARTITION BY __keep ORDER BY {pick}, {order}) <= {cfg.limit} AS __keep) FROM ranked")
            sql_parts.append(limit_sql)
            run_sql(con, limit_sql, "apply --limit")
        counts_sql = ("SELECT histogram(__sfail), count(*) FILTER (WHERE __url_first), "
                      "count(*) FILTER (WHERE __hash_first), count(*) FILTER (WHERE __sampled), "
                      "histogram(__file) FILTER (WHERE __keep)"
                      + "".join(f", {hist_expr(r, r)} FILTER (WHERE __keep)" for r in hist_roles) + " FROM ranked")
        got = run_sql(con, counts_sql, "count the rows kept").fetchone()
        by_code.update({int(k): int(v) for k, v in (got[0] or {}).items() if k})
        after = {"url duplicates": got[1], "hash duplicates": got[2], "sample": got[3]}
        kept_per_file = [0] * n_files
        for f, n in (got[4] or {}).items():
            kept_per_file[int(f)] = int(n)
        after["limit"] = remaining = sum(kept_per_file)
        for k, r in enumerate(hist_roles):
            hist_out[r] = dict(got[5 + k] or {})
        # 3. The shards, in input order.
        copy_sql = (f"COPY (SELECT {out_items} FROM ranked WHERE __keep AND __file IN ({{files}}) ORDER BY {order})\n"
                    "TO {path} (FORMAT parquet)")
        sql_parts.append(copy_sql.format(files="<input files of the shard>", path="'part-NNNNN.parquet'"))
        if tmp is not None:
            for k, indices in enumerate(plan_shards(kept_per_file, cfg.shard_rows)):
                path = tmp / f"part-{k:05d}.parquet"
                run_sql(con, copy_sql.format(files=", ".join(map(str, indices or [-1])), path=quote_lit(str(path))),
                     "write the output")
                shards.append(path)

    report: list[dict[str, Any]] = []
    left = rows_in
    col_names = {role: column_names(runs, role) for role in roles}
    for i, st in enumerate(steps):
        null, value = by_code.get(2 * i + 1, 0), by_code.get(2 * i + 2, 0)
        left -= null + value
        report.append({"step": st.name, "flag": st.flag, "column": col_names.get(st.role) if st.role else None,
                       "removed_null_or_nan": null, "removed": value, "remaining": left})
    later = []
    if not fast:
        if cfg.dedup_url:
            later.append(("url duplicates", "--dedup-url", col_names["url"], after["url duplicates"]))
        if dedup_hash:
            later.append(("hash duplicates", "--dedup-hash", col_names["hash"], after["hash duplicates"]))
        if cfg.sample_fraction is not None:
            later.append((f"sample fraction {cfg.sample_fraction:g} (seed {cfg.seed})", "--sample-fraction", None,
                          after["sample"]))
        if cfg.limit is not None:
            later.append((f"limit {cfg.limit} (seed {cfg.seed})", "--limit", None, after["limit"]))
    for name, flag, column, n in later:
        report.append({"step": name, "flag": flag, "column": column, "removed_null_or_nan": 0,
                       "removed": left - n, "remaining": n})
        left = n
    histograms = {}
    for k, r in enumerate(hist_roles):
        lo, hi, bins = HISTOGRAMS[r]
        histograms[OUTPUT_NAMES[r]] = {"edges": [lo + (hi - lo) * b / bins for b in range(bins + 1)],
                                       "in": hist_list(hist_in[r], bins) if r in hist_in else None,
                                       "out": hist_list(hist_out[r], bins)}
    con.close()

    full_sql = (f"-- rows removed by each numeric filter, input histograms\n{stats_sql};\n\n-- output\n"
                + ";\n\n".join(sql_parts)
                + (f";\n\n-- rows removed by dedup, sampling and limit; output histograms\n{counts_sql};"
                   if counts_sql else ";"))
    stats = {
        "inputs": [str(p) for p in files],
        "schema": cfg.schema,
        "columns": col_names,
        "files": [{"files": [str(p) for p in run.files], "schema": run.schema, "columns": run.cols} for run in runs],
        "unparseable": unparseable,
        "filters": {k: getattr(cfg, k) for k in ("min_aesthetic", "max_watermark", "max_unsafe", "min_similarity",
                                                   "min_side", "min_width", "min_height", "max_aspect_ratio",
                                                   "min_caption_words", "max_caption_words") if getattr(cfg, k) is not None},
        "preset": cfg.preset,
        "dedup": {"url": cfg.dedup_url, "hash": dedup_hash},
        "rows_in": rows_in,
        "steps": report,
        "rows_out": left,
        "histograms": histograms,
        "shards": [p.name for p in shards],
        "dry_run": cfg.dry_run,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if tmp is not None:
        shutil.rmtree(tmp / ".spill", ignore_errors=True)
        write_json(tmp / STATS_NAME, stats)
    return CurateResult(stats=stats, sql=full_sql, shards=shards, output=None)


# ---------------------------------------------------------------- reporting

_SPARK = " ▁▂▃▄▅▆▇█"


def _sparkline(counts: list[int]) -> str:
    top = max(counts) if counts else 0
    if top == 0:
        return " " * len(counts)
    return "".join(_SPARK[0 if c == 0 else max(1, round(c / top * (len(_SPARK) - 1)))] for c in counts)


def stats_table(stats: dict[str, Any]) -> "Table":
    """A rich table of the stats report: one row per step, then a histogram sparkline per score."""
    from rich.table import Table

    table = Table(title="curate" + (" (dry run)" if stats.get("dry_run") else ""), title_justify="left")
    table.add_column("step")
    table.add_column("removed (NULL/NaN)", justify="right")
    table.add_column("removed", justify="right")
    table.add_column("remaining", justify="right")
    table.add_row("rows in", "", "", f"{stats['rows_in']:,}")
    for s in stats["steps"]:
        table.add_row(s["step"], f"{s['removed_null_or_nan']:,}" if s["removed_null_or_nan"] else "",
                      f"{s['removed']:,}", f"{s['remaining']:,}")
    table.add_row("[bold]rows out[/bold]", "", "", f"[bold]{stats['rows_out']:,}[/bold]")
    for name, h in stats.get("histograms", {}).items():
        table.add_row(f"{name} {h['edges'][0]:g}..{h['edges'][-1]:g}", "", f"in  {_sparkline(h['in'])}" if h["in"] is not None else "in  (not read)",
                      f"out {_sparkline(h['out'])}")
    return table
