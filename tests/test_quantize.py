"""`--quantize`: torchao weight-only quantization of the transformer's block layers (`model.quantize`).

Tolerance: int8 moves the logits by at most 2% (relative L2 norm of the difference) on the tiny model
and on the conformance cases; measured 0.5-0.8% on the cases (see `model/quantize.py`).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from test_samplers import _cache_setup, _guided, _model, _sample
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import InputError
from meissonic_cli.model.quantize import check_quantize, quantize_transformer, quantized_bytes, quantized_layer
from meissonic_cli.sample.cache import FeatureCache
from meissonic_cli.sample.pipeline import masked_logits
from meissonic_cli.sample.samplers import SamplerOptions

pytestmark = pytest.mark.usefixtures("one_thread")
INT8_RTOL = 0.02


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    tokens = torch.randint(0, cfg.codebook_size, (2, 8, 8), generator=g)
    tokens[torch.rand(2, 8, 8, generator=g) < 0.5] = cfg.mask_token_id
    with torch.no_grad():
        return model(tokens, torch.randn(2, 77, cfg.joint_attention_dim, generator=g),
                     torch.randn(2, cfg.pooled_projection_dim, generator=g), torch.tensor([0.5, 0.7]),
                     micro_conds=torch.tensor([[128.0, 128.0, 0.0, 0.0, 6.0]] * 2))


def test_int8_quantizes_only_the_block_linears_and_stays_close_to_fp32() -> None:
    model = _model()
    reference = _logits(model)
    before = quantized_bytes(model)
    quantized = copy.deepcopy(model)
    n = quantize_transformer(quantized, "int8")
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    in_blocks = [name for name in linears if quantized_layer(name, model.get_submodule(name))]
    assert n == len(in_blocks) > 0 and len(in_blocks) < len(linears)
    for name in linears:
        weight = quantized.get_submodule(name).weight
        assert (type(weight) is not torch.nn.Parameter) == (name in in_blocks), name
    assert type(quantized.mlm_layer.conv2.weight) is torch.nn.Parameter  # the output head keeps the compute dtype
    assert quantized_bytes(quantized) < before
    assert _relative(_logits(quantized), reference) <= INT8_RTOL


def test_int8_on_the_conformance_cases_stays_within_tolerance(conformance_dir: Path) -> None:
    from safetensors.torch import load_file
    from test_model_conformance import _inputs, _released_folder

    from meissonic_cli.model.transformer import from_pretrained

    cases = json.loads((conformance_dir / "cases.json").read_text())["cases"]
    for name, case in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            model = from_pretrained(_released_folder(conformance_dir, dict(case, name=name), Path(tmp) / "m"))
        tensors = load_file(str(conformance_dir / case["file"]))
        quantize_transformer(model, "int8")
        with torch.no_grad():
            logits = model(**_inputs(tensors))
        assert _relative(logits, tensors["output.logits"]) <= INT8_RTOL, name


def test_the_feature_cache_runs_through_quantized_blocks() -> None:
    model, cond, tokens, positions = _cache_setup(True)
    quantize_transformer(model, "int8")
    t = torch.tensor([5])
    with torch.inference_mode():
        reference = masked_logits(model, tokens, t, cond, positions, 9.0)
        cache = FeatureCache(model, cond, refresh=4, mask_id=model.config.mask_token_id)
        full = _guided(model, cache.hidden(tokens, t, positions, 0))
        cached = _guided(model, cache.hidden(tokens, t, positions, 1))
    assert torch.allclose(full, reference, atol=1e-5, rtol=1e-5)
    assert torch.allclose(cached, reference, atol=1e-4, rtol=1e-4)
    codes = _sample(model, SamplerOptions(cache_refresh=2), steps=4)
    assert (codes != model.config.mask_token_id).all()


@pytest.mark.parametrize("mode, needs", [("fp8", "compute capability 8.9"), ("int4", "CUDA GPU"),
                                          ("int3", "unknown --quantize")])
def test_modes_the_cpu_cannot_run_say_what_they_need(mode: str, needs: str) -> None:
    with pytest.raises(InputError, match=needs):
        check_quantize(mode, "cpu", torch.float32)
    check_quantize("int8", "cpu", torch.bfloat16)
    check_quantize("none", "cpu", torch.float32)


def _sample_cli(*args: str):
    return CliRunner().invoke(app, ["sample", "--steps", "2", "--resolution", "32", "--device", "cpu", *args],
                              env={"COLUMNS": "200"})


def test_sample_records_the_mode_and_a_rerun_with_another_mode_is_not_done(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _sample_cli("--model", str(tiny_model_dir), "--prompt", "a red circle", "--out", str(out), "--quantize", "int8")
    assert res.exit_code == 0, res.output
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["quantize"] == "int8"
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _sample_cli("--model", str(tiny_model_dir), "--prompt", "a red circle", "--out", str(out))
    assert again.exit_code == 1 and "quantize 'int8' there, 'none' now" in again.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    same = _sample_cli("--model", str(tiny_model_dir), "--prompt", "a red circle", "--out", str(out), "--quantize", "int8")
    assert same.exit_code == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == files  # done: skipped


@pytest.mark.parametrize("mode", ["fp8", "int4"])
def test_sample_with_a_mode_the_cpu_cannot_run_is_one_error_and_writes_nothing(mode: str, tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _sample_cli("--model", str(tiny_model_dir), "--prompt", "a red circle", "--out", str(out), "--quantize", mode)
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and f"--quantize {mode} needs" in lines[0]
    assert not out.exists()


def test_weights_cast_as_they_are_read_equal_the_stored_ones_cast(tiny_model_dir: Path) -> None:
    from meissonic_cli.model.state_io import read_safetensors

    file = tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    stored = read_safetensors(file)
    for dtype in (torch.float32, torch.bfloat16):
        cast = read_safetensors(file, dtype=dtype)
        assert cast.keys() == stored.keys()
        assert all(torch.equal(cast[k], stored[k].to(dtype)) and cast[k].dtype == dtype for k in stored)
