"""The filter steps of `curate` as DuckDB SQL, their failure codes, histogram bins and shard plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meissonic_cli.config import flag_of
from meissonic_cli.data.columns import OUTPUT_NAMES, ROLE_CANDIDATES, SCHEMAS, Run, name_files, present_in
from meissonic_cli.errors import InputError

if TYPE_CHECKING:
    from meissonic_cli.data.curate import CurateConfig

# What Python's str.split() (and CLIP's caption cleaner) split words on: every code point whose
# str.isspace() is true. RE2's \s is ASCII only, so the word count spells the class out.
SPACE_CODEPOINTS: tuple[int, ...] = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0,
                                     0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
# Histogram bins per score: (low, high, bins); values outside go to the end bins.
HISTOGRAMS: dict[str, tuple[float, float, int]] = {
    "aesthetic": (0.0, 10.0, 10),
    "watermark": (0.0, 1.0, 10),
    "unsafe": (0.0, 1.0, 10),
    "similarity": (0.0, 0.5, 10),
}


def _num(v: float) -> str:
    return repr(float(v))


@dataclass
class Step:
    name: str  # how the stats report names it
    flag: str | None  # the flag that asked for it
    role: str | None  # column role it reads (None for url/caption presence)
    null_sql: str  # true when the filtered value is NULL, NaN or +-inf
    keep_sql: str  # true when the row passes (false or NULL for NULL, NaN and +-inf)
    numeric: bool = True  # decided by numeric columns alone (counted in the stats scan)


def word_count(expr: str) -> str:
    space = "".join(f"\\x{{{c:X}}}" for c in SPACE_CODEPOINTS)
    return f"len(regexp_extract_all({expr}, '[^{space}]+'))"


def build_steps(cfg: "CurateConfig", runs: list[Run]) -> list[Step]:
    def need(role: str, flag_name: str) -> None:
        lacking = [p for r in runs if role not in r.cols for p in r.files]
        if lacking:
            looked = SCHEMAS[cfg.schema].get(role, ()) if cfg.schema else ROLE_CANDIDATES[role]
            raise InputError(
                f"{flag_of(type(cfg), flag_name)} needs a {role} column but {name_files(lacking)} "
                f"{'has' if len(lacking) == 1 else 'have'} none (looked for "
                f"{', '.join(looked) if looked else f'nothing: the {cfg.schema} schema has no {role} column'}); "
                f"columns present: {', '.join(present_in(runs, lacking[0]))}; pass --{role}-col NAME "
                "or curate those files separately")

    def bad(expr: str) -> str:
        return f"({expr} IS NULL OR NOT isfinite({expr}))"

    # Keep conditions: a plain comparison (pushed into the parquet scan) and isfinite(). Not
    # `x < 'inf'`: DuckDB folds that to true from the parquet min/max statistics, which leave NaN out.
    def at_least(expr: str, v: float) -> str:
        return f"{expr} >= {_num(v)} AND isfinite({expr})"

    def below(expr: str, v: float) -> str:
        return f"{expr} < {_num(v)} AND isfinite({expr})"

    steps: list[Step] = []
    simple = [("min_aesthetic", "aesthetic", ">=", at_least), ("max_watermark", "watermark", "<", below),
              ("max_unsafe", "unsafe", "<", below), ("min_similarity", "similarity", ">=", at_least)]
    for name, role, op, keep in simple:
        v = getattr(cfg, name)
        if v is not None:
            need(role, name)
            steps.append(Step(f"{OUTPUT_NAMES[role]} {op} {v:g}", flag_of(type(cfg), name), role,
                               bad(role), keep(role, v)))
    size_bad = f"({bad('width')} OR {bad('height')})"
    if cfg.min_side is not None:
        need("width", "min_side"), need("height", "min_side")
        steps.append(Step(f"min(width, height) >= {cfg.min_side}", flag_of(type(cfg), "min_side"), "width",
                           size_bad, f"{at_least('width', cfg.min_side)} AND {at_least('height', cfg.min_side)}"))
    for name, role in (("min_width", "width"), ("min_height", "height")):
        v = getattr(cfg, name)
        if v is not None:
            need(role, name)
            steps.append(Step(f"{role} >= {v}", flag_of(type(cfg), name), role, bad(role), at_least(role, v)))
    if cfg.max_aspect_ratio is not None:
        need("width", "max_aspect_ratio"), need("height", "max_aspect_ratio")
        r = _num(cfg.max_aspect_ratio)
        steps.append(Step(f"aspect ratio <= {cfg.max_aspect_ratio:g}", flag_of(type(cfg), "max_aspect_ratio"),
                           "width", size_bad,
                           f"(isfinite(width) AND isfinite(height) AND least(width, height) > 0 AND "
                           f"greatest(width, height) <= {r} * least(width, height))"))
    # String steps come last: the stats scan then reads only numeric columns. A caption of space
    # characters only (Unicode Zs, which DuckDB's trim() strips) is absent; one of a tab is present.
    steps.append(Step("url and caption present", None, None,
                       "(url IS NULL OR url = '' OR caption IS NULL OR trim(caption) = '')",
                       "(url <> '' AND trim(caption) <> '')", numeric=False))
    words = word_count("caption")
    if cfg.min_caption_words is not None:
        steps.append(Step(f"caption words >= {cfg.min_caption_words}", flag_of(type(cfg), "min_caption_words"),
                           "caption", "caption IS NULL", f"{words} >= {cfg.min_caption_words}", numeric=False))
    if cfg.max_caption_words is not None:
        steps.append(Step(f"caption words <= {cfg.max_caption_words}", flag_of(type(cfg), "max_caption_words"),
                           "caption", "caption IS NULL", f"{words} <= {cfg.max_caption_words}", numeric=False))
    return steps


def bin_expr(expr: str, role: str) -> str:
    # Bare floor() keys, clamped into the end bins in Python (`hist_list`): clamping or casting in
    # SQL costs several times more. NULL and NaN keys are dropped there.
    lo, hi, n = HISTOGRAMS[role]
    scale = _num(n / (hi - lo))
    return f"floor({expr} * {scale})" if lo == 0 else f"floor(({expr} - {_num(lo)}) * {scale})"


def hist_expr(expr: str, role: str) -> str:
    return f"histogram({bin_expr(expr, role)})"


def hist_list(value: Any, bins: int) -> list[int]:
    counts = [0] * bins
    for k, c in (value or {}).items():
        if k is None or k != k:  # NaN
            continue
        k = max(min(float(k), bins - 1), 0)  # +-inf (a value of +-inf in the column) into the end bins
        counts[int(k)] += int(c)
    return counts


def plan_shards(per_file: list[int], shard_rows: int) -> list[list[int]]:
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


def fail_case(items: list[tuple[int, Step]], depth: int = 1) -> str:
    """Code 2i+1: step i removed the row for NULL/NaN/inf; 2i+2: for its value; 0: kept.

    Nested so a row is tested against each step once, passing rows first (cheaper in DuckDB than
    a flat CASE testing the NULL condition and the negated keep condition of every step).
    """
    if not items:
        return "0"
    (i, st), pad = items[0], "  " * depth
    return (f"CASE WHEN {st.keep_sql}\n{pad}  THEN {fail_case(items[1:], depth + 1)}\n"
            f"{pad}  WHEN {st.null_sql} THEN {2 * i + 1} ELSE {2 * i + 2} END")
