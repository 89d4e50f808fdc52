"""What a run trains and from what: its architecture, starting weights, the text encoder and base model it
borrows, and the module DDP/FSDP wrap."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meissonic_cli.errors import ConfigError
from meissonic_cli.model.lora import LoRA
from meissonic_cli.model.state_io import load_state_into
from meissonic_cli.model.transformer import (
    CONFIG_NAME,
    NAMED_CONFIGS,
    MeissonicTransformer,
    TransformerConfig,
    load_state_dict_files,
    transformer_folder,
)
from meissonic_cli.train.config import TrainConfig

COMPRESSION_PREFIXES = ("down_block.", "up_block.")
GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."


def resolve_model_config(cfg: TrainConfig) -> TransformerConfig:
    """The transformer architecture of a run: --arch (name or config.json) else --init's, then --feature-compression."""
    if cfg.model:
        if cfg.model in NAMED_CONFIGS:
            config = NAMED_CONFIGS[cfg.model]()
        elif Path(cfg.model).is_file():
            config = TransformerConfig.from_json(cfg.model)
        elif Path(cfg.model).is_dir():
            config = TransformerConfig.from_json(transformer_folder(cfg.model) / CONFIG_NAME)
        else:
            raise ConfigError(
                f"--arch {cfg.model!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) nor a transformer config.json"
            )
    else:
        config = TransformerConfig.from_json(transformer_folder(cfg.init) / CONFIG_NAME)
    if cfg.feature_compression != "auto":
        on = cfg.feature_compression == "on"
        config = dataclasses.replace(config, downsample=on, upsample=on)
    if getattr(cfg, "guidance_embeds", False):
        # A guidance-distillation student (train/distill.py): the teacher's architecture plus the guidance embedding.
        config = dataclasses.replace(config, guidance_embeds=True)
    return config.validate()


def resolve_init(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with --init as a local folder: a hub id becomes its snapshot in the local Hugging Face cache
    (downloaded only with --allow-download), so everything after reads one folder."""
    from meissonic_cli.model.hub import resolve_model_folder

    if not cfg.init:
        return cfg
    return dataclasses.replace(cfg, init=str(resolve_model_folder(cfg.init, cfg.allow_download, flag="--init")))


def load_init_weights(model: MeissonicTransformer, folder: str | Path, variant: str | None = None) -> list[str]:
    """Load released-layout weights (in `variant` when the folder holds it) into `model`; returns the
    compression keys that start fresh.

    The only keys allowed to be missing are the feature compression layers, and only when `model`
    has them and the source was built without them (paper stage 3: 512 -> 1024), and the guidance
    embedding when `model` has one and the source has not (a distillation student: it keeps its
    zero-output initialisation).
    """
    tdir = transformer_folder(folder)
    source_config = TransformerConfig.from_json(tdir / CONFIG_NAME)
    state = load_state_dict_files(tdir, variant)
    adds_compression = model.config.downsample and not source_config.downsample
    allow = tuple(f"{prefix}*" for prefix in COMPRESSION_PREFIXES) if adds_compression else ()
    if model.config.guidance_embeds and not source_config.guidance_embeds:
        allow += (f"{GUIDANCE_PREFIX}*",)
    load_state_into(model, state, f"--init weights in {tdir}", allow_missing=allow, what="the transformer config",
                    assign=False)
    return [k for k in model.state_dict() if k.startswith(COMPRESSION_PREFIXES) and k not in state] if adds_compression else []


class MaskedImageModel(nn.Module):
    """What DDP/FSDP wrap: the transformer, plus the text encoder when it is trained and the LoRA adapters."""

    def __init__(self, transformer: MeissonicTransformer, text_encoder: nn.Module | None = None, lora: LoRA | None = None):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.lora = lora

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, micro: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, text: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        if token_ids is not None:
            text, pooled = self.text_encoder(token_ids)
        if guidance is not None:  # a guidance-distillation student (train/distill.py)
            return self.transformer(tokens, text, pooled, timestep, img_ids, txt_ids, micro, guidance=guidance)
        return self.transformer(tokens, text, pooled, timestep, img_ids, txt_ids, micro)


def text_encoder_folder(cfg: TrainConfig, info: dict[str, Any]) -> Path | None:
    """--text-encoder, else the encoder tokenize used (dataset.json `info`), else --init's text_encoder/."""
    if cfg.text_encoder:
        return Path(cfg.text_encoder)
    candidates = []
    used = (info.get("models") or {}).get("text_encoder")
    if used:
        candidates += [Path(used), Path(used) / "text_encoder"]
    if cfg.init:
        root = Path(cfg.init)
        candidates += [root / "text_encoder", root.parent / "text_encoder"]
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def base_model_root(cfg: TrainConfig, info: dict[str, Any]) -> Path | None:
    """Where the parts a checkpoint does not train come from (see --base-model)."""
    if cfg.base_model:
        root = Path(cfg.base_model)
        if not (root / "vqvae" / "config.json").is_file():
            raise ConfigError(f"--base-model {root} has no vqvae/config.json; give a released-layout model folder")
        return root
    candidates = []
    if cfg.init:
        candidates += [Path(cfg.init), Path(cfg.init).parent]
    used = (info.get("models") or {}).get("vq")
    if used:
        candidates += [Path(used), Path(used).parent]
    return next((c for c in candidates if (c / "vqvae" / "config.json").is_file()), None)
