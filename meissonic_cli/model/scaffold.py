"""Model folders in the released Meissonic layout, with random weights, for tests and the demo.

    <root>/
      model_index.json        which class each part is (as in the released checkpoint)
      transformer/            config.json + diffusion_pytorch_model.safetensors (`model.save_pretrained`)
      vqvae/                  diffusers VQModel: config.json + diffusion_pytorch_model.safetensors
      text_encoder/           Hugging Face CLIPTextModelWithProjection: config.json + model.safetensors
      tokenizer/              Hugging Face CLIPTokenizer files: vocab.json, merges.txt,
                              special_tokens_map.json, tokenizer_config.json (model_max_length 77)
      scheduler/              scheduler_config.json: {"_class_name": "Scheduler", "mask_token_id", "masking_schedule"}

The tokenizer folder holds the real CLIP BPE (open_clip ships it), written the way the Hugging Face
tokenizer stores it, so the folder loads in both worlds; our loader reads its pad token and length
and checks that the merges are CLIP's.

The parts must fit together: the text width is the transformer's `joint_attention_dim`, the
pooled text size is its `pooled_projection_dim` (= its hidden width), and the VQ's codebook fits
in the transformer's `codebook_size`. `build_model_folder` checks this before writing anything.
The folder is built in a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from meissonic_cli.atomic import atomic_directory
from meissonic_cli.errors import ConfigError, OutputExistsError
from meissonic_cli.model.scheduler import MaskGITScheduler, SchedulerConfig
from meissonic_cli.model.text_encoder import ClipTokenizer, TextEncoder, TextEncoderConfig, tiny_text_config
from meissonic_cli.model.transformer import MeissonicTransformer, TransformerConfig, meissonic_tiny
from meissonic_cli.model.vq.vqgan import VQTokenizer, tiny_vq_config

MODEL_INDEX = {
    "_class_name": "Pipeline",
    "_diffusers_version": "0.30.2",
    "scheduler": ["scheduler", "Scheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "transformer": ["transformer", "Transformer2DModel"],
    "vqvae": ["diffusers", "VQModel"],
}


def check_compatible(transformer: TransformerConfig, text: TextEncoderConfig, vq: dict[str, Any]) -> None:
    """Raise ConfigError naming every way the three parts' shapes disagree."""
    problems = []
    if transformer.joint_attention_dim != text.width:
        problems.append(f"transformer joint_attention_dim {transformer.joint_attention_dim} != text encoder width {text.width}")
    if transformer.pooled_projection_dim != text.embed_dim:
        problems.append(f"transformer pooled_projection_dim {transformer.pooled_projection_dim} != text encoder "
                        f"projection_dim {text.embed_dim}")
    codes = int(vq.get("num_vq_embeddings", 0))
    if codes > transformer.codebook_size:
        problems.append(f"VQ num_vq_embeddings {codes} > transformer codebook_size {transformer.codebook_size}")
    if problems:
        raise ConfigError(problems)


def build_model_folder(out_dir: str | Path, transformer_config: TransformerConfig, text_config: TextEncoderConfig,
                       vq_config: dict[str, Any], seed: int = 0, overwrite: bool = False,
                       masking_schedule: str = "cosine") -> Path:
    """Write a released-layout model folder with random weights (seeded) and return its path."""
    out = Path(out_dir)
    transformer_config.validate()
    text_config.validate()
    check_compatible(transformer_config, text_config, vq_config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    with atomic_directory(out) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            MeissonicTransformer(transformer_config).save_pretrained(tmp / "transformer")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            text = TextEncoder(text_config)
        text.save_pretrained(tmp / "text_encoder")
        ClipTokenizer(text_config.context_length).save_pretrained(tmp / "tokenizer")
        VQTokenizer.from_config(vq_config, seed=seed + 2).save_pretrained(tmp / "vqvae")
        scheduler = MaskGITScheduler(SchedulerConfig(mask_token_id=transformer_config.mask_token_id,
                                                     masking_schedule=masking_schedule))
        scheduler.save_config(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return out


def tiny_configs() -> tuple[TransformerConfig, TextEncoderConfig, dict[str, Any]]:
    """Matching tiny configs: transformer width 32 (64 codes), text width 32, VQ f=16 with 64 codes."""
    transformer = meissonic_tiny()
    text = tiny_text_config(embed_dim=transformer.pooled_projection_dim)
    vq = tiny_vq_config(codebook_size=transformer.codebook_size)
    return transformer, text, vq


def build_tiny_model_folder(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny released-layout model folder (all parts random, seconds to build) for tests and the demo."""
    transformer, text, vq = tiny_configs()
    return build_model_folder(out_dir, transformer, text, vq, seed=seed, overwrite=overwrite)


__all__ = ["MODEL_INDEX", "build_model_folder", "build_tiny_model_folder", "check_compatible", "tiny_configs"]
