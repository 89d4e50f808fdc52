"""`meissonic info` through the CLI runner."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.model.transformer import MeissonicTransformer, meissonic_tiny, num_parameters


def _error_text(res) -> str:
    return res.output + (str(res.exception) if res.exception else "")


def test_info_released_config_prints_the_parameter_count() -> None:
    res = CliRunner().invoke(app, ["info", "--arch", "1b"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, _error_text(res)
    assert "1,006,946,304" in res.output and "single_transformer_blocks" in res.output and "440,724,480" in res.output
    assert "8255" in res.output  # derived mask token id


def test_info_on_a_model_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MeissonicTransformer(meissonic_tiny())
    root = tmp_path / "model"
    model.save_pretrained(root / "transformer")
    (root / "scheduler").mkdir()
    runner = CliRunner()
    res = runner.invoke(app, ["info", "--model", str(root)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, _error_text(res)
    assert f"{num_parameters(model):,}" in res.output
    assert "keys and shapes match" in res.output and "F32" in res.output
    lines = {line.split("│")[1].strip(): line for line in res.output.splitlines() if line.count("│") >= 3}
    assert "yes" in lines["scheduler/"] and "no" in lines["vqvae/"] and "yes" in lines["transformer/"]

    res = runner.invoke(app, ["info", "--model", str(root / "transformer")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "a transformer folder on its own" in res.output


def test_info_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["info", "--model", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "model folder not found" in _error_text(res)
    res = runner.invoke(app, ["info", "--arch", "7b"])
    assert res.exit_code == 1 and "1b, tiny" in _error_text(res)
    res = runner.invoke(app, ["info", "--arch", "1b", "--model", str(tmp_path)])
    assert res.exit_code == 1 and "exactly one" in _error_text(res)

    tdir = MeissonicTransformer(meissonic_tiny()).save_pretrained(tmp_path / "m" / "transformer")
    state = load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
    state.pop("mlm_layer.conv2.weight")
    save_file(state, str(tdir / "diffusion_pytorch_model.safetensors"))
    res = runner.invoke(app, ["info", "--model", str(tmp_path / "m")])
    assert res.exit_code == 1 and "mlm_layer.conv2.weight" in _error_text(res)
    config = json.loads((tdir / "config.json").read_text())
    (tdir / "config.json").write_text(json.dumps(dict(config, extra_field=1)))
    res = runner.invoke(app, ["info", "--model", str(tmp_path / "m")])
    assert res.exit_code == 1 and "extra_field" in _error_text(res)
