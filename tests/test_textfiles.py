"""Prompt and cases files: utf-8-sig, `.txt` split on \\n / \\r\\n only, JSONL on \\n only; property tests
round-trip arbitrary Unicode prompts through a .txt and a .jsonl file into the sidecars `sample` writes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meissonic_cli.errors import InputError
from meissonic_cli.sample.sample import SampleConfig, load_pipeline, read_prompts, run_sample
from meissonic_cli.textfiles import jsonl_lines, read_text, text_format, txt_lines

# Characters str.splitlines() breaks on besides \n and \r: none of them may split a prompt.
OTHER_BREAKS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"


def _prompts(path: Path, **kw) -> list[str]:
    return [it.prompt for it in read_prompts(SampleConfig(prompts=str(path), **kw))]


def test_bom_does_not_hide_a_leading_comment(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# a comment\na red circle\r\n".encode("utf-8"))
    assert _prompts(path) == ["a red circle"]
    path = tmp_path / "p.jsonl"
    path.write_bytes('\ufeff{"prompt": "x"}\n'.encode("utf-8"))
    assert _prompts(path) == ["x"]


def test_only_newlines_split_txt_and_jsonl(tmp_path: Path) -> None:
    inner = "".join(f"a{c}b" for c in OTHER_BREAKS)
    path = tmp_path / "p.txt"
    path.write_text(f"first {inner}\r\nsecond\n", encoding="utf-8", newline="")
    assert _prompts(path) == [f"first {inner}", "second"]
    assert txt_lines("a\r\nb\u2028c\nd") == ["a", "b\u2028c", "d"]
    path = tmp_path / "p.jsonl"
    # A raw U+2028 inside a JSON string is valid JSON (the old reader split the line there).
    path.write_text(json.dumps({"prompt": f"x{inner}y"}, ensure_ascii=False) + "\r\n", encoding="utf-8", newline="")
    assert _prompts(path) == [f"x{inner}y"]
    assert jsonl_lines('{"a": "\u2028"}\n{}') == ['{"a": "\u2028"}', "{}"]


def test_format_from_flag_or_ending(tmp_path: Path) -> None:
    assert text_format("-", None, "--prompts", "--prompts-format") == "txt"
    assert text_format("/dev/fd/63", None, "--prompts", "--prompts-format") == "txt"
    assert text_format("a.JSONL", None, "--prompts", "--prompts-format") == "jsonl"
    assert text_format("a.txt", "jsonl", "--prompts", "--prompts-format") == "jsonl"
    with pytest.raises(InputError, match="--prompts-format txt\\|jsonl"):
        text_format("a.csv", None, "--prompts", "--prompts-format")
    with pytest.raises(InputError, match="no such file"):
        read_text(str(tmp_path / "nope"), "--prompts")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_pipeline(SampleConfig(model=str(tiny_model_dir), device="cpu"))
    torch.set_num_threads(before)


def _sample_sidecars(pipe, path: Path, out: Path, **kw) -> list[dict]:
    cfg = SampleConfig(model=str(pipe.model_path), prompts=str(path), out=str(out), steps=1, resolution="32",
                       device="cpu", batch_size=8, **kw)
    result = run_sample(cfg, progress=False, pipeline=pipe)
    return [json.loads(p.with_suffix(".json").read_text(encoding="utf-8")) for p in result.written]


ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24)
# What a .txt line can hold as one prompt: no \n or \r, no surrounding whitespace (lines are stripped),
# not a `#` comment.
TXT_PROMPT = ANY_TEXT.map(lambda s: s.replace("\n", " ").replace("\r", " ").strip()).filter(
    lambda s: bool(s) and not s.startswith("#"))
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(prompts=st.lists(TXT_PROMPT, min_size=1, max_size=3), newline=st.sampled_from(["\n", "\r\n"]),
       bom=st.booleans())
def test_txt_prompts_round_trip_into_sidecars(pipe, prompts: list[str], newline: str, bom: bool) -> None:
    assume(bom or not prompts[0].startswith("\ufeff"))  # without a BOM mark, a leading U+FEFF reads as one
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.txt"
        path.write_bytes((("\ufeff" if bom else "") + "# header\n" + newline.join(prompts) + newline).encode("utf-8"))
        metas = _sample_sidecars(pipe, path, Path(tmp) / "out")
    assert [m["prompt"] for m in metas] == prompts
    assert [m["index"] for m in metas] == list(range(len(prompts)))


@PROPERTY
@given(rows=st.lists(st.tuples(ANY_TEXT.filter(lambda s: bool(s.strip())), ANY_TEXT), min_size=1, max_size=3),
       ascii_only=st.booleans(), bom=st.booleans())
def test_jsonl_prompts_round_trip_into_sidecars(pipe, rows: list[tuple[str, str]], ascii_only: bool, bom: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts"  # no ending: --prompts-format jsonl
        lines = [json.dumps({"prompt": p, "negative_prompt": n}, ensure_ascii=ascii_only) for p, n in rows]
        path.write_bytes((("\ufeff" if bom else "") + "\n".join(lines) + "\n").encode("utf-8"))
        metas = _sample_sidecars(pipe, path, Path(tmp) / "out", prompts_format="jsonl")
    assert [(m["prompt"], m["negative_prompt"]) for m in metas] == rows
