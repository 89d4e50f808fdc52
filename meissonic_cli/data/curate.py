"""`curate`: filter LAION-style parquet metadata with DuckDB SQL, end to end.

Reads one or many parquet files (files, directories, globs), finds the columns it needs whatever
the dump calls them (case-insensitively, with explicit overrides), applies the filters in a fixed
order, removes duplicate URLs and hashes, optionally samples, and writes parquet shards with
canonical column names (`url`, `caption`, then the metadata kept) that `download` reads.

Filter order (the order of the stats report): url/caption present, aesthetic, watermark, unsafe,
similarity, min side, min width, min height, aspect ratio, caption words; then URL dedup, hash
dedup, sampling, limit. A row whose filtered column is NULL or NaN is dropped and counted
against that filter. Of duplicates the first row in input order (file name, row) is kept.

The presets are the paper's data recipe (section 2.5): stage 1 trains at 256 px on LAION with
aesthetic >= 4.5 and watermark probability < 0.5; stage 2 (512 px) keeps aesthetic >= 8; stage 3
(1024 px) filters the stage-2 set by resolution and aesthetic. Stages 2 and 3 refine the stage-1
set, so they keep its watermark filter. Explicit flags override the preset.

No pandas and no torch here: this module must start fast, since `meissonic curate` is measured
as a whole process against a bare DuckDB query (`benchmarks/curate_speed.py`).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meissonic_cli.atomic import replace_directory, write_json
from meissonic_cli.config import Problems, field, flag_of
from meissonic_cli.errors import InputError, OutputExistsError

if TYPE_CHECKING:
    import duckdb
    from rich.table import Table

PRESETS: dict[str, dict[str, float]] = {
    "stage1": {"min_aesthetic": 4.5, "max_watermark": 0.5, "min_side": 256},
    "stage2": {"min_aesthetic": 8.0, "max_watermark": 0.5, "min_side": 512},
    "stage3": {"min_aesthetic": 8.0, "max_watermark": 0.5, "min_side": 1024},
}

# Candidate names of each role, matched case-insensitively, first match wins.
ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "url": ("url", "image_url", "link"),
    "caption": ("text", "caption", "alt", "alt_text"),
    "width": ("width", "original_width", "image_width"),
    "height": ("height", "original_height", "image_height"),
    "similarity": ("similarity", "clip_similarity", "clip_score"),
    "hash": ("hash", "image_hash"),
    "unsafe": ("punsafe", "p_unsafe", "unsafe"),
    "watermark": ("pwatermark", "p_watermark", "watermark"),
    "aesthetic": ("aesthetic", "aesthetic_score", "aesthetics"),
}
# Output name of each role: LAION's lower-case names, `caption` for the text.
OUTPUT_NAMES: dict[str, str] = {
    "url": "url", "caption": "caption", "width": "width", "height": "height",
    "similarity": "similarity", "hash": "hash", "unsafe": "punsafe", "watermark": "pwatermark",
    "aesthetic": "aesthetic",
}
NUMERIC_ROLES = ("width", "height", "similarity", "unsafe", "watermark", "aesthetic")
# Histogram bins per score: (low, high, bins); values outside go to the end bins.
HISTOGRAMS: dict[str, tuple[float, float, int]] = {
    "aesthetic": (0.0, 10.0, 10),
    "watermark": (0.0, 1.0, 10),
    "unsafe": (0.0, 1.0, 10),
    "similarity": (0.0, 0.5, 10),
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
        flag="--output",
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
    shard_rows: int = field(1_000_000, help="Rows per output parquet shard.")
    overwrite: bool = field(False, help="Replace an existing output directory (only once the new output is complete).")
    dry_run: bool = field(False, help="Print the SQL and the counts; write nothing.")

    def resolved(self) -> "CurateConfig":
        """A copy with the preset's filters filled in where no explicit value was given."""
        if not self.preset:
            return dataclasses.replace(self)
        values = {k: v for k, v in PRESETS.get(self.preset, {}).items() if getattr(self, k) is None}
        return dataclasses.replace(self, **values)

    def validate(self) -> None:
        p = Problems()
        f = lambda name: flag_of(CurateConfig, name)  # noqa: E731
        p.check(bool(self.inputs), "give at least one input parquet file, directory or glob")
        p.check(self.dry_run or bool(self.output), f"{f('output')} is required (or use {f('dry_run')})")
        p.check(self.preset is None or self.preset in PRESETS,
                f"{f('preset')} must be one of {', '.join(PRESETS)}, got {self.preset!r}")
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


# ---------------------------------------------------------------- inputs and columns


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, directories (recursively) and globs into a sorted, de-duplicated file list."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"no files match {item!r}; expected parquet files of LAION metadata")
            files.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not matches:
                raise InputError(f"no *.parquet files under directory {item}")
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"input {item} does not exist; expected a parquet file, a directory or a glob")
    seen: set[Path] = set()
    out = []
    for p in files:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    for p in out:
        _check_parquet(p)
    return out


def _check_parquet(path: Path) -> None:
    # The magic at both ends is cheap to check and turns DuckDB's low-level error into a clear one.
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
        if size >= 8:
            fh.seek(size - 4)
        tail = fh.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise InputError(f"{path} is not a parquet file (no PAR1 magic); expected LAION-style parquet metadata")


def detect_columns(present: list[str], overrides: dict[str, str | None]) -> dict[str, str]:
    """Map each role to a column of `present`: override if given, else the first candidate found.

    Matching is case-insensitive; an exact-case match wins over others.
    """
    lower: dict[str, list[str]] = {}
    for name in present:
        lower.setdefault(name.lower(), []).append(name)

    def find(name: str) -> str | None:
        options = lower.get(name.lower(), [])
        if name in options:
            return name
        return options[0] if options else None

    found: dict[str, str] = {}
    for role, candidates in ROLE_CANDIDATES.items():
        override = overrides.get(role)
        if override:
            col = find(override)
            if col is None:
                raise InputError(f"--{role}-col {override!r} is not a column of the input; "
                                 f"columns present: {', '.join(present)}")
            found[role] = col
            continue
        for cand in candidates:
            col = find(cand)
            if col is not None:
                found[role] = col
                break
    return found


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _num(v: float) -> str:
    return repr(float(v))


# ---------------------------------------------------------------- the query


@dataclass
class _Step:
    name: str  # how the stats report names it
    flag: str | None  # the flag that asked for it
    role: str | None  # column role it reads (None for url/caption presence)
    null_sql: str  # true when the filtered value is NULL or NaN
    keep_sql: str  # true when the row passes
    numeric: bool = True  # decided by numeric columns alone (counted in the first, cheap scan)


def _steps(cfg: CurateConfig, cols: dict[str, str], present: list[str]) -> list[_Step]:
    def need(role: str, flag_name: str) -> str:
        if role not in cols:
            raise InputError(
                f"{flag_of(CurateConfig, flag_name)} needs a {role} column but none was found "
                f"(looked for {', '.join(ROLE_CANDIDATES[role])}); columns present: {', '.join(present)}; "
                f"pass --{role}-col NAME")
        return role

    def isnull(expr: str) -> str:
        return f"({expr} IS NULL OR isnan({expr}))"

    steps: list[_Step] = []
    simple = [("min_aesthetic", "aesthetic", ">="), ("max_watermark", "watermark", "<"),
              ("max_unsafe", "unsafe", "<"), ("min_similarity", "similarity", ">=")]
    for name, role, op in simple:
        v = getattr(cfg, name)
        if v is not None:
            need(role, name)
            steps.append(_Step(f"{OUTPUT_NAMES[role]} {op} {v:g}", flag_of(CurateConfig, name), role,
                               isnull(role), f"{role} {op} {_num(v)}"))
    size_null = f"({isnull('width')} OR {isnull('height')})"
    if cfg.min_side is not None:
        need("width", "min_side"), need("height", "min_side")
        steps.append(_Step(f"min(width, height) >= {cfg.min_side}", flag_of(CurateConfig, "min_side"), "width",
                           size_null, f"least(width, height) >= {_num(cfg.min_side)}"))
    for name, role in (("min_width", "width"), ("min_height", "height")):
        v = getattr(cfg, name)
        if v is not None:
            need(role, name)
            steps.append(_Step(f"{role} >= {v}", flag_of(CurateConfig, name), role, isnull(role),
                               f"{role} >= {_num(v)}"))
    if cfg.max_aspect_ratio is not None:
        need("width", "max_aspect_ratio"), need("height", "max_aspect_ratio")
        steps.append(_Step(f"aspect ratio <= {cfg.max_aspect_ratio:g}", flag_of(CurateConfig, "max_aspect_ratio"),
                           "width", size_null,
                           f"(least(width, height) > 0 AND greatest(width, height) <= "
                           f"{_num(cfg.max_aspect_ratio)} * least(width, height))"))
    # String steps come last: the per-filter count scan then reads only numeric columns, and the
    # string checks run in the main pass on the rows the numeric filters kept.
    steps.append(_Step("url and caption present", None, None,
                       "(url IS NULL OR url = '' OR caption IS NULL OR trim(caption) = '')",
                       "(url <> '' AND trim(caption) <> '')", numeric=False))
    words = "len(regexp_extract_all(caption, '\\S+'))"
    if cfg.min_caption_words is not None:
        steps.append(_Step(f"caption words >= {cfg.min_caption_words}", flag_of(CurateConfig, "min_caption_words"),
                           "caption", "caption IS NULL", f"{words} >= {cfg.min_caption_words}", numeric=False))
    if cfg.max_caption_words is not None:
        steps.append(_Step(f"caption words <= {cfg.max_caption_words}", flag_of(CurateConfig, "max_caption_words"),
                           "caption", "caption IS NULL", f"{words} <= {cfg.max_caption_words}", numeric=False))
    return steps


def _source_sql(files: list[Path], cols: dict[str, str], keep_cols: list[str]) -> str:
    items = []
    for role, col in cols.items():
        if role in NUMERIC_ROLES:
            items.append(f"CAST({_q(col)} AS DOUBLE) AS {role}")
        elif role == "hash":
            items.append(f"{_q(col)} AS hash")
        else:
            items.append(f"CAST({_q(col)} AS VARCHAR) AS {role}")
    for col in keep_cols:
        items.append(f"{_q(col)} AS {_q('keep__' + col)}")
    items += ["file_index AS __file", "file_row_number AS __row"]
    file_list = "[" + ", ".join(_lit(str(p)) for p in files) + "]"
    return f"SELECT {', '.join(items)}\n  FROM read_parquet({file_list}, union_by_name = true)"


def _output_items(cols: dict[str, str], keep_cols: list[str]) -> list[str]:
    items = [f"{role} AS {_q(OUTPUT_NAMES[role])}" for role in OUTPUT_NAMES if role in cols]
    items += [f"{_q('keep__' + c)} AS {_q(c)}" for c in keep_cols]
    return items


def _hist_expr(role: str) -> str:
    # Bare floor() keys, clamped into the end bins in Python (`_hist_list`): clamping or casting in
    # SQL doubles the cost of the per-filter scan. NULL is skipped by histogram(); NaN is dropped later.
    lo, hi, n = HISTOGRAMS[role]
    scaled = f"{role} * {_num(n / (hi - lo))}" if lo == 0 else f"({role} - {_num(lo)}) * {_num(n / (hi - lo))}"
    return f"histogram(floor({scaled}))"


def _hist_list(value: Any, bins: int) -> list[int]:
    counts = [0] * bins
    for k, c in (value or {}).items():
        if k is None or k != k:  # NaN
            continue
        counts[min(max(int(k), 0), bins - 1)] += int(c)
    return counts


# ---------------------------------------------------------------- running it


def _connect(temp_dir: Path | None) -> "duckdb.DuckDBPyConnection":
    import duckdb

    con = duckdb.connect(":memory:")
    if temp_dir is not None:
        # Large curations spill to disk; keep the spill beside the output, not in the working directory.
        con.execute(f"SET temp_directory = {_lit(str(temp_dir))}")
    con.execute("SET preserve_insertion_order = false")
    return con


def _run(con: "duckdb.DuckDBPyConnection", sql: str, what: str) -> Any:
    import duckdb

    try:
        return con.execute(sql)
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"DuckDB could not {what}: {first}") from None


def curate(cfg: CurateConfig) -> CurateResult:
    """Filter, dedup and sample the inputs of `cfg`; write shards + stats unless `cfg.dry_run`."""
    cfg = cfg.resolved()
    cfg.validate()
    start = time.perf_counter()
    files = resolve_inputs(cfg.inputs)

    out = Path(cfg.output) if cfg.output else None
    if out is not None and not cfg.dry_run:
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; choose another --output")
        if out.exists() and any(out.iterdir()) and not cfg.overwrite:
            raise OutputExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it "
                                    "or choose another --output")

    tmp: Path | None = None
    if out is not None and not cfg.dry_run:
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        result = _curate(cfg, files, tmp, start)
        if tmp is not None and out is not None:
            replace_directory(tmp, out)
            tmp = None
            result.output = out
            result.shards = [out / p.name for p in result.shards]
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _curate(cfg: CurateConfig, files: list[Path], tmp: Path | None, start: float) -> CurateResult:
    con = _connect((tmp / ".spill") if tmp is not None else None)
    file_list = "[" + ", ".join(_lit(str(p)) for p in files) + "]"
    described = _run(con, f"DESCRIBE SELECT * FROM read_parquet({file_list}, union_by_name = true)",
                     "read the parquet schema").fetchall()
    present = [row[0] for row in described]
    overrides = {role: getattr(cfg, f"{role}_col") for role in ROLE_CANDIDATES}
    cols = detect_columns(present, overrides)
    for role in ("url", "caption"):
        if role not in cols:
            raise InputError(f"no {role} column found (looked for {', '.join(ROLE_CANDIDATES[role])}); "
                             f"columns present: {', '.join(present)}; pass --{role}-col NAME")
    present_lower = {c.lower(): c for c in present}
    keep_cols = []
    for c in cfg.keep_cols:
        if c.lower() not in present_lower:
            raise InputError(f"--keep-col {c!r} is not a column of the input; columns present: {', '.join(present)}")
        keep_cols.append(present_lower[c.lower()])
    dedup_hash = cfg.dedup_hash and "hash" in cols

    steps = _steps(cfg, cols, present)
    source = _source_sql(files, cols, keep_cols)
    num_steps = [(i, st) for i, st in enumerate(steps) if st.numeric]
    str_steps = [(i, st) for i, st in enumerate(steps) if not st.numeric]

    def fail_case(items: list[tuple[int, _Step]]) -> str:
        # Code 2i+1: step i removed the row for NULL/NaN; 2i+2: for its value; 0: kept.
        if not items:
            return "0"
        return "CASE\n" + "".join(f"    WHEN {st.null_sql} THEN {2 * i + 1}\n    WHEN NOT ({st.keep_sql}) THEN {2 * i + 2}\n"
                                   for i, st in items) + "    ELSE 0 END"

    hist_roles = [r for r in HISTOGRAMS if r in cols]
    # One aggregate (no GROUP BY): per-group histograms cost DuckDB several times more.
    stats_sql = (f"WITH src AS ({source})\nSELECT count(*) AS n,\n  histogram({fail_case(num_steps)}) AS fail"
                 + "".join(f",\n  {_hist_expr(r)} AS h_{r}" for r in hist_roles) + "\nFROM src")

    # NaN compares greater than every number in DuckDB, so NULL/NaN must be excluded explicitly.
    keep_where = "\n    AND ".join(f"NOT {st.null_sql} AND {st.keep_sql}" for _, st in num_steps) or "true"
    order = "__file, __row"
    url_first = (f"row_number() OVER (PARTITION BY url, __sfail ORDER BY {order}) = 1" if cfg.dedup_url else "true")
    # Hash dedup runs on the URL-deduplicated rows: those sort first in each hash partition.
    hash_first = (f"hash IS NULL OR row_number() OVER (PARTITION BY hash ORDER BY NOT __url_first, {order}) = 1"
                  if dedup_hash else "true")
    pick = f"(hash(url, {int(cfg.seed)}) % 1000000)"
    sampled = f"{pick} < {round(cfg.sample_fraction * 1_000_000)}" if cfg.sample_fraction is not None else "true"
    ranked_sql = (f"CREATE TEMP TABLE ranked AS\nWITH src AS ({source}),\n"
                  f"kept AS (SELECT *, {fail_case(str_steps)} AS __sfail FROM src\n  WHERE {keep_where}),\n"
                  f"u AS (SELECT *, __sfail = 0 AND ({url_first}) AS __url_first FROM kept),\n"
                  f"h AS (SELECT *, __url_first AND ({hash_first}) AS __hash_first FROM u)\n"
                  f"SELECT *, __hash_first AND {sampled} AS __sampled, __hash_first AND {sampled} AS __keep FROM h")
    sql_parts = [ranked_sql]
    limit_sql = None
    if cfg.limit is not None:
        limit_sql = (f"CREATE OR REPLACE TEMP TABLE ranked AS SELECT * REPLACE (__keep AND row_number() OVER "
                     f"(PARTITION BY __keep ORDER BY {pick}, {order}) <= {cfg.limit} AS __keep) FROM ranked")
        sql_parts.append(limit_sql)

    # 1. one scan over the numeric filter columns: rows removed by each numeric step, input histograms.
    row = _run(con, stats_sql, "read the input").fetchone()
    rows_in = int(row[0])
    by_code = {int(k): int(v) for k, v in (row[1] or {}).items()}
    hist_in = {r: _hist_list(row[2 + k], HISTOGRAMS[r][2]) for k, r in enumerate(hist_roles)}

    # 2. the rows the numeric filters kept, flagged by the string steps, dedup, sampling and limit.
    _run(con, ranked_sql, "filter the input")
    if limit_sql is not None:
        _run(con, limit_sql, "apply --limit")
    counts_sql = ("SELECT histogram(__sfail), count(*) FILTER (WHERE __url_first), "
                  "count(*) FILTER (WHERE __hash_first), count(*) FILTER (WHERE __sampled), "
                  "count(*) FILTER (WHERE __keep)"
                  + "".join(f", {_hist_expr(r)} FILTER (WHERE __keep)" for r in hist_roles) + " FROM ranked")
    row = _run(con, counts_sql, "count the rows kept").fetchone()
    by_code.update({int(k): int(v) for k, v in (row[0] or {}).items() if k})
    report: list[dict[str, Any]] = []
    remaining = rows_in
    for i, st in enumerate(steps):
        null, value = by_code.get(2 * i + 1, 0), by_code.get(2 * i + 2, 0)
        remaining -= null + value
        report.append({"step": st.name, "flag": st.flag, "column": cols.get(st.role) if st.role else None,
                       "removed_null_or_nan": null, "removed": value, "remaining": remaining})
    after = {"url duplicates": row[1], "hash duplicates": row[2], "sample": row[3], "limit": row[4]}
    later = []
    if cfg.dedup_url:
        later.append(("url duplicates", "--dedup-url", cols["url"], after["url duplicates"]))
    if dedup_hash:
        later.append(("hash duplicates", "--dedup-hash", cols["hash"], after["hash duplicates"]))
    if cfg.sample_fraction is not None:
        later.append((f"sample fraction {cfg.sample_fraction:g} (seed {cfg.seed})", "--sample-fraction", None,
                      after["sample"]))
    if cfg.limit is not None:
        later.append((f"limit {cfg.limit} (seed {cfg.seed})", "--limit", None, after["limit"]))
    for name, flag, column, n in later:
        report.append({"step": name, "flag": flag, "column": column, "removed_null_or_nan": 0,
                       "removed": remaining - n, "remaining": n})
        remaining = n
    histograms = {}
    for k, r in enumerate(hist_roles):
        lo, hi, bins = HISTOGRAMS[r]
        histograms[OUTPUT_NAMES[r]] = {"edges": [lo + (hi - lo) * b / bins for b in range(bins + 1)],
                                       "in": hist_in[r], "out": _hist_list(row[5 + k], bins)}

    # 3. the shards, in input order.
    out_items = ", ".join(_output_items(cols, keep_cols))
    n_shards = max(1, math.ceil(remaining / cfg.shard_rows))
    shards: list[Path] = []
    if n_shards == 1:
        copy_sql = f"COPY (SELECT {out_items} FROM ranked WHERE __keep ORDER BY {order})\nTO {{path}} (FORMAT parquet, COMPRESSION zstd)"
    else:
        number_sql = (f"CREATE TEMP TABLE numbered AS SELECT {out_items}, row_number() OVER (ORDER BY {order}) - 1 "
                      f"AS __n FROM ranked WHERE __keep")
        sql_parts.append(number_sql)
        copy_sql = ("COPY (SELECT * EXCLUDE (__n) FROM numbered WHERE __n >= {lo} AND __n < {hi} ORDER BY __n)\n"
                    "TO {path} (FORMAT parquet, COMPRESSION zstd)")
    sql_parts.append(copy_sql.format(lo="<first row>", hi="<end row>", path="'part-NNNNN.parquet'"))
    if tmp is not None:
        if n_shards > 1:
            _run(con, number_sql, "number the output rows")
        for k in range(n_shards):
            path = tmp / f"part-{k:05d}.parquet"
            _run(con, copy_sql.format(lo=k * cfg.shard_rows, hi=(k + 1) * cfg.shard_rows, path=_lit(str(path))),
                 "write the output")
            shards.append(path)
    con.close()

    full_sql = (f"-- rows removed by each filter\n{stats_sql};\n\n-- output\n" + ";\n\n".join(sql_parts)
                + f";\n\n-- rows removed by dedup, sampling and limit\n{counts_sql};")
    stats = {
        "inputs": [str(p) for p in files],
        "columns": cols,
        "filters": {k: getattr(cfg, k) for k in ("min_aesthetic", "max_watermark", "max_unsafe", "min_similarity",
                                                   "min_side", "min_width", "min_height", "max_aspect_ratio",
                                                   "min_caption_words", "max_caption_words") if getattr(cfg, k) is not None},
        "preset": cfg.preset,
        "dedup": {"url": cfg.dedup_url, "hash": dedup_hash},
        "rows_in": rows_in,
        "steps": report,
        "rows_out": remaining,
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
        table.add_row(f"{name} {h['edges'][0]:g}..{h['edges'][-1]:g}", "", f"in  {_sparkline(h['in'])}",
                      f"out {_sparkline(h['out'])}")
    return table
