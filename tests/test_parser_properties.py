"""Property tests of every user-facing parser: whatever the input, the parser returns a valid value or
raises a `MeissonicError` (one clear line at the CLI), never another exception.

Parsers: prompt files (.txt/.jsonl), edit cases files (JSONL and JSON list), the resolution / box /
extend / target / temperature strings, and parquet metadata of random schemas (column names, types,
NULL, NaN, +-inf) through curate and download's input staging.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meissonic_cli.errors import InputError, MeissonicError
from meissonic_cli.safety import MAX_RESOLUTION, MAX_SEED

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 2**64, 1e999]))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20))
values = st.one_of(scalars, st.lists(scalars, max_size=5))
size_text = st.one_of(
    st.text(max_size=20),
    st.builds(lambda a, b, sep: f"{a}{sep}{b}", st.integers(-5, 10**6), st.integers(-5, 10**6),
              st.sampled_from(["x", "X", "*", ",", " x ", ""])),
    st.integers(-10, 10**7).map(str),
)


_ROOT: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _workdir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Examples write under one pytest temporary folder (removed with pytest's others)."""
    _ROOT.append(tmp_path_factory.mktemp("props"))
    yield
    _ROOT.pop()


def _folder() -> Path:
    return Path(tempfile.mkdtemp(dir=_ROOT[-1]))


def _write(data: bytes, suffix: str) -> Path:
    folder = _folder()
    path = folder / f"input{suffix}"
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------
# Strings


@SETTINGS
@given(size_text)
def test_resolution(text: str) -> None:
    from meissonic_cli.config import parse_resolution

    try:
        size = parse_resolution(text)
    except InputError:
        return
    assert size is None or (0 < size[0] <= MAX_RESOLUTION and 0 < size[1] <= MAX_RESOLUTION)


@SETTINGS
@given(st.one_of(size_text, st.lists(st.one_of(st.integers(-10, 10**6), st.text(max_size=3)), max_size=5)),
       st.sampled_from([2, 4]))
def test_box_extend_target(text, n: int) -> None:
    from meissonic_cli.sample.edit import parse_ints, parse_size

    for parse in (lambda: parse_ints(text, n, "--box"), lambda: parse_size(text, "--target")):
        try:
            out = parse()
        except InputError:
            continue
        assert all(isinstance(v, int) for v in out)


@SETTINGS
@given(st.one_of(st.text(max_size=20), st.builds(lambda a, b: f"{a},{b}", numbers, numbers), numbers.map(str)))
def test_temperature(text: str) -> None:
    from meissonic_cli.sample.sample import parse_temperature

    try:
        t = parse_temperature(text)
    except InputError:
        return
    assert all(math.isfinite(v) for v in (t if isinstance(t, tuple) else (t,)))


# ----------------------------------------------------------------------------------------------
# Prompt files


prompt_rows = st.dictionaries(st.sampled_from(["prompt", "negative_prompt", "seed", "steps", "cfg", "other"]), values,
                              max_size=5)


@SETTINGS
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.lists(prompt_rows, max_size=4).map(
                     lambda rows: "\n".join(json.dumps(r) for r in rows).encode())),
       st.sampled_from([".txt", ".jsonl"]))
def test_prompt_files(data: bytes, suffix: str) -> None:
    from meissonic_cli.sample.sample import SampleConfig, read_prompts

    cfg = SampleConfig(model="m", prompts=str(_write(data, suffix)))
    try:
        items = read_prompts(cfg)
    except InputError:
        return
    assert items
    for item in items:
        assert isinstance(item.prompt, str) and item.prompt.strip()
        assert isinstance(item.seed, int) and 0 <= item.seed <= MAX_SEED
        assert isinstance(item.steps, int) and item.steps >= 1
        assert math.isfinite(item.cfg)


# ----------------------------------------------------------------------------------------------
# Edit cases files


case_rows = st.dictionaries(
    st.sampled_from(["image", "prompt", "mode", "mask", "box", "extend", "target", "strength", "seed", "steps", "cfg",
                     "name", "negative_prompt", "dilate", "blend", "other"]),
    st.one_of(values, st.just("in.png"), st.just([0, 0, 8, 8]), st.sampled_from(["inpaint", "outpaint", "edit"]),
              st.sampled_from(["../x", "/tmp/x", "ok-name", ".."])),
    max_size=8)


@SETTINGS
@given(st.lists(case_rows, max_size=4), st.booleans(), st.booleans())
def test_cases_files(rows: list, as_list: bool, with_image: bool) -> None:
    from meissonic_cli.safety import safe_output_name
    from meissonic_cli.sample.edit import EditConfig, read_cases

    if with_image:
        rows = [{"image": "in.png", "prompt": "a cat", "box": [0, 0, 8, 8], **r} for r in rows]
    text = json.dumps(rows) if as_list else "\n".join(json.dumps(r) for r in rows)
    path = _write(text.encode(), ".json" if as_list else ".jsonl")
    cfg = EditConfig(model="m", cases=str(path), out=str(path.parent / "out"))
    try:
        cases = read_cases(cfg)
    except InputError:
        return
    for case in cases:
        assert safe_output_name(case.stem, "stem") == case.stem
        assert math.isfinite(case.strength) and math.isfinite(case.cfg)
        assert 0 <= case.seed <= MAX_SEED and case.steps >= 1


# ----------------------------------------------------------------------------------------------
# Parquet schemas


column_names = st.one_of(st.sampled_from(["url", "URL", "caption", "TEXT", "aesthetic", "AESTHETIC_SCORE", "width",
                                          "WIDTH", "height", "pwatermark", "punsafe", "similarity", "hash"]),
                         st.text(min_size=1, max_size=8))
column_kinds = st.sampled_from(["float", "int", "str", "null", "bool"])


def _column(kind: str, draw_values: list):
    import pyarrow as pa

    n = len(draw_values)
    if kind == "float":
        return pa.array([v if isinstance(v, float) else None for v in draw_values], pa.float64())
    if kind == "int":
        return pa.array([int(v) if isinstance(v, float) and math.isfinite(v) and abs(v) < 2**62 else None
                         for v in draw_values], pa.int64())
    if kind == "str":
        return pa.array([None if v is None else str(v) for v in draw_values], pa.string())
    if kind == "bool":
        return pa.array([bool(v) if v is not None else None for v in draw_values], pa.bool_())
    return pa.nulls(n)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(column_names, column_kinds, min_size=1, max_size=5),
       st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from([0.0, 6.5, 256.0, float("inf"), float("-inf"), float("nan")])),
                min_size=1, max_size=6),
       st.sampled_from([[], ["--min-aesthetic", "5"], ["--min-side", "64"], ["--max-aspect-ratio", "2"]]))
def test_parquet_schemas(schema: dict, data: list, flags: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from meissonic_cli.data.curate import CurateConfig, curate
    from meissonic_cli.data.download import DownloadConfig, _inspect_inputs, _stage_inputs

    if len({k.lower() for k in schema}) < len(schema):
        return  # parquet allows it, DuckDB does not: a different test (curate refuses ambiguous names)
    folder = _folder()
    path = folder / "in.parquet"
    pq.write_table(pa.table({name: _column(kind, data) for name, kind in schema.items()}), path)
    options = {"min_aesthetic": 5.0} if flags[:1] == ["--min-aesthetic"] else \
        {"min_side": 64} if flags[:1] == ["--min-side"] else {"max_aspect_ratio": 2.0} if flags else {}
    try:
        result = curate(CurateConfig(inputs=[str(path)], output=str(folder / "out"), **options))
    except MeissonicError:
        pass
    else:
        assert result.stats["rows_out"] <= len(data)
    try:
        cfg = DownloadConfig(inputs=[str(path)], output=str(folder / "dl"))
        cols = _inspect_inputs([path], cfg)
        rows, dropped, _ = _stage_inputs([path], cols, folder / "stage", cfg.url_schemes(), {})
    except MeissonicError:
        return
    assert rows + dropped <= len(data)


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"{\n", b"[1, 2", b"null", b"3"])
def test_cases_file_garbage_is_an_input_error(bad: bytes) -> None:
    from meissonic_cli.sample.edit import EditConfig, read_cases

    for suffix in (".json", ".jsonl"):
        path = _write(bad, suffix)
        with pytest.raises(InputError):
            read_cases(EditConfig(model="m", cases=str(path), out=str(path.parent / "o")))
