"""The banded VQ decode (`model/vq/banded.py`) against the whole decode (diffusers' own VQModel.decode),
and the `--vq-decode auto|whole|banded` setting.

Tolerance: the banded decode computes the same function; only the GroupNorm statistics are summed in
another order (float64 over bands instead of PyTorch's float32 over the whole tensor), so outputs agree
to float rounding. Measured on these random VQs: max |difference| 5e-6..1.3e-5 for outputs of size ~5;
asserted: <= 1e-4 absolute, and at most 0.1% of the 8-bit pixel values moved, by at most one level.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import InputError
from meissonic_cli.model.vq.banded import banded_decode, largest_activation_bytes, supports_banded
from meissonic_cli.model.vq.vqgan import VQTokenizer, meissonic_vq_config, tiny_vq_config
from meissonic_cli.model.vq_decode import vq_decode_for

ATOL = 1e-4


def _to8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _whole_and_banded(vq: VQTokenizer, codes: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, w = codes.shape
    shape = (b, h, w, vq.embed_dim)
    with torch.no_grad():
        whole = vq.model.decode(codes, force_not_quantize=True, shape=shape).sample
        banded = banded_decode(vq.model, vq.model.quantize.get_codebook_entry(codes.reshape(-1), shape), **kw)
    return whole, banded


def _assert_close(whole: torch.Tensor, banded: torch.Tensor) -> None:
    assert banded.shape == whole.shape and banded.dtype == whole.dtype
    assert float((whole - banded).abs().max()) <= ATOL
    moved = (_to8(whole).int() - _to8(banded).int()).abs()
    assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= 1e-3


def _codes(vq: VQTokenizer, b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vq.codebook_size, (b, h, w), generator=torch.Generator().manual_seed(seed))


def test_tiny_vq_banded_equals_whole(one_thread):
    vq = VQTokenizer.tiny(seed=3)
    assert supports_banded(vq.model)
    codes = _codes(vq, 2, 3, 2)  # batch 2, non-square: 48x32 images, every image decoded on its own
    # band_bytes=1: 4-row bands everywhere; whole_bytes=0: every layer after the mid block banded.
    _assert_close(*_whole_and_banded(vq, codes, band_bytes=1, whole_bytes=0))


@pytest.fixture(scope="module")
def mid_vq() -> VQTokenizer:
    """Three levels of unequal widths (so the last block's first resnet has a 1x1 shortcut), two resnets per
    block plus one, 16 groups: the released layout at a testable size (f = 4)."""
    cfg = tiny_vq_config(codebook_size=64, levels=3, channels=32, latent_channels=8)
    cfg.update(block_out_channels=[32, 48, 64], layers_per_block=2, norm_num_groups=16)
    return VQTokenizer.from_config(cfg, seed=1)


@pytest.mark.parametrize("whole_bytes", [0, 40_000])
def test_mid_vq_banded_equals_whole_over_many_bands(mid_vq, one_thread, whole_bytes):
    """A 56x44 image (14x11 codes) in 4-row bands: 11-14 bands per level, two border bands each, halos
    that cross chunk edges; whole_bytes 40 kB switches from whole to banded in the middle of the decoder."""
    resnet = mid_vq.model.decoder.up_blocks[-1].resnets[0]
    assert resnet.conv_shortcut is not None
    whole, banded = _whole_and_banded(mid_vq, _codes(mid_vq, 1, 14, 11, seed=2), band_bytes=1, whole_bytes=whole_bytes)
    _assert_close(whole, banded)
    assert not torch.equal(whole, torch.zeros_like(whole))


def test_whole_decode_is_diffusers_decode_bit_for_bit(mid_vq):
    """--vq-decode whole (and auto at a size below the threshold) runs diffusers' VQModel.decode itself."""
    codes = _codes(mid_vq, 2, 4, 5)
    with torch.no_grad():
        ref = mid_vq.model.decode(codes, force_not_quantize=True, shape=(2, 4, 5, mid_vq.embed_dim)).sample
    assert torch.equal(mid_vq.decode_raw(codes, "whole"), ref)
    assert torch.equal(mid_vq.decode_raw(codes, "auto"), ref)
    assert torch.equal(mid_vq.decode(codes, "whole"), ref.float().clamp(0, 1))
    _assert_close(ref, mid_vq.decode_raw(codes, "banded"))


def test_auto_picks_banded_above_512x512_for_the_released_vq():
    with torch.device("meta"):
        released = VQTokenizer.from_config(meissonic_vq_config())
    # The whole decode's largest activation: 256 channels at full resolution, float32.
    assert largest_activation_bytes(released.model, 1024, 1024) == 256 * 1024 * 1024 * 4
    assert vq_decode_for(released, 1024, 1024, "auto") == "banded"
    assert vq_decode_for(released, 768, 768, "auto") == "banded"
    assert vq_decode_for(released, 512, 512, "auto") == "whole"
    assert vq_decode_for(released, 1024, 1024, "whole") == "whole"
    assert vq_decode_for(released, 256, 256, "banded") == "banded"
    with pytest.raises(InputError, match="unknown --vq-decode 'tiles'"):
        vq_decode_for(released, 256, 256, "tiles")


def test_banded_needs_the_released_layout():
    from meissonic_cli.model.vq.patch import PatchVQ

    patch = PatchVQ(torch.rand(4, 3, 2, 2))
    codes = torch.zeros(1, 2, 2, dtype=torch.long)
    assert patch.decode(codes, "auto").shape == (1, 3, 4, 4)
    with pytest.raises(InputError, match="--vq-decode banded needs the released VQ-GAN"):
        patch.decode(codes, "banded")
    spatial = tiny_vq_config(channels=32)
    spatial.update(norm_type="spatial")
    vq = VQTokenizer.from_config(spatial)
    assert not supports_banded(vq.model)
    assert vq_decode_for(vq, 4096, 4096, "auto") == "whole"  # auto never picks a decode the VQ lacks


def test_sample_cli_vq_decode_flag(tiny_model_dir, tmp_path, one_thread):
    runner = CliRunner()
    base = ["sample", "--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "1", "--device", "cpu",
            "--resolution", "64"]
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--vq-decode", "tiles"])
    assert bad.exit_code == 1 and not (tmp_path / "bad").exists()
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "--vq-decode" in lines[0], bad.output
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "source.png")
    edit = runner.invoke(app, ["edit", "--model", str(tiny_model_dir), "--image", str(tmp_path / "source.png"), "--prompt",
                               "a cat", "--box", "0,0,32,32", "--out", str(tmp_path / "edits"), "--vq-decode", "tiles"])
    assert edit.exit_code == 1 and not (tmp_path / "edits").exists()
    assert [line for line in edit.output.splitlines() if line.strip()] == [lines[0]]
    outs = {}
    for mode in ("whole", "banded"):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / mode), "--vq-decode", mode])
        assert result.exit_code == 0, result.output
        (side,) = (tmp_path / mode).glob("*.json")
        assert json.loads(side.read_text())["vq_decode"] == mode
        with Image.open(side.with_suffix(".png")) as im:
            outs[mode] = torch.from_numpy(np.array(im.convert("RGB"))).int()
    assert int((outs["whole"] - outs["banded"]).abs().max()) <= 1  # same tokens, the decodes agree to rounding


def test_decode_only_vq_reads_its_encoder_back(tiny_model_dir, tmp_path):
    """The pipeline loads the VQ without its encoder (sampling only decodes); the first encode reads it back."""
    from meissonic_cli.model.vq import load_vq

    full = load_vq(tiny_model_dir / "vqvae")
    lean = load_vq(tiny_model_dir / "vqvae", decode_only=True)
    assert lean.model.encoder is None and lean.model.quant_conv is None
    assert sum(p.numel() for p in lean.parameters()) < sum(p.numel() for p in full.parameters())
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    codes = full.encode(images)
    assert torch.equal(lean.decode(codes), full.decode(codes))
    assert torch.equal(lean.encode(images), codes) and lean.model.encoder is not None
    again = load_vq(tiny_model_dir / "vqvae", decode_only=True)
    again.save_pretrained(tmp_path / "vq")  # saves the whole VQ, encoder included
    assert torch.equal(load_vq(tmp_path / "vq").encode(images), codes)
