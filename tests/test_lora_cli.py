"""`--lora PATH[:SCALE]` on `sample`/`edit`/`eval` and `MeissonicPipeline.from_pretrained(lora=...)`: each adapter
layout (PEFT folder, diffusers/official-trainer file, meissonic-lora file) runs from the CLI, the sidecars record
the adapters, a rerun with other adapters is refused, and bad adapters are one `Error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.model.transformer import MeissonicTransformer

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--steps", "2", "--resolution", "32", "--device", "cpu", "--prompt", "a red square"]


def _pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def _run(*args: str):
    return CliRunner().invoke(app, [*args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One peft-built adapter (non-zero B) saved in the three layouts."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("adapters")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "proj_out"])
    model = get_peft_model(MeissonicTransformer.from_pretrained(tiny_model_dir), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "peft")
    state = get_peft_model_state_dict(model.get_base_model())  # as the official trainer takes it from its unet
    assert not any(k.startswith("base_model.") for k in state)
    StableDiffusionLoraLoaderMixin.save_lora_weights(root / "diffusers", unet_lora_layers=state,
                                                     unet_lora_adapter_metadata=config.to_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "ours.safetensors"),
              metadata={"format": "meissonic-lora", "rank": "4", "alpha": "8.0"})
    return {"peft": root / "peft", "diffusers": root / "diffusers" / "pytorch_lora_weights.safetensors",
            "meissonic-lora": root / "ours.safetensors"}


def test_sample_applies_each_layout_and_records_it(tiny_model_dir, adapters, tmp_path):
    plain = _run("sample", "--model", str(tiny_model_dir), "--out", str(tmp_path / "plain"), *FAST)
    assert plain.exit_code == 0, plain.output
    images = {}
    for layout, path in adapters.items():
        out = tmp_path / layout
        res = _run("sample", "--model", str(tiny_model_dir), "--lora", f"{path}:0.7", "--out", str(out), *FAST)
        assert res.exit_code == 0, res.output
        meta = json.loads(next(out.glob("*.json")).read_text())
        assert [(r["path"], r["scale"]) for r in meta["lora"]] == [(str(path.resolve()), 0.7)]
        assert len(meta["lora"][0]["sha256"]) == 64
        images[layout] = _pixels(next(out.glob("*.png")))
    # One adapter in three layouts samples one image, and not the base model's.
    assert images["peft"] == images["diffusers"] == images["meissonic-lora"]
    assert _pixels(next((tmp_path / "plain").glob("*.png"))) != images["peft"]
    assert json.loads(next((tmp_path / "plain").glob("*.json")).read_text())["lora"] == []

    # A rerun with the same adapter skips the done image; another scale or no adapter is refused.
    out = tmp_path / "peft"
    same = _run("sample", "--model", str(tiny_model_dir), "--lora", f"{adapters['peft']}:0.7", "--out", str(out), *FAST)
    assert same.exit_code == 0 and "0 / 1" in same.output, same.output
    for extra in (["--lora", f"{adapters['peft']}:0.5"], [], ["--lora", f"{adapters['peft']}:0.7", "--lora",
                                                              str(adapters["diffusers"])]):
        res = _run("sample", "--model", str(tiny_model_dir), *extra, "--out", str(out), *FAST)
        assert res.exit_code == 1 and res.output.startswith("Error: ") and "lora" in res.output, res.output


def test_edit_and_the_pipeline_take_adapters(tiny_model_dir, adapters, tmp_path):
    from PIL import Image

    from meissonic_cli.sample.pipeline import MeissonicPipeline

    source = tmp_path / "src.png"
    Image.new("RGB", (32, 32), "red").save(source)
    res = _run("edit", "--model", str(tiny_model_dir), "--image", str(source), "--prompt", "blue", "--mode", "edit", "--strength", "0.5",
               "--lora", str(adapters["peft"]), "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "e"))
    assert res.exit_code == 0, res.output
    meta = json.loads(next((tmp_path / "e").glob("*.json")).read_text())
    assert [r["scale"] for r in meta["lora"]] == [1.0]
    pipe = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu",
                                             lora=[f"{adapters['peft']}:0.5", (adapters["diffusers"], -1.0)])
    assert [a.record["scale"] for a in pipe.loras] == [0.5, -1.0]
    for command in ("sample", "edit", "eval"):
        assert "--lora" in _run(command, "--help").output


def test_bad_adapters_are_one_error_line(tiny_model_dir, adapters, tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 7),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
               "nope.lora_A.weight": torch.zeros(4, 7), "nope.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "bad.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    cases = {
        str(tmp_path / "missing"): "does not exist",
        f"{adapters['peft']}:nan": "finite number between -10 and 10",
        f"{adapters['peft']}:20": "finite number between -10 and 10",
        str(tmp_path / "bad.safetensors"): "unknown target modules: nope; shape mismatches: transformer_blocks.0.attn.to_q",
        str(tmp_path / "junk.safetensors"): "not a readable safetensors file",
    }
    for spec, message in cases.items():
        out = tmp_path / "out"
        res = _run("sample", "--model", str(tiny_model_dir), "--lora", spec, "--out", str(out), *FAST)
        assert res.exit_code == 1 and res.output.startswith("Error: ") and message in res.output, (spec, res.output)
        assert "Traceback" not in res.output and not any(out.glob("*.png"))


def test_adapter_configs_out_of_range_are_one_error_line(tiny_model_dir, adapters, tmp_path):
    """r/lora_alpha/patterns of adapter_config.json and meissonic-lora metadata: checked before sampling,
    one Error line naming the file and key (not a crash, not a silently truncated rank or a huge scale)."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = json.loads((adapters["peft"] / "adapter_config.json").read_text())
    tensors = load_file(str(adapters["meissonic-lora"]))
    zero = {k: v[:0] if "lora_A" in k else v[:, :0] for k, v in tensors.items()}
    cases = [({"r": float("nan")}, "LoRA rank r must be a whole number from 1 to 4096"),
             ({"r": float("inf")}, "LoRA rank r must be a whole number"),
             ({"r": 4.7}, "got 4.7"), ({"r": 0}, "got 0"), ({"r": 5000}, "from 1 to 4096"), ({"r": "4"}, "got '4'"),
             ({"lora_alpha": 1e30}, "LoRA alpha lora_alpha must be a finite number above 0 and at most 10000"),
             ({"lora_alpha": float("nan")}, "lora_alpha"),
             ({"rank_pattern": {"(": 4}}, "rank_pattern key '(' is not a valid regular expression"),
             ({"alpha_pattern": {"[": 4}}, "alpha_pattern key '[' is not a valid regular expression"),
             ({"rank_pattern": {"to_q": 0}}, "rank_pattern['to_q']"),
             ({"r": 8}, "has rank 4 in the weights but 8 in its config")]
    specs = []
    for i, (change, message) in enumerate(cases):
        folder = tmp_path / f"peft{i}"
        shutil.copytree(adapters["peft"], folder)
        (folder / "adapter_config.json").write_text(json.dumps({**base, **change}))
        specs.append((folder, str(folder / "adapter_config.json"), message))
    for name, data, meta, message in (("rank0", tensors, {"rank": "0", "alpha": "8"}, "metadata rank"),
                                      ("alpha-inf", tensors, {"rank": "4", "alpha": "inf"}, "metadata alpha"),
                                      ("rank-frac", tensors, {"rank": "4.5", "alpha": "8"}, "got 4.5"),
                                      ("zero-tensors", zero, {"rank": "4", "alpha": "8"}, "has rank 0; a LoRA rank")):
        file = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in data.items()}, str(file), metadata={"format": "meissonic-lora", **meta})
        specs.append((file, str(file), message))
    for spec, where, message in specs:
        out = tmp_path / "out"
        res = _run("sample", "--model", str(tiny_model_dir), "--lora", str(spec), "--out", str(out), *FAST)
        assert res.exit_code == 1 and res.output.startswith(f"Error: {where}") and message in res.output, (spec, res.output)
        assert res.output.count("\n") == 1 and "internal error" not in res.output and not out.exists(), res.output


def test_adapter_only_checkpoint_names_the_command_that_samples_it(tiny_model_dir, tmp_path):
    from meissonic_cli.model.lora import LoRA, save_lora

    base = MeissonicTransformer.from_pretrained(tiny_model_dir)
    lora = LoRA(base, rank=2)
    step = tmp_path / "run" / "step-00000003"  # what `train --lora-rank` writes without --save-merged
    save_lora(step / "lora", lora, model=base, base_model=str(tiny_model_dir))
    res = _run("sample", "--model", str(step), "--out", str(tmp_path / "out"), *FAST)
    hint = f"--model {tiny_model_dir} --lora {step / 'lora'}"
    assert res.exit_code == 1 and res.output.startswith("Error: ") and hint in " ".join(res.output.split()), res.output
    res = _run("sample", *hint.split(), "--out", str(tmp_path / "out"), *FAST)
    assert res.exit_code == 0, res.output
