"""`meissonic edit` on the tiny random model: what is not masked comes back bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import InputError
from meissonic_cli.model.vq import images_to_tensor
from meissonic_cli.sample.edit import (
    EditCase,
    box_mask,
    edit_image,
    load_mask,
    mask_token_grid,
    outpaint_layout,
    remask_positions,
    token_mask,
)
from meissonic_cli.shapes import world as shapes

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from meissonic_cli.model.scaffold import build_tiny_model_folder

    return build_tiny_model_folder(tmp_path_factory.mktemp("edit") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir):
    from meissonic_cli.sample.pipeline import MeissonicPipeline

    return MeissonicPipeline.from_pretrained(model_dir, device="cpu")


def render_source(folder: Path) -> Path:
    """A 64 px shapes scene (a blue square on the left) to edit, as folder/scene.png."""
    path = folder / "scene.png"
    shapes.render(shapes.benchmark_prompts()[20].scene, 64).save(path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return render_source(tmp_path_factory.mktemp("src"))


def _encode(pipe, path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return pipe.vq.encode(images_to_tensor([im]))[0]


def _case(source: Path, **kw) -> EditCase:
    values = dict(index=0, image=source, prompt="a blue square on the left", steps=3, cfg=3.0, seed=1)
    values.update(kw)
    return EditCase(**values)


def test_inpaint_keeps_every_unmasked_token_bit_identical(pipe, source):
    mask_id = pipe.scheduler.config.mask_token_id
    original = _encode(pipe, source)
    result = edit_image(pipe, _case(source, mode="inpaint", box=(0, 0, 20, 20), blend=4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True  # pixels 0..19 touch the first two 16-pixel cells on each axis
    assert torch.equal(result.token_mask, expected) and result.masked == 4
    keep = ~result.token_mask
    assert torch.equal(result.tokens_in[keep], original[keep])
    assert torch.equal(result.tokens_out[keep], original[keep])
    assert bool((result.tokens_in[result.token_mask] == mask_id).all())
    assert not bool((result.tokens_out == mask_id).any()) and int(result.tokens_out.max()) < pipe.vq.codebook_size
    # --blend pastes the original back away from the seam.
    with Image.open(source) as im:
        src = np.asarray(im.convert("RGB"))
    out = np.asarray(result.image)
    assert out.shape == src.shape and np.array_equal(out[40:, 40:], src[40:, 40:])
    # Same seed, same tokens.
    again = edit_image(pipe, _case(source, mode="inpaint", box=(0, 0, 20, 20), blend=4))
    assert torch.equal(again.tokens_out, result.tokens_out)


def test_token_mask_downsampling_and_dilation(tmp_path):
    pixels = np.zeros((64, 96), dtype=bool)
    pixels[40, 17] = True  # row 40 -> token row 2, column 17 -> token column 1
    cells = token_mask(pixels, 16)
    assert cells.shape == (4, 6) and cells.sum() == 1 and bool(cells[2, 1])
    grown = token_mask(pixels, 16, dilate=1)
    assert grown.sum() == 9 and bool(grown[1:4, 0:3].all())
    corner = np.zeros((64, 64), dtype=bool)
    corner[0, 0] = True
    assert token_mask(corner, 16, dilate=2).sum() == 9  # clipped at the border
    # A mask image: resized to the working size like inpaint.py (any size), then the official rule:
    # Lanczos straight to the token grid, repaint where the grey level is >= 128.
    block = np.zeros((64, 96), dtype=np.uint8)
    block[16:48, 48:80] = 255  # exactly tokens (1..2, 3..4)
    block[40, :] = 255  # a 1-pixel line: far under half a token, so it masks nothing
    Image.fromarray(block).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (96, 64))
    assert mask.size == (96, 64) and mask.mode == "RGB"
    grid = mask_token_grid(mask, (4, 6))
    assert grid.sum() == 4 and bool(grid[1:3, 3:5].all())
    assert mask_token_grid(load_mask(tmp_path / "m.png", (192, 128)), (8, 12)).sum() == 16  # same mask, twice the size
    assert mask_token_grid(mask, (4, 6), dilate=1).sum() == 16
    with pytest.raises(InputError, match="inside the 64x64 image"):
        box_mask((10, 10, 70, 20), (64, 64))


def test_outpaint_keeps_the_original_tokens(pipe, source):
    original = _encode(pipe, source)
    mask_id = pipe.scheduler.config.mask_token_id
    result = edit_image(pipe, _case(source, mode="outpaint", extend=(32, 0, 32, 0)))
    assert result.size == (128, 64) and result.image.size == (128, 64)
    assert torch.equal(result.tokens_out[:, 2:6], original) and torch.equal(result.tokens_in[:, 2:6], original)
    assert result.masked == 16 and bool((result.tokens_in[:, :2] == mask_id).all())
    centred = edit_image(pipe, _case(source, mode="outpaint", target=(128, 128)))
    assert centred.size == (128, 128) and torch.equal(centred.tokens_out[2:6, 2:6], original)
    # Rounded to the token grid, and kept even for the model's 2x2 compression.
    assert outpaint_layout((64, 64), 16, True, extend=(20, 0, 0, 0)) == (96, 64, 32, 0)
    assert outpaint_layout((64, 64), 16, False, extend=(20, 0, 0, 0)) == (80, 64, 16, 0)
    assert outpaint_layout((64, 64), 16, True, target=(128, 96)) == (128, 96, 32, 16)
    with pytest.raises(InputError, match="adds nothing"):
        outpaint_layout((64, 64), 16, True, extend=(4, 4, 4, 4))


@pytest.mark.parametrize("strength,count", [(0.25, 4), (1.0, 16)])  # 0.5 -> 8: the cases test
def test_mask_free_edit_remasks_round_strength_times_tokens(pipe, source, strength, count):
    original = _encode(pipe, source)
    for how in ("exact-count", "confidence"):
        result = edit_image(pipe, _case(source, mode="edit", strength=strength, edit_rule=how))
        assert result.masked == count, how
        keep = ~result.token_mask
        assert torch.equal(result.tokens_out[keep], original[keep])


def test_confidence_remask_picks_the_least_likely_tokens(pipe, source):
    original = _encode(pipe, source)[None]
    chosen = remask_positions(original, 5, "confidence", logits=pipe.logits(original, ["a red circle"], "", 3.0))
    # Independent check through the plain forward: full logits for [uncond, cond], guided, log-softmax.
    text, pooled = pipe.encode_prompts(["", "a red circle"])
    micro = torch.tensor([[64, 64, 0, 0, 6.0]] * 2)
    with torch.no_grad():
        logits = pipe.transformer(original.repeat(2, 1, 1), text, pooled, torch.zeros(1, dtype=torch.long),
                                  micro_conds=micro)
    uncond, cond = logits.float().chunk(2)
    mixed = (uncond + 3.0 * (cond - uncond))[0].flatten(1).T  # (L, K)
    logp = torch.log_softmax(mixed, -1).gather(1, original.reshape(-1, 1))[:, 0]
    assert set(chosen.tolist()) == set(logp.topk(5, largest=False).indices.tolist())


def test_cases_file_writes_sidecars_and_rerun_skips(tmp_path, model_dir, source):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[32:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    cases = [
        {"image": str(source), "mask": "mask.png", "prompt": "a red circle", "mode": "inpaint", "seed": 3},
        {"image": str(source), "prompt": "a wide scene", "mode": "outpaint", "extend": [32, 0, 32, 0], "name": "wide"},
        {"image": str(source), "prompt": "a green square", "mode": "edit", "strength": 0.5, "remask": "random",
         "source_prompt": "a blue square", "category": "photo"},
    ]
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    out = tmp_path / "out"
    args = ["edit", "--model", str(model_dir), "--cases", str(tmp_path / "cases.jsonl"), "--out", str(out),
            "--steps", "2", "--cfg", "2", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["00000-inpaint-a-red-circle.png", "00002-edit-a-green-square.png", "wide.png"]
    inpaint = json.loads((out / "00000-inpaint-a-red-circle.json").read_text())
    assert inpaint["source"] == str(source.resolve()) and inpaint["masked_tokens"] == 4 and inpaint["seed"] == 3
    assert inpaint["mask"] == str((tmp_path / "mask.png").resolve())
    edit = json.loads((out / "00002-edit-a-green-square.json").read_text())
    assert edit["masked_tokens"] == 8 and edit["source_prompt"] == "a blue square" and edit["category"] == "photo"
    assert edit["edit_rule"] == "exact-count"  # the JSONL key of older versions, "remask": "random"
    with Image.open(out / "wide.png") as im:
        assert im.size == (128, 64)

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 / 3" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # A finished output made with other settings is not silently reused.
    changed = [dict(cases[0], seed=4)] + cases[1:]
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(c) for c in changed) + "\n")
    clash = runner.invoke(app, args)
    assert clash.exit_code == 1 and "different seed" in clash.output
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    sharper = runner.invoke(app, [*args, "--token-temperature", "0.5"])
    assert sharper.exit_code == 1 and "different token_temperature" in sharper.output
    assert inpaint["token_temperature"] == 1.0


def test_bad_inputs_fail_with_one_clear_line(tmp_path, model_dir, source):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    base = ["edit", "--model", str(model_dir), "--prompt", "x", "--steps", "2", "--device", "cpu"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing output")
    cases = [
        (["--image", str(tmp_path / "missing.png"), "--box", "0,0,8,8"], "image not found"),
        (["--image", str(tmp_path / "broken.png"), "--box", "0,0,8,8"], "cannot be read as an image"),
        (["--image", str(source), "--mode", "edit", "--edit-rule", "most"], "--edit-rule must be one of"),
        (["--image", str(source), "--mask", str(tmp_path / "nope.png")], "mask not found"),
        (["--image", str(source), "--box", "0,0,80,10"], "inside the 64x64 image"),
        (["--image", str(source), "--box", "1,2,3"], "4 comma-separated integers"),
        (["--image", str(source)], "exactly one of --mask PNG"),
        (["--image", str(source), "--mode", "edit", "--strength", "0"], "--strength must be in (0, 1]"),
        (["--image", str(source), "--mode", "edit", "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--image", str(source), "--mode", "outpaint", "--target", "32x32"], "smaller than"),
        (["--image", str(source), "--mode", "paint"], "unknown mode"),
        (["--image", str(source), "--box", "0,0,8,8", "--token-temperature", "-1"], "--token-temperature must be between 0.001 and 1000"),
    ]
    for extra, needle in cases:
        result = runner.invoke(app, base + extra + ["--out", str(out)])
        assert result.exit_code == 1, (extra, result.output)
        assert needle in result.output, (extra, result.output)
        assert result.output.startswith("Error:") and result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_official_cases_json_runs_end_to_end(tmp_path, model_dir, source, monkeypatch):
    """The official inpaint.py cases.json format: a JSON list of {input, mask, prompt, negative_prompts};
    null negative = none, a missing key = the command's; relative paths against the file's folder, then
    the working directory; masks of another size than their image are resized (and said so)."""
    assets = tmp_path / "assets" / "inpaint"
    assets.mkdir(parents=True)
    Image.open(source).save(assets / "scene.png")
    half = np.zeros((128, 128), dtype=np.uint8)
    half[:, 64:] = 255  # the right half, at twice the image's size
    Image.fromarray(half).save(assets / "half.png")
    wide = np.zeros((64, 96, 3), dtype=np.uint8)
    wide[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)
    Image.fromarray(wide).save(assets / "wide.png")
    spot = Image.new("RGBA", (48, 32), (0, 0, 0, 255))
    spot.paste((255, 255, 255, 255), (0, 0, 16, 16))
    spot.save(assets / "wide_mask.png")
    cases = [
        {"input": "scene.png", "mask": "half.png", "prompt": "a red circle", "negative_prompts": None},
        {"input": "./assets/inpaint/wide.png", "mask": "./assets/inpaint/wide_mask.png", "prompt": "a green square"},
    ]
    (assets / "cases.json").write_text(json.dumps(cases, indent=2))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["edit", "--model", str(model_dir), "--cases", str(assets / "cases.json"),
                                 "--out", str(out), "--steps", "2", "--cfg", "2", "--device", "cpu",
                                 "--negative-prompt", "blurry"])
    assert result.exit_code == 0, result.output
    assert "mask half.png is 128x128 and image scene.png 64x64: each is resized to 64x64" in result.output
    first = json.loads((out / "00000-inpaint-a-red-circle.json").read_text())
    second = json.loads((out / "00001-inpaint-a-green-square.json").read_text())
    assert first["negative_prompt"] == "" and second["negative_prompt"] == "blurry"
    assert first["mask"] == str((assets / "half.png").resolve())
    assert second["source"] == str((assets / "wide.png").resolve())
    expected = [mask_token_grid(load_mask(assets / name, size), (size[1] // 16, size[0] // 16)).sum()
                for name, size in (("half.png", (64, 64)), ("wide_mask.png", (96, 64)))]
    assert [first["masked_tokens"], second["masked_tokens"]] == expected == [8, 4]
    with Image.open(out / "00001-inpaint-a-green-square.png") as im:
        assert im.size == (96, 64)
    # A key neither format has: one clear line.
    (assets / "bad.json").write_text(json.dumps([{"input": "scene.png", "prompt": "x", "guidance": 2}]))
    bad = runner.invoke(app, ["edit", "--model", str(model_dir), "--cases", str(assets / "bad.json"), "--out", str(out)])
    assert bad.exit_code == 1 and "unknown key(s) guidance" in bad.output and bad.output.count("\n") == 1
