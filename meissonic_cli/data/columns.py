"""Where `curate` (and `download`, `tokenize`) find their columns: input files, schemas, per-file mapping.

Metadata dumps name the same thing differently: LAION's `URL`/`TEXT`/`AESTHETIC_SCORE`, laion-art's
`aesthetic`, img2dataset's `txt`, COYO-700M's `aesthetic_score_laion_v2`, DataComp's
`clip_l14_similarity_score`. Each input file's columns are read (one `parquet_schema` query) and
mapped to roles on their own; consecutive files mapped alike form a `Run`, one `read_parquet`,
and the runs are read as one relation with canonical role names (`source_sql`).
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meissonic_cli.errors import InputError

if TYPE_CHECKING:
    import duckdb

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
# Output name of each role: LAION's lower-case names, `caption` for the text.
OUTPUT_NAMES: dict[str, str] = {
    "url": "url", "caption": "caption", "width": "width", "height": "height",
    "similarity": "similarity", "hash": "hash", "unsafe": "punsafe", "watermark": "pwatermark",
    "aesthetic": "aesthetic",
}
NUMERIC_ROLES = ("width", "height", "similarity", "unsafe", "watermark", "aesthetic")
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


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                  "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "REAL", "DECIMAL")


def _is_numeric(duck_type: str | None) -> bool:
    return bool(duck_type) and str(duck_type).upper().split("(")[0] in _NUMERIC_TYPES


def name_files(paths: list[Path], most: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


@dataclass
class Run:
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


def read_columns(con: "duckdb.DuckDBPyConnection", files: list[Path]) -> list[list[tuple[str, str]]]:
    """(name, DuckDB type) of the top-level columns of each file, from one `parquet_schema` query."""
    rows = run_sql(con, f"SELECT file_name, name, duckdb_type, num_children FROM parquet_schema({file_list(files)})",
                "read the parquet schema").fetchall()
    by_file: dict[str, list[tuple[str, str, int]]] = {}
    for fname, name, typ, children in rows:
        by_file.setdefault(fname, []).append((name, typ, int(children or 0)))
    out = []
    for path in files:
        elems = by_file.get(str(path))
        if elems is None:  # a name DuckDB spelled differently: ask for this file alone
            described = run_sql(con, f"DESCRIBE SELECT * FROM read_parquet({quote_lit(str(path))})",
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


def file_list(files: list[Path]) -> str:
    return "[" + ", ".join(quote_lit(str(p)) for p in files) + "]"


def plan_runs(files: list[Path], columns: list[list[tuple[str, str]]], *, schema: str | None,
              overrides: dict[str, str | None], keep_cols: list[str]) -> list[Run]:
    """Detect each file's columns and group consecutive files that read the same way.

    `schema`: a `SCHEMAS` name to use strictly (None: detected per file); `overrides`: role ->
    column given by the user; `keep_cols`: extra columns asked for. Refuses (naming the files)
    when a file lacks a URL or caption column or an override column, or no file has a keep column;
    a filter whose column some files lack is refused by the caller.
    """
    missing: dict[str, list[Path]] = {}
    runs: list[Run] = []
    keep_seen: set[str] = set()
    for i, (path, cols_types) in enumerate(zip(files, columns)):
        present = [n for n, _ in cols_types]
        types = {n: t for n, t in cols_types}
        lower = {n.lower(): n for n in present}
        for role, name in overrides.items():
            if name and name.lower() not in lower:
                missing.setdefault(f"--{role}-col {name!r} is not a column of {{files}}", []).append(path)
        detected = schema or detect_schema(present)
        cols = detect_columns(present, {r: v for r, v in overrides.items() if v and v.lower() in lower},
                              detected, strict=schema is not None)
        for role in ("url", "caption"):
            if role not in cols:
                looked = SCHEMAS[schema].get(role, ()) if schema else ROLE_CANDIDATES[role]
                missing.setdefault(f"{{files}} {{have}} no {role} column (looked for {', '.join(looked)}; "
                                   f"pass --{role}-col NAME)", []).append(path)
        keep = {c.lower(): lower[c.lower()] for c in keep_cols if c.lower() in lower}
        keep_seen.update(keep)
        role_types = {role: types[col] for role, col in cols.items()}
        prev = runs[-1] if runs else None
        if prev is not None and (prev.cols, prev.types, prev.keep, prev.schema) == (cols, role_types, keep, detected):
            prev.same_layout = prev.same_layout and cols_types == columns[i - 1]
            prev.files.append(path)
        else:
            runs.append(Run(i, [path], cols, role_types, keep, detected, True, present))
    for what, paths in missing.items():
        first = columns[files.index(paths[0])]
        raise InputError(what.replace("{files}", name_files(paths)).replace("{have}", "has" if len(paths) == 1 else "have")
                         + f"; columns present{' in ' + str(paths[0]) if len(paths) < len(files) else ''}: "
                         f"{', '.join(n for n, _ in first)}")
    for c in keep_cols:
        if c.lower() not in keep_seen:
            raise InputError(f"--keep-col {c!r} is not a column of any input; columns present: "
                             f"{', '.join(n for n, _ in columns[0])}")
    return runs


def present_in(runs: list[Run], path: Path) -> list[str]:
    return next((run.present for run in runs if path in run.files), [])


def _null_of(role: str, hash_type: str | None) -> str:
    if role in NUMERIC_ROLES:
        return "CAST(NULL AS DOUBLE)"
    if role == "hash" and hash_type:
        return f"CAST(NULL AS {hash_type})"
    return "CAST(NULL AS VARCHAR)"


def _hash_type(runs: list[Run]) -> str | None:
    """The hash column's common DuckDB type, or VARCHAR when files disagree (int vs sha256 text)."""
    types = {r.types["hash"] for r in runs if "hash" in r.cols}
    return types.pop() if len(types) == 1 else ("VARCHAR" if types else None)


def source_sql(runs: list[Run], roles: list[str], keep_cols: list[str], *, raw: list[str] = (),
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
                items.append(f"{cast}({quote_ident(col)} AS DOUBLE) AS {role}")
            elif role == "hash":
                items.append(f"CAST({quote_ident(col)} AS {hash_type}) AS hash" if run.types["hash"] != hash_type
                             else f"{quote_ident(col)} AS hash")
            else:
                items.append(f"CAST({quote_ident(col)} AS VARCHAR) AS {role}")
        for role in raw:
            items.append(f"CAST({quote_ident(run.cols[role])} AS VARCHAR) AS __raw_{role}" if run.text(role)
                         else f"CAST(NULL AS VARCHAR) AS __raw_{role}")
        for c in keep_cols:
            items.append(f"{quote_ident(run.keep[c.lower()]) if c.lower() in run.keep else 'NULL'} AS {quote_ident('keep__' + c)}")
        if position:
            items += [f"file_index + {run.first} AS __file", "file_row_number AS __row"]
        union = "" if run.same_layout else ", union_by_name = true"
        parts.append(f"SELECT {', '.join(items)}\n  FROM read_parquet({file_list(run.files)}{union})")
    return "\n  UNION ALL ".join(parts)


def output_items(roles: list[str], keep_cols: list[str]) -> list[str]:
    items = [f"{role} AS {quote_ident(OUTPUT_NAMES[role])}" for role in OUTPUT_NAMES if role in roles]
    items += [f"{quote_ident('keep__' + c)} AS {quote_ident(c)}" for c in keep_cols]
    return items


def subset_runs(runs: list[Run], indices: list[int]) -> list[Run]:
    """The runs restricted to the input files `indices` (their positions are not kept)."""
    wanted = set(indices)
    out = []
    for run in runs:
        files = [p for k, p in enumerate(run.files) if run.first + k in wanted]
        if files:
            out.append(dataclasses.replace(run, files=files))
    return out


def run_sql(con: "duckdb.DuckDBPyConnection", sql: str, what: str) -> Any:
    import duckdb

    try:
        return con.execute(sql)
    except duckdb.InterruptException:  # Ctrl-C while DuckDB runs: the command's interrupted message
        raise KeyboardInterrupt from None
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"DuckDB could not {what}: {first}") from None


def column_names(runs: list[Run], role: str) -> str | None:
    """The input column of `role`: one name, or the names joined with ' | ' when files differ."""
    names = list(dict.fromkeys(run.cols[role] for run in runs if role in run.cols))
    return " | ".join(names) if names else None
