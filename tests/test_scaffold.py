"""Tiny released-layout model folders: every part loads back and the parts fit together."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from meissonic_cli.errors import ConfigError, OutputExistsError
from meissonic_cli.model.scaffold import build_model_folder, build_tiny_model_folder, tiny_configs
from meissonic_cli.model.scheduler import MaskGITScheduler
from meissonic_cli.model.text_encoder import ClipTokenizer, TextEncoder
from meissonic_cli.model.transformer import MeissonicTransformer
from meissonic_cli.model.vq.vqgan import VQTokenizer


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("scaffold") / "tiny", seed=0)


def test_layout_and_parts_load(tiny_root):
    assert sorted(p.name for p in tiny_root.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vqvae"]
    index = json.loads((tiny_root / "model_index.json").read_text())
    assert index["vqvae"] == ["diffusers", "VQModel"] and index["text_encoder"][1] == "CLIPTextModelWithProjection"

    transformer = MeissonicTransformer.from_pretrained(tiny_root)
    text = TextEncoder.from_pretrained(tiny_root).eval()
    vq = VQTokenizer.from_pretrained(tiny_root)
    scheduler = MaskGITScheduler.from_config_dir(tiny_root)
    tokenizer = ClipTokenizer.from_pretrained(tiny_root / "tokenizer")
    cfg = transformer.config
    assert scheduler.config.mask_token_id == cfg.vocab_size - 1
    assert tokenizer.context_length == 77 and tokenizer.pad_id == 0
    assert vq.codebook_size <= cfg.codebook_size and vq.downsample_factor == 16

    # The parts compose: image -> codes, prompt -> features, both into the transformer.
    codes = vq.encode(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        seq, pooled = text.encode(["a red circle"])
        logits = transformer(codes, seq, pooled, torch.tensor([0.5]),
                             micro_conds=torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]]))
    assert seq.shape == (1, 77, cfg.joint_attention_dim) and pooled.shape == (1, cfg.pooled_projection_dim)
    assert logits.shape == (1, cfg.codebook_size, 4, 4) and torch.isfinite(logits).all()
    assert vq.decode(logits.argmax(1).clamp(max=vq.codebook_size - 1)).shape == (1, 3, 64, 64)


def test_seeded_and_refuses_to_clobber(tiny_root, tmp_path):
    again = build_tiny_model_folder(tmp_path / "again", seed=0)
    other = build_tiny_model_folder(tmp_path / "other", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (tiny_root / name).read_bytes()
    assert (other / name).read_bytes() != (tiny_root / name).read_bytes()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        build_tiny_model_folder(tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    build_tiny_model_folder(tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "vqvae").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_mismatched_parts_rejected(tmp_path):
    transformer, text, vq = tiny_configs()
    bad_text = dataclasses.replace(text, width=64, heads=2)
    bad_vq = {**vq, "num_vq_embeddings": transformer.codebook_size + 1}
    with pytest.raises(ConfigError) as err:
        build_model_folder(tmp_path / "x", transformer, bad_text, bad_vq)
    assert "joint_attention_dim 32 != text encoder width 64" in str(err.value)
    assert "num_vq_embeddings 65 > transformer codebook_size 64" in str(err.value)
    assert not (tmp_path / "x").exists()
