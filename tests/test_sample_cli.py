"""`meissonic sample` end to end on a tiny model folder through the CLI runner, and its bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fixtures_models import copy_model_dir
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import InputError
from meissonic_cli.sample.sample import SampleConfig, parse_resolution, parse_temperature, read_prompts, slugify

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "--resolution", "32", "--device", "cpu"]


def _run(*args: str):
    res = CliRunner().invoke(app, ["sample", *args], env={"COLUMNS": "200"})
    return res


def _error_text(res) -> str:
    return res.output + (repr(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_sample_writes_images_sidecars_grid_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n# a comment line\nTwo blue squares!\n  a green triangle  \n")
    out = tmp_path / "out"
    res = _run("--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--batch-size", "2",
               "--seed", "7", "--grid", "--negative-prompt", "blurry", *FAST)
    assert res.exit_code == 0, _error_text(res)
    stems = ["00000-a-red-circle", "00001-two-blue-squares", "00002-a-green-triangle"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}.png" for s in stems] + [f"{s}.json" for s in stems]
                                                           + ["grid.png"])
    meta = json.loads((out / f"{stems[1]}.json").read_text())
    assert meta["prompt"] == "Two blue squares!" and meta["negative_prompt"] == "blurry"
    assert (meta["index"], meta["seed"], meta["steps"], meta["cfg"]) == (1, 8, 2, 9.0)
    assert meta["resolution"] == "32x32" and meta["model"] == str(tiny_model_dir.resolve()) and meta["seconds"] > 0
    assert meta["temperature"] == [2.0, 0.0] and meta["sampler"] == "fast" and meta["token_temperature"] == 1.0
    assert Image.open(out / f"{stems[0]}.png").size == (32, 32)
    # 3 tiles -> 2 columns, captions below; 32 px tiles are enlarged 5x (pixel for pixel) to fit the captions.
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] == 2 * 5 * 32
        tile = grid.convert("RGB").crop((0, 0, 160, 160)).resize((32, 32), Image.NEAREST)
    with Image.open(out / f"{stems[0]}.png") as first:
        assert list(tile.getdata()) == list(first.convert("RGB").getdata())
    assert "images written / skipped (done)" in res.output and "3 / 0" in res.output

    before = _snapshot(out)
    res = _run("--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--seed", "7",
               "--negative-prompt", "blurry", *FAST)
    assert res.exit_code == 0, _error_text(res)
    assert "0 / 3" in res.output
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "grid.png"} == {k: v for k, v in before.items() if k != "grid.png"}

    # Another token temperature is another image: refuse to mix; a sidecar from before the flag existed means 1.0.
    res = _run("--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--seed", "7",
               "--negative-prompt", "blurry", "--token-temperature", "0.5", *FAST)
    assert res.exit_code == 1 and "token_temperature 1.0 there, 0.5 now" in res.output, _error_text(res)
    for stem in stems:
        side = out / f"{stem}.json"
        side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "token_temperature"}))
    res = _run("--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--seed", "7",
               "--negative-prompt", "blurry", *FAST)
    assert res.exit_code == 0 and "0 / 3" in res.output, _error_text(res)


def test_jsonl_settings_per_line_and_non_square(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "seed": 42, "steps": 3, "cfg": 1.0}) + "\n\n"
                       + json.dumps({"prompt": "a dog", "negative_prompt": "dark"}) + "\n")
    out = tmp_path / "out"
    res = _run("--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
               "--resolution", "64x32", "--device", "cpu", "--batch-size", "4", "--seed", "100")
    assert res.exit_code == 0, _error_text(res)
    cat = json.loads((out / "00000-a-cat.json").read_text())
    dog = json.loads((out / "00001-a-dog.json").read_text())
    assert (cat["seed"], cat["steps"], cat["cfg"], cat["negative_prompt"]) == (42, 3, 1.0, "")
    assert (dog["seed"], dog["steps"], dog["cfg"], dog["negative_prompt"]) == (101, 2, 9.0, "dark")
    assert Image.open(out / "00001-a-dog.png").size == (64, 32) and dog["resolution"] == "64x32"


def test_prompt_parsing_helpers(tmp_path: Path) -> None:
    assert parse_resolution("512") == (512, 512) and parse_resolution("768x512") == (768, 512)
    assert parse_resolution(None) is None
    assert parse_temperature("2,0") == (2.0, 0.0) and parse_temperature("3") == 3.0
    assert slugify("A photo: of *the* Moon!") == "a-photo-of-the-moon" and slugify("???") == "prompt"
    for bad, match in (("abc", "not a size"), ("0x5", "not a size")):
        with pytest.raises(InputError, match=match):
            parse_resolution(bad)
    with pytest.raises(InputError, match="'start,end'"):
        parse_temperature("hot")
    items = read_prompts(SampleConfig(model="m", prompt=["one", "two"], seed=5))
    assert [(i.index, i.prompt, i.seed) for i in items] == [(0, "one", 5), (1, "two", 6)]


@pytest.fixture
def guarded_out(tmp_path: Path) -> Path:
    """An --out folder that already holds a finished image, a sidecar and an unrelated file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000-a-dog.png").write_bytes(b"not really a png")
    (out / "00000-a-dog.json").write_text(json.dumps({"prompt": "a dog", "steps": 1}))
    (out / "notes.txt").write_text("keep me")
    return out


def _bad_input_cases(tiny_model_dir: Path, tmp: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"prompt": "ok"}) + "\n\n{\"prompt\": \"missing brace\"\n")
    bad_key = tmp / "key.jsonl"
    bad_key.write_text(json.dumps({"prompt": "ok", "negative": "x"}) + "\n")
    no_weights = copy_model_dir(tiny_model_dir, tmp / "no_weights")
    os.remove(no_weights / "text_encoder" / "model.safetensors")
    model = ["--model", str(tiny_model_dir)]
    return [
        (["--model", str(tmp / "missing"), "--prompt", "a cat"], "model folder not found"),
        (["--model", str(no_weights), "--prompt", "a cat"], "text_encoder/model.safetensors"),
        ([*model, "--prompt", "a cat", "--resolution", "48"], "48x48 is not divisible by 32"),
        ([*model, "--prompts", str(empty)], "no prompts in"),
        ([*model, "--prompts", str(bad_jsonl)], "bad.jsonl line 3: not valid JSON"),
        ([*model, "--prompts", str(bad_key)], "key.jsonl line 1: unknown key(s) negative"),
        ([*model, "--prompts", str(tmp / "nope.txt")], "nope.txt: no such file"),
        ([*model, "--prompt", "a cat", "--dtype", "fp8"], "unknown --dtype 'fp8'"),
        ([*model, "--prompt", "a cat", "--device", "tpu"], "unknown device 'tpu'"),
        ([*model, "--prompt", "a cat", "--prompts", str(empty)], "not both"),
        ([*model, "--prompt", "a cat", "--steps", "0"], "--steps must be between 1 and 10000"),
        ([*model, "--prompt", "a cat", "--token-temperature", "0"], "--token-temperature must be between 0.001 and 1000"),
        # --out holds an image of that name that is not a verified output of ours: refuse rather than replace.
        ([*model, "--prompt", "a dog"], "00000-a-dog.png exists and was not written by this command"),
    ]


def test_bad_input_fails_with_one_line_and_keeps_out(tiny_model_dir: Path, tmp_path: Path, guarded_out: Path) -> None:
    before = _snapshot(guarded_out)
    for args, message in _bad_input_cases(tiny_model_dir, tmp_path):
        extra = [x for flag, value in (("--steps", "2"), ("--device", "cpu"), ("--resolution", "32"))
                 if flag not in args for x in (flag, value)]
        res = _run(*args, *extra, "--out", str(guarded_out))
        assert res.exit_code == 1, (args, _error_text(res))
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, res.output)
        assert message in lines[0], (message, lines[0])
        assert _snapshot(guarded_out) == before, args
