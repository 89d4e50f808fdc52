"""VQ tokenizer: shapes, code range, round trips through the diffusers layout, PSNR."""

from __future__ import annotations

import json
import math

import pytest
import torch

from meissonic_cli.errors import InputError, ModelFormatError
from meissonic_cli.model.vq import images_to_tensor, psnr, tensor_to_images
from meissonic_cli.model.vq.vqgan import VQTokenizer, meissonic_vq_config


@pytest.fixture(scope="module")
def vq() -> VQTokenizer:
    return VQTokenizer.tiny(seed=0)


def test_encode_decode_shapes_and_range(vq):
    assert vq.downsample_factor == 16 and vq.codebook_size == 64
    images = torch.rand(2, 3, 32, 48)
    codes = vq.encode(images)
    assert codes.shape == (2, 2, 3) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < vq.codebook_size
    out = vq.decode(codes)
    assert out.shape == (2, 3, 32, 48) and out.min() >= 0 and out.max() <= 1
    # Decoding depends on the codes alone: the same codes decode to the same image in any batch.
    torch.testing.assert_close(vq.decode(codes[:1]), out[:1], atol=1e-5, rtol=1e-4)


def test_indices_are_nearest_codebook_entries(vq):
    """The codes are argmin distances between quant_conv latents and the codebook (independent check)."""
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        latents = vq.model.quant_conv(vq.model.encoder(images))  # (1, C, 2, 2)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        book = vq.model.quantize.embedding.weight
        expected = ((flat[:, None, :] - book[None]) ** 2).sum(-1).argmin(-1).reshape(1, 2, 2)
    assert torch.equal(vq.encode(images), expected)


def test_decode_uses_codebook_vectors(vq):
    # Seeded, and compared at a float32-rounding tolerance: the two paths order a few ops differently.
    codes = torch.randint(0, vq.codebook_size, (1, 2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quant = vq.model.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
        expected = vq.model.decoder(vq.model.post_quant_conv(quant)).clamp(0, 1)
    torch.testing.assert_close(vq.decode(codes), expected, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(vq, tmp_path):
    root = tmp_path / "model"
    vq.save_pretrained(root / "vqvae")
    cfg = json.loads((root / "vqvae" / "config.json").read_text())
    assert cfg["_class_name"] == "VQModel" and cfg["num_vq_embeddings"] == 64 and cfg["lookup_from_codebook"] is True
    images = torch.rand(2, 3, 32, 32)
    for folder in (root, root / "vqvae"):
        loaded = VQTokenizer.from_pretrained(folder)
        assert torch.equal(loaded.encode(images), vq.encode(images))
        codes = vq.encode(images)
        assert torch.equal(loaded.decode(codes), vq.decode(codes))
    # force_upcast keeps the released-style VQ in float32 even when half precision is asked for.
    assert VQTokenizer.from_pretrained(root, dtype=torch.bfloat16).dtype == torch.float32


def test_released_config_shape():
    cfg = meissonic_vq_config()
    assert 2 ** (len(cfg["block_out_channels"]) - 1) == 16 and cfg["num_vq_embeddings"] == 8192
    meta = VQTokenizer.from_config({**cfg, "block_out_channels": [32] * 5, "norm_num_groups": 8, "latent_channels": 8})
    assert meta.downsample_factor == 16 and meta.codebook_size == 8192 and meta.embed_dim == 8


def test_bad_inputs(vq, tmp_path):
    with pytest.raises(InputError, match="multiple of the VQ's downsample factor 16"):
        vq.encode(torch.rand(1, 3, 40, 32))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        vq.encode(torch.rand(3, 32, 32))
    with pytest.raises(InputError, match="code ids"):
        vq.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(ModelFormatError, match="not found"):
        VQTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "v").mkdir()
    with pytest.raises(ModelFormatError, match="config.json"):
        VQTokenizer.from_pretrained(tmp_path / "v")
    vq.save_pretrained(tmp_path / "v")
    (tmp_path / "v" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="diffusion_pytorch_model.safetensors"):
        VQTokenizer.from_pretrained(tmp_path / "v")


def test_psnr_and_pil_helpers():
    a = torch.rand(1, 3, 8, 8)
    assert psnr(a, a) == math.inf
    b = (a + 0.1).clamp(0, 1)
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / mse))
    assert psnr(a, b) > psnr(a, 1 - a)
    with pytest.raises(InputError):
        psnr(a, a[:, :, :4])
    images = tensor_to_images(a)
    back = images_to_tensor(images)
    assert back.shape == a.shape and (back - a).abs().max() <= 0.5 / 255 + 1e-6
