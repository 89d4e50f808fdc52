"""Rerun identity: every setting of `sample` and `edit` either reaches what a rerun compares before it
skips a finished image, or is listed here as not affecting the output, with the reason.

A rerun into a folder that holds finished images skips them when their sidecars match. A setting that
changes the image but is missing from that comparison makes the rerun keep old images made with other
settings, silently. So for every config field:
- AFFECTS (field -> another valid value, or a list of two): a rerun with that value must not skip the
  finished image (it is refused, naming the difference, or redone); with two values, a folder made with
  the first must not be skipped by a rerun with the second either (two non-default settings can
  collapse to one label where a default and a non-default do not);
- NO_EFFECT (field -> (value or None, reason)): with a value, the rerun's image must be byte-identical
  to a fresh run's with the default, which is what makes skipping right; None marks a field that is
  not a setting of the image at all (where the output goes, permissions), with the reason.
A field in neither table fails `test_every_*_field_is_classified`: a new field must be classified.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from fixtures_models import copy_model_dir
from test_edit import render_source

from meissonic_cli.errors import OutputExistsError
from meissonic_cli.sample.edit import EditConfig, run_edit
from meissonic_cli.sample.sample import SampleConfig, run_sample

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- sample ------------------------------------------------------------------------------------

SAMPLE_AFFECTS = {
    "prompt": [["a blue square"]],
    "negative_prompt": ["blurry", "dark"],
    "steps": [3, 4],
    "cfg": [2.0, 4.0],
    "resolution": "32x64",
    "seed": [4, 5],
    "temperature": ["1,0", "3,0"],
    "token_temperature": [0.5, 0.25],
    "order": ["halton", "random"],
    "schedule": ["linear", "sqrt"],
    "noise_reg": [1.0, 2.0],
    "differential": [0.5, 0.75],
    "cache_refresh": [2, 3],
    "exact": True,
    "dtype": "bf16",
    "variant": "fp16",
    "lora": [["<adapter>:0.5"], ["<adapter>:0.7"]],
    "text_encoder": "<other text encoder>",  # replaced by a real folder in the test
    "preset": "official",
    "first_index": 5,  # another number is another file name and seed: redone, never skipped
    "quantize": "int8",
    "vq_decode": ["banded", "whole"],  # the decodes agree to float rounding, not bit for bit
}
SAMPLE_NO_EFFECT = {
    "images_per_prompt": (2, "how many images each prompt gets; each image's prompt and seed are compared"),
    "prompts_format": (None, "how --prompts is parsed; the prompts it yields are compared"),
    "offload": (None, "where the parts wait between stages (CPU or GPU); each stage computes the same on the device "
                      "(needs a GPU: refused on a CPU-only run); recorded in the sidecar, not compared"),
    "compile": (None, "the same blocks compiled by torch.compile: tokens equal eager within float rounding "
                      "(tests/test_compile.py); not compared, like a change of kernels"),
    "prompts": ("<prompts file>", "another way to give the same prompt; the prompt itself is compared"),
    "batch_size": (2, "every image draws from its own seeded generator; batching only changes the speed"),
    "grid": (True, "adds grid.png beside the images; the images are the same"),
    "device": ("cpu", "compared as the sidecar's `generator` (the device whose random generator draws the tokens); "
                      "see test_sample_rerun_on_another_generator_device_is_refused"),
    "model": (None, "a folder path; the weights are compared by their digest (outputs.other_model)"),
    "out": (None, "where the images go"),
    "allow_download": (None, "only whether --model may be fetched; the weights are compared by digest"),
    "overwrite": (None, "only permission to replace files this command did not finish"),
}


def _pixels(path: Path) -> bytes:
    """The decoded image (the PNG's text chunk holds the sidecar, seconds included)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_sample_field_is_classified():
    classified = set(SAMPLE_AFFECTS) | set(SAMPLE_NO_EFFECT)
    assert not set(SAMPLE_AFFECTS) & set(SAMPLE_NO_EFFECT)
    assert _fields(SampleConfig) == classified, (
        f"unclassified SampleConfig fields: {sorted(_fields(SampleConfig) - classified)}; "
        f"stale entries: {sorted(classified - _fields(SampleConfig))}")


def with_fp16_variant(src: Path, dst: Path) -> Path:
    """A copy of a model folder that also holds fp16 variant files (NAME.fp16.safetensors), as the hub's does."""
    from safetensors.torch import load_file, save_file

    copy_model_dir(src, dst)
    for path in list(dst.rglob("*.safetensors")):
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(state, path.with_name(path.name.replace(".safetensors", ".fp16.safetensors")))
    return dst


@pytest.fixture(scope="module")
def model_with_variant(tiny_model_dir, tmp_path_factory) -> Path:
    return with_fp16_variant(tiny_model_dir, tmp_path_factory.mktemp("variant") / "model")


@pytest.fixture(scope="module")
def sample_base(model_with_variant, tmp_path_factory) -> tuple[SampleConfig, Path]:
    tmp = tmp_path_factory.mktemp("rerun-sample")
    cfg = SampleConfig(model=str(model_with_variant), prompt=["a red circle"], out=str(tmp / "base"), steps=2,
                       resolution="32", device="cpu", seed=3, cfg=3.0)
    run_sample(dataclasses.replace(cfg), progress=False)
    return cfg, tmp


def _sample_outcome(cfg: SampleConfig) -> str:
    try:
        result = run_sample(cfg, progress=False)
    except OutputExistsError:
        return "refused"
    return "skipped" if result.skipped else "redone"


def make_adapter(model: Path, folder: Path) -> Path:
    """A peft LoRA adapter (random non-zero B) of the model's transformer, saved as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from meissonic_cli.model.transformer import MeissonicTransformer

    if not folder.exists():
        peft_model = get_peft_model(MeissonicTransformer.from_pretrained(model),
                                    LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=g))
        peft_model.save_pretrained(folder)
    return folder


def _sample_value(field: str, value, tmp: Path, tiny_model_dir: Path):
    if isinstance(value, list) and value and isinstance(value[0], str) and value[0].startswith("<adapter>"):
        return [v.replace("<adapter>", str(make_adapter(tiny_model_dir, tmp / "adapter"))) for v in value]
    if value == "<other text encoder>":
        other = tmp / "other_te"
        if not other.exists():
            shutil.copytree(tiny_model_dir / "text_encoder", other)
        return str(other)
    if value == "<prompts file>":
        path = tmp / "prompts.txt"
        path.write_text("a red circle\n")
        return str(path)
    return value


@pytest.mark.parametrize("field", sorted(SAMPLE_AFFECTS))
def test_sample_rerun_with_another_setting_does_not_keep_the_old_image(field, sample_base, tmp_path, tiny_model_dir):
    base, tmp = sample_base
    values = SAMPLE_AFFECTS[field] if isinstance(SAMPLE_AFFECTS[field], list) else [SAMPLE_AFFECTS[field]]
    values = [_sample_value(field, v, tmp, tiny_model_dir) for v in values]
    out = tmp_path / "out"
    shutil.copytree(base.out, out)
    changes = {"out": str(out), field: values[0]}
    if field in ("prompt", "first_index"):
        # Another prompt or number is another file name: the old image is not skipped for it (nor overwritten).
        assert _sample_outcome(dataclasses.replace(base, **changes)) == "redone"
        return
    assert _sample_outcome(dataclasses.replace(base, **changes)) in ("refused", "redone"), field
    if len(values) > 1:
        first = dataclasses.replace(base, out=str(tmp_path / "first"), **{field: values[0]})
        run_sample(first, progress=False)
        assert _sample_outcome(dataclasses.replace(first, **{field: values[1]})) in ("refused", "redone"), field


@pytest.mark.parametrize("field", sorted(f for f, (v, _) in SAMPLE_NO_EFFECT.items() if v is not None))
def test_sample_settings_listed_as_no_effect_give_the_same_image(field, sample_base, tmp_path, tiny_model_dir):
    base, tmp = sample_base
    value = _sample_value(field, SAMPLE_NO_EFFECT[field][0], tmp, tiny_model_dir)
    changes = {"out": str(tmp_path / "fresh"), field: value}
    if field == "prompts":
        changes["prompt"] = []
    if field == "batch_size":  # batching needs more than one image: compare image 0 of two prompts
        changes["prompt"] = ["a red circle", "two green squares"]
    run_sample(dataclasses.replace(base, **changes), progress=False)
    stem = "00000-a-red-circle"
    assert _pixels(tmp_path / "fresh" / f"{stem}.png") == _pixels(Path(base.out) / f"{stem}.png")
    # ... and a rerun with that value into the finished folder skips it.
    out = tmp_path / "rerun"
    shutil.copytree(base.out, out)
    assert _sample_outcome(dataclasses.replace(base, **{**changes, "out": str(out)})) == "skipped"


def test_sample_rerun_with_a_copy_of_the_model_skips_and_with_other_weights_refuses(sample_base, tmp_path,
                                                                                   model_with_variant):
    base, _ = sample_base
    copy = copy_model_dir(model_with_variant, tmp_path / "copy")
    out = tmp_path / "out"
    shutil.copytree(base.out, out)
    assert _sample_outcome(dataclasses.replace(base, out=str(out), model=str(copy))) == "skipped"
    from meissonic_cli.model.scaffold import build_tiny_model_folder

    other = build_tiny_model_folder(tmp_path / "other", seed=1)
    assert _sample_outcome(dataclasses.replace(base, out=str(out), model=str(other))) == "refused"


def test_sample_rerun_on_another_generator_device_is_refused(sample_base, tmp_path):
    """Outside --exact the tokens are drawn on the device's own generator, so a CUDA rerun of CPU images would
    differ: the sidecar records the generator's device and a rerun on another one is refused."""
    base, _ = sample_base
    out = tmp_path / "out"
    shutil.copytree(base.out, out)
    side = out / "00000-a-red-circle.json"
    meta = json.loads(side.read_text())
    assert meta["generator"] == "cpu"
    side.write_text(json.dumps({**meta, "generator": "cuda"}))
    with pytest.raises(OutputExistsError, match="generator"):
        run_sample(dataclasses.replace(base, out=str(out)), progress=False)
    # A sidecar from before the key existed is not refused for it.
    side.write_text(json.dumps({k: v for k, v in meta.items() if k != "generator"}))
    assert _sample_outcome(dataclasses.replace(base, out=str(out))) == "skipped"


# ---- edit --------------------------------------------------------------------------------------

# `sample.X` are the sampler settings edit takes (commands/edit.py: every sampler option but NOT_IN_EDIT).
EDIT_AFFECTS = {
    "prompt": "a red circle on the right",
    "mode": "edit",
    "box": "0,0,32,32",
    "mask": "<mask>",
    "dilate": 1,
    "blend": 4,
    "sample.steps": 3,
    "sample.cfg": 2.0,
    "sample.seed": 4,
    "sample.negative_prompt": "blurry",
    "sample.temperature": "1,0",
    "sample.token_temperature": 0.5,
    "sample.exact": True,
    "sample.dtype": "bf16",
    "sample.variant": "fp16",
    "sample.lora": ["<adapter>:0.5"],
    "sample.quantize": "int8",
    "sample.vq_decode": "banded",
    "sample.text_encoder": "<other text encoder>",
    "sample.preset": "official",
    "image": "<other image>",
}
# Settings of the other modes (outpaint, mask-free edit): they cannot apply to the base inpaint case, and are
# checked against a base case of their own mode below.
EDIT_AFFECTS_OTHER_MODES = {
    "extend": ("outpaint", {"extend": "16,0,0,0"}, "0,16,0,0"),
    "target": ("outpaint", {"target": "96x64"}, "64x96"),
    "strength": ("edit", {"strength": 0.5}, 0.75),
    "edit_rule": ("edit", {"strength": 0.5}, "exact-count"),
}
EDIT_NO_EFFECT = {
    "resolution": (None, "resizes the input before the edit: compared as the sidecar's resolution and resized_from "
                         "(its effect is the edited image's size, checked by test_edit)"),
    "cases": (None, "another way to give the cases; each case's settings are compared"),
    "name": (None, "the output's file name"),
    "model": (None, "a folder path; the weights are compared by their digest"),
    "out": (None, "where the edits go"),
    "sample": (None, "holds the sampler settings, each classified as sample.X"),
    "sample.device": (None, "compared as the sidecar's `generator`, as for sample"),
    "sample.allow_download": (None, "only whether --model may be fetched"),
    "sample.offload": (None, "as for sample: where the parts wait between stages"),
    "sample.compile": (None, "as for sample: the same blocks compiled"),
}


def _edit_fields() -> set[str]:
    from meissonic_cli.commands.edit import NOT_IN_EDIT
    from meissonic_cli.commands.sample import JOB_FIELDS

    flags = {f.name for f in dataclasses.fields(SampleConfig) if f.metadata.get("cli", True)}
    nested = {f"sample.{n}" for n in flags if n not in NOT_IN_EDIT and n not in JOB_FIELDS}
    return _fields(EditConfig) | nested | {"sample.allow_download"}


def test_every_edit_field_is_classified():
    classified = set(EDIT_AFFECTS) | set(EDIT_AFFECTS_OTHER_MODES) | set(EDIT_NO_EFFECT)
    assert _edit_fields() == classified, (
        f"unclassified edit settings: {sorted(_edit_fields() - classified)}; "
        f"stale entries: {sorted(classified - _edit_fields())}")


@pytest.fixture(scope="module")
def edit_inputs(tiny_model_dir, tmp_path_factory) -> dict:
    from PIL import Image

    tmp = tmp_path_factory.mktemp("rerun-edit")
    source = render_source(tmp)
    other = tmp / "other.png"
    with Image.open(source) as im:
        im.transpose(Image.FLIP_LEFT_RIGHT).save(other)
    mask = tmp / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (32, 32, 64, 64))
    m.save(mask)
    other_te = tmp / "other_te"
    shutil.copytree(tiny_model_dir / "text_encoder", other_te)
    return {"source": source, "<other image>": str(other), "<mask>": str(mask), "<other text encoder>": str(other_te),
            "tmp": tmp}


def _edit_config(tiny_model_dir: Path, inputs: dict, out: Path, **changes) -> EditConfig:
    top = {k: v for k, v in changes.items() if not k.startswith("sample.")}
    nested = {k.removeprefix("sample."): v for k, v in changes.items() if k.startswith("sample.")}
    values = dict(model=str(tiny_model_dir), image=str(inputs["source"]), prompt="a blue square on the left",
                  box="32,32,64,64", out=str(out), name="case")
    values.update(top)
    if "mask" in top or values.get("mode") != "inpaint" and "mode" in top:
        values.pop("box")
    sample = dict(model=str(tiny_model_dir), steps=2, cfg=3.0, seed=1, device="cpu")
    sample.update(nested)
    return EditConfig(**values, sample=SampleConfig(**sample))


def _edit_outcome(cfg: EditConfig) -> str:
    try:
        result = run_edit(cfg, progress=False, notify=None)
    except OutputExistsError:
        return "refused"
    return "skipped" if result.skipped else "redone"


@pytest.mark.parametrize("field", sorted(EDIT_AFFECTS))
def test_edit_rerun_with_another_setting_does_not_keep_the_old_image(field, edit_inputs, tmp_path, model_with_variant):
    out = tmp_path / "out"
    run_edit(_edit_config(model_with_variant, edit_inputs, out), progress=False, notify=None)
    value = EDIT_AFFECTS[field]
    value = edit_inputs.get(value, value) if isinstance(value, str) else value
    if field == "sample.lora":
        value = [v.replace("<adapter>", str(make_adapter(model_with_variant, edit_inputs["tmp"] / "adapter"))) for v in value]
    assert _edit_outcome(_edit_config(model_with_variant, edit_inputs, out, **{field: value})) in ("refused", "redone")


@pytest.mark.parametrize("field", sorted(EDIT_AFFECTS_OTHER_MODES))
def test_edit_rerun_with_another_mode_setting_does_not_keep_the_old_image(field, edit_inputs, tmp_path, model_with_variant):
    mode, base, value = EDIT_AFFECTS_OTHER_MODES[field]
    out = tmp_path / "out"
    run_edit(_edit_config(model_with_variant, edit_inputs, out, mode=mode, **base), progress=False, notify=None)
    assert _edit_outcome(_edit_config(model_with_variant, edit_inputs, out, mode=mode, **base)) == "skipped"
    assert _edit_outcome(_edit_config(model_with_variant, edit_inputs, out, mode=mode, **{**base, field: value})) in (
        "refused", "redone")
