"""Reproducing the official scripts: --text-encoder (the laion encoder they load), --exact (CPU generator)
and --preset official (their settings), on tiny released-layout folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import InputError
from meissonic_cli.model.text_encoder import ClipTokenizer, TextEncoder
from meissonic_cli.sample.sample import OFFICIAL_NEGATIVE_PROMPT, SampleConfig

runner = CliRunner()


def make_clip_model_folder(folder: Path, text_config, seed: int) -> TextEncoder:
    """A full Hugging Face CLIPModel folder (laion layout: text and vision towers, tokenizer files at the
    top) whose text tower is a fresh random encoder; returns that encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TextEncoder(text_config).eval()
    encoder.save_pretrained(folder)
    text_cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    weights["vision_model.embeddings.class_embedding"] = torch.randn(8)
    weights["visual_projection.weight"] = torch.randn(text_cfg["projection_dim"], 8)
    weights["logit_scale"] = torch.tensor(4.6)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": text_cfg["projection_dim"],
        "text_config": {k: v for k, v in text_cfg.items() if k != "architectures"},
        "vision_config": {"hidden_size": 8, "patch_size": 4, "image_size": 8}}))
    ClipTokenizer().save_pretrained(folder)
    return encoder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> tuple[Path, TextEncoder]:
    from meissonic_cli.model.scaffold import tiny_configs

    folder = tmp_path_factory.mktemp("laion") / "CLIP-tiny"
    return folder, make_clip_model_folder(folder, tiny_configs()[1], seed=11)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from meissonic_cli.sample.pipeline import MeissonicPipeline

    return MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu")


def test_pipeline_text_encoder_override(tiny_model_dir, clip_dir, pipe):
    from meissonic_cli.sample.pipeline import MeissonicPipeline

    folder, encoder = clip_dir
    other = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", text_encoder=folder)
    prompts = ["a red circle!", "two blue squares"]
    with torch.no_grad():
        ref = encoder.encode(prompts)
        got = other.text_encoder.encode(prompts)
        own = pipe.text_encoder.encode(prompts)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(got[1], own[1])  # really another encoder than the folder's text_encoder/
    assert other.text_encoder.tokenizer.pad_id == pipe.text_encoder.tokenizer.pad_id == 0
    # The model's text_encoder/ is not needed then.
    with pytest.raises(Exception, match="--text-encoder config"):
        MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", text_encoder=folder.parent / "missing")


def test_sample_and_edit_cli_record_the_text_encoder(tiny_model_dir, clip_dir, tmp_path, one_thread):
    folder, _ = clip_dir
    out = tmp_path / "samples"
    base = ["--model", str(tiny_model_dir), "--steps", "2", "--cfg", "2", "--device", "cpu", "--text-encoder", str(folder)]
    result = runner.invoke(app, ["sample", *base, "--prompt", "a cat!", "--resolution", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    side = json.loads(next(out.glob("*.json")).read_text())
    assert side["text_encoder"] == str(folder.resolve())
    # A finished image made with another text encoder is not reused.
    again = runner.invoke(app, ["sample", *base[:-2], "--prompt", "a cat!", "--resolution", "64", "--out", str(out)])
    assert again.exit_code == 1 and "text_encoder" in again.output

    from PIL import Image

    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "blue.png")
    edits = tmp_path / "edits"
    result = runner.invoke(app, ["edit", *base, "--image", str(tmp_path / "blue.png"), "--box", "0,0,32,32",
                                 "--prompt", "a red square", "--out", str(edits)])
    assert result.exit_code == 0, result.output
    side = json.loads(next(edits.glob("*.json")).read_text())
    assert side["text_encoder"] == str(folder.resolve()) and side["masked_tokens"] == 4


def test_tokenize_loads_a_full_clip_folder_with_the_models_tokenizer(tiny_model_dir, clip_dir, tmp_path):
    from meissonic_cli.data.tokenize import TokenizeConfig, load_models

    folder, encoder = clip_dir
    cfg = TokenizeConfig(input=str(tmp_path), out=str(tmp_path / "tok"), model=str(tiny_model_dir),
                         text_encoder=str(folder))
    _, text = load_models(cfg, torch.device("cpu"))
    ids = text.tokenize(["wow! a cat"])
    assert ids[0, :4].tolist() == ClipTokenizer.from_pretrained(tiny_model_dir / "tokenizer")(["wow! a cat"])[0, :4].tolist()
    with torch.no_grad():
        assert torch.equal(text(ids)[1], encoder(ids)[1])


def test_exact_draws_from_a_cpu_generator(pipe, monkeypatch):
    """--exact seeds CPU generators whatever the device (diffusers' convention), so a seed gives the same
    random stream on CPU and GPU; the fast loop draws on the model's device."""
    import meissonic_cli.sample.pipeline as pipeline_module

    class Stop(Exception):
        pass

    seen = []

    def spy(seed, generator, batch, device):
        seen.append(torch.device(device))
        raise Stop

    monkeypatch.setattr(pipeline_module, "_generators", spy)
    # Pretend the model lives on another device: only the generators' device is looked at before Stop.
    monkeypatch.setattr(type(pipe), "device", property(lambda self: torch.device("meta")))
    for exact in (True, False):
        with pytest.raises(Stop):
            pipe(["a red circle"], steps=3, guidance_scale=2.0, seed=5, exact=exact, output_type="codes")
    assert seen == [torch.device("cpu"), torch.device("meta")]


def test_exact_is_reproducible_per_seed(pipe, one_thread):
    run = lambda seed: pipe(["a red circle"], steps=4, guidance_scale=2.0, seed=seed, exact=True, output_type="codes")
    first = run(7)
    assert torch.equal(first, run(7))
    generator = torch.Generator().manual_seed(7)  # an explicit CPU generator gives the same stream
    same = pipe(["a red circle"], steps=4, guidance_scale=2.0, generator=generator, exact=True, output_type="codes")
    assert torch.equal(first, same)
    assert not torch.equal(first, run(8))


def test_preset_official_fills_defaults_only():
    cfg = SampleConfig(model="m", prompt=["x"], preset="official").validate()
    assert (cfg.steps, cfg.cfg, cfg.negative_prompt, cfg.exact) == (64, 9.0, OFFICIAL_NEGATIVE_PROMPT, True)
    mine = SampleConfig(model="m", prompt=["x"], preset="official", steps=12, negative_prompt="fog").validate()
    assert (mine.steps, mine.negative_prompt, mine.exact) == (12, "fog", True)
    with pytest.raises(InputError, match="unknown --preset"):
        SampleConfig(model="m", prompt=["x"], preset="fastest").validate()

    from meissonic_cli.sample.edit import EditConfig

    edit = EditConfig(model="m", image="i.png", prompt="x", sample=SampleConfig(preset="official")).validate()
    assert edit.resolution == "1024" and edit.sample.steps == 64 and edit.sample.exact


def test_exact_edit_keeps_unmasked_tokens_and_repeats(pipe, tmp_path, one_thread):
    """`edit --exact` (the official loop, CPU generator) for a masked inpaint and the img2img rule."""
    from PIL import Image

    from meissonic_cli.model.vq import images_to_tensor
    from meissonic_cli.sample.edit import EditCase, edit_image

    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    image.save(tmp_path / "g.png")
    source = pipe.vq.encode(images_to_tensor([image]))[0]
    mask_id = pipe.scheduler.config.mask_token_id
    for kw in ({"mode": "inpaint", "box": (0, 0, 32, 48)}, {"mode": "edit", "strength": 0.5}):
        case = EditCase(index=0, image=tmp_path / "g.png", prompt="a red circle", steps=6, cfg=3.0, seed=2, exact=True,
                        **kw)
        first, again = edit_image(pipe, case), edit_image(pipe, case)
        keep = ~first.token_mask
        assert first.masked > 0 and torch.equal(first.tokens_out[keep], source[keep])
        assert not bool((first.tokens_out == mask_id).any()) and torch.equal(first.tokens_out, again.tokens_out)
