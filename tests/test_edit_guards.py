"""`meissonic edit`: what `run_edit` writes and says, and the geometry `edit_image` honours.

Read back what a run writes (sidecar JSON, the PNG's text mark, messages on stderr, the progress
bar's last line, the summary table) and compare it with what the case asked for. Tiny random model,
64-pixel images and one or two sampler steps, so the file runs in seconds.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_edit import _case as edit_case
from test_edit import _encode, render_source

from meissonic_cli.errors import ConfigError, InputError, OutputExistsError
from meissonic_cli.model.vq import tensor_to_images
from meissonic_cli.sample.edit import (
    EditCase,
    EditConfig,
    EditRunResult,
    case_notes,
    edit_image,
    remask_positions,
    run_edit,
    summary_table,
)
from meissonic_cli.sample.outputs import MARK_KEY
from meissonic_cli.sample.sample import PRESETS, SampleConfig


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from meissonic_cli.sample.pipeline import MeissonicPipeline

    return MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return render_source(tmp_path_factory.mktemp("guards_src"))


def _case(source: Path, **kw) -> EditCase:
    """test_edit's case with one step (these checks are about what is written, not the sampling)."""
    return edit_case(source, **{"steps": 1, **kw})


def _config(model: str, out: Path, steps: int = 1, **kw) -> EditConfig:
    return EditConfig(model=model, out=str(out), sample=SampleConfig(steps=steps, cfg=2.0, device="cpu"), **kw)


def _white_block(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    mask.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Messages the user sees, before any model work


def test_case_errors_name_the_modes_and_the_cases_line(tmp_path, source):
    with pytest.raises(InputError) as err:
        run_edit(_config("unused-model", tmp_path / "out", image=str(source), prompt="x", mode="paint"), progress=False)
    assert str(err.value) == "unknown mode 'paint'; use one of inpaint, outpaint, edit"

    cases = tmp_path / "cases.jsonl"
    good = {"image": str(source), "prompt": "a red circle", "box": [0, 0, 8, 8]}
    for bad, needle in (({"mode": "paint"}, "unknown mode 'paint'"), ({"seed": -1}, "seed: seed -1 is out of range")):
        cases.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        with pytest.raises(InputError) as err:
            run_edit(_config("unused-model", tmp_path / "out", cases=str(cases)), progress=False)
        assert str(err.value).startswith(f"{cases} line 2: {needle}"), str(err.value)
    assert not (tmp_path / "out").exists()


def test_validate_reports_the_preset_problem():
    cfg = EditConfig(model="m", image="x.png", prompt="p", sample=SampleConfig(preset="fancy"))
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.problems == [f"unknown --preset 'fancy'; use one of {', '.join(PRESETS)}"]


def test_mask_size_note_gives_width_then_height(tmp_path, pipe, source):
    mask = _white_block(tmp_path / "wide.png", (48, 32), (0, 0, 24, 32))
    notes = case_notes(pipe, _case(source, mask=mask))
    assert notes == ["00000-inpaint-a-blue-square-on-the-left: mask wide.png is 48x32 and image scene.png 64x64: "
                     "each is resized to 64x64, as the official inpaint.py does"]


def test_summary_table_rows(tmp_path):
    def render(result: EditRunResult) -> list[str]:
        from rich.console import Console

        console = Console(file=io.StringIO(), width=120, color_system=None)
        console.print(summary_table(result))
        return [re.sub(r"[│┃|]", " ", line).strip() for line in console.file.getvalue().splitlines()]

    out = tmp_path / "runs"
    nine = EditRunResult(out_dir=out, written=[out / f"{i}.png" for i in range(9)], skipped=2, seconds=9.0,
                         masked_tokens=list(range(1, 10)))
    lines = render(nine)
    assert any(re.fullmatch(rf"output\s+{re.escape(str(out))}", line) for line in lines), lines
    assert any(re.fullmatch(r"edits written / skipped \(done\)\s+9 / 2", line) for line in lines), lines
    assert any(re.fullmatch(r"tokens redrawn per edit\s+1, 2, 3, 4, 5, 6, 7, 8 \.\.\.", line) for line in lines), lines
    eight = EditRunResult(out_dir=out, written=[out / f"{i}.png" for i in range(8)], seconds=8.0,
                          masked_tokens=list(range(1, 9)))
    assert any(re.fullmatch(r"tokens redrawn per edit\s+1, 2, 3, 4, 5, 6, 7, 8", line) for line in render(eight))


# ----------------------------------------------------------------------------------------------
# edit_image: geometry and settings reach the model


def test_outpaint_rounds_to_an_even_token_grid(pipe, source, one_thread):
    assert bool(pipe.transformer.config.downsample)  # the tiny model compresses 2x2, as the released one
    original = _encode(pipe, source)
    result = edit_image(pipe, _case(source, mode="outpaint", extend=(20, 0, 0, 0)))
    # 20 px -> one 16-px token, plus one more so the 2x2 compression gets an even grid.
    assert result.size == (96, 64) and result.image.size == (96, 64)
    assert torch.equal(result.tokens_in[:, 2:], original) and result.masked == 8


def test_blend_zero_outputs_the_decoded_tokens(pipe, source, one_thread):
    result = edit_image(pipe, _case(source, box=(0, 0, 16, 16), blend=0))
    assert result.resized_from is None and result.masked == 1
    decoded = tensor_to_images(pipe.vq.decode(result.tokens_out[None]))[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(decoded))


def test_confidence_edit_ranks_tokens_at_the_case_guidance(pipe, source, one_thread):
    original = _encode(pipe, source)[None]
    picked = {}
    for cfg in (0.0, 20.0):
        expected = remask_positions(original, 4, "confidence",
                                    logits=pipe.logits(original, ["a blue square on the left"], "", cfg))
        result = edit_image(pipe, _case(source, mode="edit", edit_rule="confidence", strength=0.25, cfg=cfg))
        assert torch.equal(result.token_mask.flatten().nonzero()[:, 0], expected), cfg
        picked[cfg] = expected.tolist()
    assert picked[0.0] != picked[20.0]  # the guidance changes the ranking, so the check above can tell


# ----------------------------------------------------------------------------------------------
# run_edit: what it writes


def test_batch_sidecars_record_each_case_and_png_marks_match(tmp_path, pipe, source, one_thread):
    with Image.open(source) as im:
        im.resize((72, 72)).save(tmp_path / "big.png")  # not a multiple of 32: resized to 64x64
    mask = _white_block(tmp_path / "spot.png", (64, 64), (16, 16, 32, 32))  # exactly token (1, 1)
    rows = [
        {"image": "big.png", "prompt": "a box", "box": [0, 0, 36, 36], "name": "box"},
        {"image": str(source), "prompt": "a spot", "mask": "spot.png", "dilate": 1, "name": "spot"},
        {"image": str(source), "prompt": "wider", "mode": "outpaint", "target": [128, 64], "name": "wide"},
        {"image": str(source), "prompt": "greener", "mode": "edit", "strength": 0.25, "edit_rule": "exact-count",
         "name": "green"},
    ]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = run_edit(_config("tiny", out, cases=str(tmp_path / "cases.jsonl")), progress=False, pipeline=pipe)
    assert [p.name for p in result.written] == ["box.png", "spot.png", "wide.png", "green.png"]
    side = {name: json.loads((out / f"{name}.json").read_text()) for name in ("box", "spot", "wide", "green")}
    for name, meta in side.items():
        assert meta["file"] == f"{name}.png"
        with Image.open(out / f"{name}.png") as im:
            # the sidecar adds the digest of the PNG itself (`outputs.write_output`)
            assert json.loads(im.text[MARK_KEY]) == {k: v for k, v in meta.items() if k != "png_sha256"}
            assert [meta["width"], meta["height"]] == list(im.size)

    box = side["box"]
    # 0..35 of 72 px is 0..31 of 64: the 2x2 top-left tokens.
    assert box["resized_from"] == [72, 72] and (box["width"], box["height"]) == (64, 64)
    assert box["masked_tokens"] == 4 and box["box"] == [0, 0, 36, 36]
    assert box["mask"] is None and box["extend"] is None and box["target"] is None and box["strength"] is None

    spot = side["spot"]
    assert spot["mask"] == str(mask.resolve()) and spot["dilate"] == 1 and spot["masked_tokens"] == 9
    assert spot["resized_from"] is None and spot["box"] is None and spot["strength"] is None

    wide = side["wide"]
    assert wide["target"] == [128, 64] and wide["extend"] is None and wide["mask"] is None
    assert (wide["width"], wide["height"]) == (128, 64) and wide["masked_tokens"] == 16 and wide["strength"] is None

    green = side["green"]
    assert green["strength"] == 0.25 and green["edit_rule"] == "exact-count" and green["masked_tokens"] == 4
    assert green["mask"] is None and green["target"] is None and green["box"] is None


def test_a_file_we_did_not_write_is_kept(tmp_path, pipe, source):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out / "mine.png")  # a PNG without our mark
    before = (out / "mine.png").read_bytes()
    cfg = _config("tiny", out, image=str(source), prompt="x", box="0,0,16,16", name="mine")
    with pytest.raises(OutputExistsError, match="was not written by this command"):
        run_edit(cfg, progress=False, pipeline=pipe)
    assert (out / "mine.png").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["mine.png"]


def test_single_edit_loads_the_asked_dtype_notes_on_stderr_and_shows_progress(tmp_path, tiny_model_dir, source,
                                                                               capsys, monkeypatch, one_thread):
    from meissonic_cli.sample.pipeline import MeissonicPipeline

    loaded = []
    real = MeissonicPipeline.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        loaded.append(real(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(MeissonicPipeline, "from_pretrained", classmethod(recording))
    mask = _white_block(tmp_path / "tall.png", (32, 48), (0, 0, 16, 24))
    cfg = _config(str(tiny_model_dir), tmp_path / "out", steps=2, image=str(source), prompt="a red circle",
                  mask=str(mask), name="one")
    cfg.sample.dtype = "bf16"
    result = run_edit(cfg, progress=True)
    assert [p.name for p in result.written] == ["one.png"]
    assert len(loaded) == 1 and loaded[0].dtype == torch.bfloat16
    captured = capsys.readouterr()
    note = "one: mask tall.png is 32x48 and image scene.png 64x64: each is resized to 64x64"
    assert note in captured.err and note not in captured.out
    # The steps bar ends at the case's step count (the sampler's callback moves it).
    assert re.search(r"steps \(one\).* 2/2", captured.out), captured.out


def test_working_size_is_the_rounded_size_under_the_side_limit(tmp_path, pipe):
    """`check_working_size`, the one size check of every edit path: an image's own size is read from its header and
    rounded to the model's pixel multiple (8190 -> 8192 passes); a side over 8192, or an outpaint canvas over it
    (rounded to the even token grid with the model), is refused with the way out."""
    from meissonic_cli.sample.edit_masks import check_working_size, dilate_tokens

    near = tmp_path / "near.png"
    Image.new("1", (8190, 40)).save(near)
    assert check_working_size(EditCase(index=0, image=near, prompt="a", box=(0, 0, 8, 8))) == (8190, 40)
    assert check_working_size(EditCase(index=0, image=near, prompt="a", box=(0, 0, 8, 8)), pipe) == (8192, 32)
    over = tmp_path / "over.png"
    Image.new("1", (8200, 32)).save(over)
    with pytest.raises(InputError, match=r"image over.png 8200x32 is over the largest supported side of 8192 .*--resolution"):
        check_working_size(EditCase(index=0, image=over, prompt="a", box=(0, 0, 8, 8)))
    assert check_working_size(EditCase(index=0, image=over, prompt="a", box=(0, 0, 8, 8), resolution=(512, 64))) == (512, 64)
    wide = EditCase(index=0, image=near, prompt="a", mode="outpaint", extend=(0, 0, 16, 0))
    with pytest.raises(InputError, match=r"outpaint canvas .* 8224x32 is over"):
        check_working_size(wide, pipe)  # 8192 + one token, + one more for the even grid
    # A dilation wider than the token grid covers what the grid's own size covers (and costs no more).
    cells = torch.zeros(4, 6, dtype=torch.bool)
    cells[1, 2] = True
    assert torch.equal(dilate_tokens(cells, 10**9), dilate_tokens(cells, 6)) and bool(dilate_tokens(cells, 10**9).all())
