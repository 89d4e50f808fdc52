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
unless it is NULL, empty or only spaces. Of duplicates the first row in input order (file, row)
is kept. Output rows keep input order; shards follow input files (see `--shard-rows`).

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
import glob
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meissonic_cli.atomic import atomic_directory, write_json
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

# Candidate names of each role, matched case-insensitively, first match wins: LAION's names, then
# img2dataset / webdataset's `txt`, then COYO-700M's and DataComp's.
ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "url": ("url", "image_url", "link"),
    "caption": ("text", "caption", "txt", "alt", "alt_text"),
    "width": ("width", "original_width", "image_width"),
    "height": ("height", "original_height", "image_height"),
    "similarity": ("similarity", "clip_similarity", "clip_score", "clip_similarity_vitl14",
                   "clip_l14_similarity_score"),
    "hash": ("hash", "image_hash", "sha256", "sha256hash", "image_phash"),
    "unsafe": ("punsafe", "p_unsafe", "unsafe", "nsfw_score_opennsfw2"),
    "watermark": ("pwatermark", "p_watermark", "watermark", "watermark_score"),
    "aesthetic": ("aesthetic", "aesthetic_score", "aesthetics", "aesthetic_score_laion_v2"),
}
# `--schema`: the column of each role in the published metadata of LAION (laion2B-en, laion-art's
# `aesthetic`, improved_aesthetics' `AESTHETIC_SCORE`), COYO-700M and DataComp. A role a schema
# lacks is absent (DataComp has no aesthetic, watermark or NSFW score).
SCHEMAS: dict[str, dict[str, tuple[str, ...]]] = {
    "laion": {"url": ("URL",), "caption": ("TEXT",), "width": ("WIDTH",), "height": ("HEIGHT",),
              "similarity": ("similarity",), "hash": ("hash",), "unsafe": ("punsafe",),
              "watermark": ("pwatermark",), "aesthetic": ("aesthetic", "AESTHETIC_SCORE")},
    "coyo": {"url": ("url",), "caption": ("text",), "width": ("width",), "height": ("height",),
             "similarity": ("clip_similarity_vitl14",), "hash": ("image_phash",),
             "unsafe": ("nsfw_score_opennsfw2",), "watermark": ("watermark_score",),
             "aesthetic": ("aesthetic_score_laion_v2",)},
    "datacomp": {"url": ("url",), "caption": ("text",), "width": ("original_width",),
                 "height": ("original_height",), "similarity": ("clip_l14_similarity_score",),
                 "hash": ("sha256",)},
}
# Columns only one schema has. Without --schema, a file holding some of one schema's markers and
# none of another's is read with that schema's names first (then the generic candidates).
SCHEMA_MARKERS: dict[str, tuple[str, ...]] = {
    "laion": ("punsafe", "pwatermark", "similarity", "AESTHETIC_SCORE"),
    "coyo": ("clip_similarity_vitb32", "clip_similarity_vitl14", "nsfw_score_opennsfw2", "nsfw_score_gantman",
             "watermark_score", "aesthetic_score_laion_v2", "image_phash"),
    "datacomp": ("clip_b32_similarity_score", "clip_l14_similarity_score", "original_width", "original_height",
                 "face_bboxes"),
}
# What Python's str.split() (and CLIP's caption cleaner) split words on: every code point whose
# str.isspace() is true. RE2's \s is ASCII only, so the word count spells the class out.
SPACE_CODEPOINTS: tuple[int, ...] = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0,
                                     0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
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
             "(an input file's rows are never split, so one large file makes one larger shard).",
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
        p = Problems()
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


def detect_schema(present: list[str]) -> str | None:
    """The known schema (`SCHEMAS`) whose marker columns `present` has, when exactly one matches."""
    lower = {name.lower() for name in present}
    found = [s for s, marks in SCHEMA_MARKERS.items() if any(m.lower() in lower for m in marks)]
    return found[0] if len(found) == 1 else None


def detect_columns(present: list[str], overrides: dict[str, str | None], schema: str | None = None, *,
                   strict: bool = False) -> dict[str, str]:
    """Map each role to a column of `present`: override if given, else the first candidate found.

    Candidates are `schema`'s names (detected from `present` when not given), then the generic
    `ROLE_CANDIDATES`; with `strict`, only `schema`'s names. Matching is case-insensitive; an
    exact-case match wins over others.
    """
    lower: dict[str, list[str]] = {}
    for name in present:
        lower.setdefault(name.lower(), []).append(name)

    def find(name: str) -> str | None:
        options = lower.get(name.lower(), [])
        if name in options:
            return name
        return options[0] if options else None

    if schema is None and not strict:
        schema = detect_schema(present)
    found: dict[str, str] = {}
    for role, generic in ROLE_CANDIDATES.items():
        override = overrides.get(role)
        if override:
            col = find(override)
            if col is None:
                raise InputError(f"--{role}-col {override!r} is not a column of the input; "
                                 f"columns present: {', '.join(present)}")
            found[role] = col
            continue
        preset = SCHEMAS[schema].get(role, ()) if schema else ()
        for cand in (preset if strict else preset + generic):
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


_NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                  "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "REAL", "DECIMAL")


def _is_numeric(duck_type: str | None) -> bool:
    return bool(duck_type) and str(duck_type).upper().split("(")[0] in _NUMERIC_TYPES


def _names(paths: list[Path], most: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


@dataclass
class _Run:
    """Consecutive input files read with one column mapping (one `read_parquet`)."""

    first: int  # global index (input order) of files[0]
    files: list[Path]
    cols: dict[str, str]  # role -> column
    types: dict[str, str]  # role -> DuckDB type of that column
    keep: dict[str, str]  # lower-case --keep-col name -> column of these files
    schema: str | None
    same_layout: bool  # all files list the same columns in the same order
    present: list[str]  # the columns of files[0]

    def text(self, role: str) -> bool:
        """Whether numeric `role` sits in a column that is not numeric (parsed with TRY_CAST)."""
        return role in self.cols and not _is_numeric(self.types.get(role))


def _file_columns(con: "duckdb.DuckDBPyConnection", files: list[Path]) -> list[list[tuple[str, str]]]:
    """(name, DuckDB type) of the top-level columns of each file, from one `parquet_schema` query."""
    rows = _run(con, f"SELECT file_name, name, duckdb_type, num_children FROM parquet_schema({_file_list(files)})",
                "read the parquet schema").fetchall()
    by_file: dict[str, list[tuple[str, str, int]]] = {}
    for fname, name, typ, children in rows:
        by_file.setdefault(fname, []).append((name, typ, int(children or 0)))
    out = []
    for path in files:
        elems = by_file.get(str(path))
        if elems is None:  # a name DuckDB spelled differently: ask for this file alone
            described = _run(con, f"DESCRIBE SELECT * FROM read_parquet({_lit(str(path))})",
                             f"read the parquet schema of {path}").fetchall()
            out.append([(r[0], r[1]) for r in described])
            continue
        cols, i = [], 1  # elems[0] is the root; each top-level column is a subtree after it
        while i < len(elems):
            cols.append((elems[i][0], elems[i][1]))
            pending = elems[i][2]
            i += 1
            while pending:  # skip the nested children of this column
                pending += elems[i][2] - 1
                i += 1
        out.append(cols)
    return out


def _file_list(files: list[Path]) -> str:
    return "[" + ", ".join(_lit(str(p)) for p in files) + "]"


def _plan_runs(cfg: CurateConfig, files: list[Path], columns: list[list[tuple[str, str]]]) -> list[_Run]:
    """Detect each file's columns and group consecutive files that read the same way.

    Refuses (naming the files) when a file lacks a URL or caption column, an override column or a
    --keep-col that no file has; a filter whose column some files lack is refused in `_steps`.
    """
    overrides = {role: getattr(cfg, f"{role}_col") for role in ROLE_CANDIDATES}
    missing: dict[str, list[Path]] = {}
    runs: list[_Run] = []
    keep_seen: set[str] = set()
    for i, (path, cols_types) in enumerate(zip(files, columns)):
        present = [n for n, _ in cols_types]
        types = {n: t for n, t in cols_types}
        lower = {n.lower(): n for n in present}
        for role, name in overrides.items():
            if name and name.lower() not in lower:
                missing.setdefault(f"--{role}-col {name!r} is not a column of {{files}}", []).append(path)
        schema = cfg.schema or detect_schema(present)
        cols = detect_columns(present, {r: v for r, v in overrides.items() if v and v.lower() in lower},
                              schema, strict=cfg.schema is not None)
        for role in ("url", "caption"):
            if role not in cols:
                looked = SCHEMAS[cfg.schema].get(role, ()) if cfg.schema else ROLE_CANDIDATES[role]
                missing.setdefault(f"{{files}} {{have}} no {role} column (looked for {', '.join(looked)}; "
                                   f"pass --{role}-col NAME)", []).append(path)
        keep = {c.lower(): lower[c.lower()] for c in cfg.keep_cols if c.lower() in lower}
        keep_seen.update(keep)
        role_types = {role: types[col] for role, col in cols.items()}
        prev = runs[-1] if runs else None
        if prev is not None and (prev.cols, prev.types, prev.keep, prev.schema) == (cols, role_types, keep, schema):
            prev.same_layout = prev.same_layout and cols_types == columns[i - 1]
            prev.files.append(path)
        else:
            runs.append(_Run(i, [path], cols, role_types, keep, schema, True, present))
    for what, paths in missing.items():
        first = columns[files.index(paths[0])]
        raise InputError(what.format(files=_names(paths), have="has" if len(paths) == 1 else "have")
                         + f"; columns present{' in ' + str(paths[0]) if len(paths) < len(files) else ''}: "
                         f"{', '.join(n for n, _ in first)}")
    for c in cfg.keep_cols:
        if c.lower() not in keep_seen:
            raise InputError(f"--keep-col {c!r} is not a column of any input; columns present: "
                             f"{', '.join(n for n, _ in columns[0])}")
    return runs


# ---------------------------------------------------------------- the query


@dataclass
class _Step:
    name: str  # how the stats report names it
    flag: str | None  # the flag that asked for it
    role: str | None  # column role it reads (None for url/caption presence)
    null_sql: str  # true when the filtered value is NULL, NaN or +-inf
    keep_sql: str  # true when the row passes (false or NULL for NULL, NaN and +-inf)
    numeric: bool = True  # decided by numeric columns alone (counted in the stats scan)


_INF = "'inf'::DOUBLE"


def _word_count(expr: str) -> str:
    space = "".join(f"\\x{{{c:X}}}" for c in SPACE_CODEPOINTS)
    return f"len(regexp_extract_all({expr}, '[^{space}]+'))"


def _steps(cfg: CurateConfig, runs: list[_Run]) -> list[_Step]:
    def need(role: str, flag_name: str) -> None:
        lacking = [p for r in runs if role not in r.cols for p in r.files]
        if lacking:
            looked = SCHEMAS[cfg.schema].get(role, ()) if cfg.schema else ROLE_CANDIDATES[role]
            raise InputError(
                f"{flag_of(CurateConfig, flag_name)} needs a {role} column but {_names(lacking)} "
                f"{'has' if len(lacking) == 1 else 'have'} none (looked for "
                f"{', '.join(looked) if looked else f'nothing: the {cfg.schema} schema has no {role} column'}); "
                f"columns present: {', '.join(_present(runs, lacking[0]))}; pass --{role}-col NAME "
                "or curate those files separately")

    def bad(expr: str) -> str:
        return f"({expr} IS NULL OR NOT isfinite({expr}))"

    # Keep conditions are plain comparisons so DuckDB pushes them into the parquet scan; NaN sorts
    # above +inf in DuckDB, so `< inf` also drops NaN, and `> -inf` drops -inf and NaN-free NULLs.
    def at_least(expr: str, v: float) -> str:
        return f"{expr} >= {_num(v)} AND {expr} < {_INF}"

    def below(expr: str, v: float) -> str:
        return f"{expr} < {_num(v)} AND {expr} > -{_INF}"

    steps: list[_Step] = []
    simple = [("min_aesthetic", "aesthetic", ">=", at_least), ("max_watermark", "watermark", "<", below),
              ("max_unsafe", "unsafe", "<", below), ("min_similarity", "similarity", ">=", at_least)]
    for name, role, op, keep in simple:
        v = getattr(cfg, name)
        if v is not None:
            need(role, name)
            steps.append(_Step(f"{OUTPUT_NAMES[role]} {op} {v:g}", flag_of(CurateConfig, name), role,
                               bad(role), keep(role, v)))
    size_bad = f"({bad('width')} OR {bad('height')})"
    if cfg.min_side is not None:
        need("width", "min_side"), need("height", "min_side")
        steps.append(_Step(f"min(width, height) >= {cfg.min_side}", flag_of(CurateConfig, "min_side"), "width",
                           size_bad, f"{at_least('width', cfg.min_side)} AND {at_least('height', cfg.min_side)}"))
    for name, role in (("min_width", "width"), ("min_height", "height")):
        v = getattr(cfg, name)
        if v is not None:
            need(role, name)
            steps.append(_Step(f"{role} >= {v}", flag_of(CurateConfig, name), role, bad(role), at_least(role, v)))
    if cfg.max_aspect_ratio is not None:
        need("width", "max_aspect_ratio"), need("height", "max_aspect_ratio")
        r = _num(cfg.max_aspect_ratio)
        steps.append(_Step(f"aspect ratio <= {cfg.max_aspect_ratio:g}", flag_of(CurateConfig, "max_aspect_ratio"),
                           "width", size_bad,
                           f"(isfinite(width) AND isfinite(height) AND least(width, height) > 0 AND "
                           f"greatest(width, height) <= {r} * least(width, height))"))
    # String steps come last: the stats scan then reads only numeric columns. A caption of spaces
    # only is absent; one of a tab is present (DuckDB's trim() strips spaces, as LAION's tools did).
    steps.append(_Step("url and caption present", None, None,
                       "(url IS NULL OR url = '' OR caption IS NULL OR trim(caption) = '')",
                       "(url <> '' AND trim(caption) <> '')", numeric=False))
    words = _word_count("caption")
    if cfg.min_caption_words is not None:
        steps.append(_Step(f"caption words >= {cfg.min_caption_words}", flag_of(CurateConfig, "min_caption_words"),
                           "caption", "caption IS NULL", f"{words} >= {cfg.min_caption_words}", numeric=False))
    if cfg.max_caption_words is not None:
        steps.append(_Step(f"caption words <= {cfg.max_caption_words}", flag_of(CurateConfig, "max_caption_words"),
                           "caption", "caption IS NULL", f"{words} <= {cfg.max_caption_words}", numeric=False))
    return steps


def _present(runs: list[_Run], path: Path) -> list[str]:
    return next((run.present for run in runs if path in run.files), [])


def _null_of(role: str, hash_type: str | None) -> str:
    if role in NUMERIC_ROLES:
        return "CAST(NULL AS DOUBLE)"
    if role == "hash" and hash_type:
        return f"CAST(NULL AS {hash_type})"
    return "CAST(NULL AS VARCHAR)"


def _hash_type(runs: list[_Run]) -> str | None:
    """The hash column's common DuckDB type, or VARCHAR when files disagree (int vs sha256 text)."""
    types = {r.types["hash"] for r in runs if "hash" in r.cols}
    return types.pop() if len(types) == 1 else ("VARCHAR" if types else None)


def _source_sql(runs: list[_Run], roles: list[str], keep_cols: list[str], *, raw: list[str] = (),
                position: bool = False) -> str:
    """One SELECT per run of `roles` (canonical names, numbers as DOUBLE), UNION ALL in input order.

    `raw`: numeric roles whose text columns are also selected as `__raw_<role>` (to count values
    that do not parse); `position`: add `__file` (input index) and `__row` (row in its file).
    """
    hash_type = _hash_type(runs)
    parts = []
    for run in runs:
        items = []
        for role in roles:
            col = run.cols.get(role)
            if col is None:
                items.append(f"{_null_of(role, hash_type)} AS {role}")
            elif role in NUMERIC_ROLES:
                cast = "TRY_CAST" if run.text(role) else "CAST"
                items.append(f"{cast}({_q(col)} AS DOUBLE) AS {role}")
            elif role == "hash":
                items.append(f"CAST({_q(col)} AS {hash_type}) AS hash" if run.types["hash"] != hash_type
                             else f"{_q(col)} AS hash")
            else:
                items.append(f"CAST({_q(col)} AS VARCHAR) AS {role}")
        for role in raw:
            items.append(f"CAST({_q(run.cols[role])} AS VARCHAR) AS __raw_{role}" if run.text(role)
                         else f"CAST(NULL AS VARCHAR) AS __raw_{role}")
        for c in keep_cols:
            items.append(f"{_q(run.keep[c.lower()]) if c.lower() in run.keep else 'NULL'} AS {_q('keep__' + c)}")
        if position:
            items += [f"file_index + {run.first} AS __file", "file_row_number AS __row"]
        union = "" if run.same_layout else ", union_by_name = true"
        parts.append(f"SELECT {', '.join(items)}\n  FROM read_parquet({_file_list(run.files)}{union})")
    return "\n  UNION ALL ".join(parts)


def _output_items(roles: list[str], keep_cols: list[str]) -> list[str]:
    items = [f"{role} AS {_q(OUTPUT_NAMES[role])}" for role in OUTPUT_NAMES if role in roles]
    items += [f"{_q('keep__' + c)} AS {_q(c)}" for c in keep_cols]
    return items


def _bin_expr(expr: str, role: str) -> str:
    # Bare floor() keys, clamped into the end bins in Python (`_hist_list`): clamping or casting in
    # SQL costs several times more. NULL and NaN keys are dropped there.
    lo, hi, n = HISTOGRAMS[role]
    scale = _num(n / (hi - lo))
    return f"floor({expr} * {scale})" if lo == 0 else f"floor(({expr} - {_num(lo)}) * {scale})"


def _hist_expr(expr: str, role: str) -> str:
    return f"histogram({_bin_expr(expr, role)})"


def _hist_list(value: Any, bins: int) -> list[int]:
    counts = [0] * bins
    for k, c in (value or {}).items():
        if k is None or k != k:  # NaN
            continue
        k = max(min(float(k), bins - 1), 0)  # +-inf (a value of +-inf in the column) into the end bins
        counts[int(k)] += int(c)
    return counts


def _plan_shards(per_file: list[int], shard_rows: int) -> list[list[int]]:
    """Input file indices of each shard: consecutive files until the next would push past shard_rows.

    Files with no rows left are skipped; one shard (of no files) when nothing is left.
    """
    shards: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i, n in enumerate(per_file):
        if n == 0:
            continue
        if current and rows + n > shard_rows:
            shards.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current or not shards:
        shards.append(current)
    return shards


def _subset(runs: list[_Run], indices: list[int]) -> list[_Run]:
    """The runs restricted to the input files `indices` (their positions are not kept)."""
    wanted = set(indices)
    out = []
    for run in runs:
        files = [p for k, p in enumerate(run.files) if run.first + k in wanted]
        if files:
            out.append(dataclasses.replace(run, files=files))
    return out


# ---------------------------------------------------------------- running it


def _connect(temp_dir: Path | None) -> "duckdb.DuckDBPyConnection":
    import duckdb

    con = duckdb.connect(":memory:")
    if temp_dir is not None:
        # Large curations spill to disk; keep the spill beside the output, not in the working directory.
        con.execute(f"SET temp_directory = {_lit(str(temp_dir))}")
    return con


def _run(con: "duckdb.DuckDBPyConnection", sql: str, what: str) -> Any:
    import duckdb

    try:
        return con.execute(sql)
    except duckdb.InterruptException:  # Ctrl-C while DuckDB runs: the command's interrupted message
        raise KeyboardInterrupt from None
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
        from meissonic_cli.data.inputs import check_output_parent

        check_output_parent(out, "--out")
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


def _fail_case(items: list[tuple[int, _Step]], depth: int = 1) -> str:
    """Code 2i+1: step i removed the row for NULL/NaN/inf; 2i+2: for its value; 0: kept.

    Nested so a row is tested against each step once, passing rows first (cheaper in DuckDB than
    a flat CASE testing the NULL condition and the negated keep condition of every step).
    """
    if not items:
        return "0"
    (i, st), pad = items[0], "  " * depth
    return (f"CASE WHEN {st.keep_sql}\n{pad}  THEN {_fail_case(items[1:], depth + 1)}\n"
            f"{pad}  WHEN {st.null_sql} THEN {2 * i + 1} ELSE {2 * i + 2} END")


def _curate(cfg: CurateConfig, files: list[Path], tmp: Path | None, start: float) -> CurateResult:
    con = _connect((tmp / ".spill") if tmp is not None else None)
    runs = _plan_runs(cfg, files, _file_columns(con, files))
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
    steps = _steps(cfg, runs)
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
    stats_src = _source_sql(runs, stats_roles, [], raw=text_roles, position=True)
    stats_sql = (f"SELECT ({_fail_case(num_steps)}){file_key} AS k"
                 + "".join(f",\n  {_bin_expr(r, r)} AS h_{r}" for r in in_roles)
                 + ",\n  count(*) AS n"
                 + "".join(f",\n  count(*) FILTER (WHERE __raw_{r} IS NOT NULL AND {r} IS NULL) AS bad_{r}"
                           for r in text_roles)
                 + f"\nFROM (\n  {stats_src})\nGROUP BY ALL")
    rows_in = 0
    by_code: dict[int, int] = {}
    passed = [0] * n_files  # rows of each file that pass every numeric step
    hist_in: dict[str, dict[Any, int]] = {r: {} for r in in_roles}
    unparseable = {OUTPUT_NAMES[r]: 0 for r in text_roles}
    for row in _run(con, stats_sql, "read the input").fetchall():
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
    if not file_key and n_files > 1 and sum(passed) > cfg.shard_rows:
        num_where = " AND ".join(st.keep_sql for _, st in num_steps) or "true"
        per_file = _run(con, f"SELECT __file, count(*) FROM ({stats_src}) WHERE {num_where} GROUP BY 1",
                        "count the rows of each input file").fetchall()
        passed = [0] * n_files
        for f, n in per_file:
            passed[int(f)] = int(n)

    words = any(st.role == "caption" for _, st in str_steps)
    fast = not (cfg.dedup_url or dedup_hash or cfg.sample_fraction is not None or cfg.limit is not None or words)
    out_items = ", ".join(_output_items(roles, keep_cols))
    keep_where = "\n    AND ".join(st.keep_sql for st in steps)
    sql_parts: list[str] = []
    shards: list[Path] = []
    hist_out: dict[str, dict[Any, int]] = {r: {} for r in hist_roles}
    if fast:
        # 2. The filtering COPY itself, one per shard (input files in order, order preserved).
        plan = _plan_shards(passed, cfg.shard_rows)
        copy_sql = "COPY (SELECT {items}\n  FROM ({src})\n  WHERE {where})\nTO {path} (FORMAT parquet)"
        sql_parts.append(copy_sql.format(items=out_items, src=_source_sql(runs, roles, keep_cols),
                                         where=keep_where, path="'part-NNNNN.parquet'"))
        written: list[tuple[Path, int]] = []
        if tmp is not None:
            for k, indices in enumerate(plan):
                sub = _subset(runs, indices) or runs[:1]
                where = keep_where if indices else "false"
                path = tmp / f".part-{k:05d}.parquet"
                n = _run(con, copy_sql.format(items=out_items, src=_source_sql(sub, roles, keep_cols), where=where,
                                              path=_lit(str(path))), "write the output").fetchone()[0]
                written.append((path, int(n)))
            if len(written) > 1:  # a shard whose rows all failed the caption check: drop it
                written = [w for w in written if w[1]] or written[:1]
            for k, (path, n) in enumerate(written):
                shards.append(path.rename(tmp / f"part-{k:05d}.parquet"))
            remaining = sum(n for _, n in written)
            # 3. Output histograms: the few score columns written, read back (one GROUP BY).
            counts_sql = ("SELECT " + "".join(f"{_bin_expr(_q(OUTPUT_NAMES[r]), r)} AS h_{r}, " for r in hist_roles)
                          + f"count(*) FROM read_parquet({_file_list(shards)})\nGROUP BY ALL")
            what = "read back the output"
        else:
            counts_sql = ("SELECT " + "".join(f"{_bin_expr(r, r)} AS h_{r}, " for r in hist_roles)
                          + f"count(*) FROM ({_source_sql(runs, roles, [])})\n  WHERE {keep_where}\nGROUP BY ALL")
            what = "count the rows kept"
        got_rows = _run(con, counts_sql, what).fetchall() if hist_roles or tmp is None else []
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
        ranked_sql = (f"CREATE TEMP TABLE ranked AS\nWITH src AS ({_source_sql(runs, roles, keep_cols, position=True)}),\n"
                      f"kept AS (SELECT *, {_fail_case(str_steps)} AS __sfail FROM src\n  WHERE {num_where}),\n"
                      f"u AS (SELECT *, __sfail = 0 AND ({url_first}) AS __url_first FROM kept),\n"
                      f"h AS (SELECT *, __url_first AND ({hash_first}) AS __hash_first FROM u)\n"
                      f"SELECT *, __hash_first AND {sampled} AS __sampled, __hash_first AND {sampled} AS __keep FROM h")
        sql_parts.append(ranked_sql)
        _run(con, ranked_sql, "filter the input")
        if cfg.limit is not None:
            limit_sql = (f"CREATE OR REPLACE TEMP TABLE ranked AS SELECT * REPLACE (__keep AND row_number() OVER "
                         f"(PARTITION BY __keep ORDER BY {pick}, {order}) <= {cfg.limit} AS __keep) FROM ranked")
            sql_parts.append(limit_sql)
            _run(con, limit_sql, "apply --limit")
        counts_sql = ("SELECT histogram(__sfail), count(*) FILTER (WHERE __url_first), "
                      "count(*) FILTER (WHERE __hash_first), count(*) FILTER (WHERE __sampled), "
                      "histogram(__file) FILTER (WHERE __keep)"
                      + "".join(f", {_hist_expr(r, r)} FILTER (WHERE __keep)" for r in hist_roles) + " FROM ranked")
        got = _run(con, counts_sql, "count the rows kept").fetchone()
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
            for k, indices in enumerate(_plan_shards(kept_per_file, cfg.shard_rows)):
                path = tmp / f"part-{k:05d}.parquet"
                _run(con, copy_sql.format(files=", ".join(map(str, indices or [-1])), path=_lit(str(path))),
                     "write the output")
                shards.append(path)

    report: list[dict[str, Any]] = []
    left = rows_in
    col_names = {role: _column_names(runs, role) for role in roles}
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
                                       "in": _hist_list(hist_in[r], bins) if r in hist_in else None,
                                       "out": _hist_list(hist_out[r], bins)}
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


def _column_names(runs: list[_Run], role: str) -> str | None:
    """The input column of `role`: one name, or the names joined with ' | ' when files differ."""
    names = list(dict.fromkeys(run.cols[role] for run in runs if role in run.cols))
    return " | ".join(names) if names else None


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
