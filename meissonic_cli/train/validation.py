"""Validation during training: a grid of images sampled from --validation-prompt with the current weights.

Sampling runs on fresh copies of the weights (the EMA weights when --ema-decay is set, LoRA merged),
so the training modules, hooks and wrappers are left untouched. The parts a checkpoint does not
train (scheduler, VQ, frozen text encoder) are loaded once from the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from meissonic_cli.atomic import atomic_write


class ValidationSampler:
    """Samples the validation prompts into `<output>/samples/step-NNNNNNNN.png` (rank 0 only)."""

    def __init__(self, cfg: Any, *, base_root: Path, device: torch.device, text_encoder_folder: Path | None,
                 frozen_text_encoder: nn.Module | None):
        self.cfg = cfg
        self.base_root = base_root
        self.device = device
        self.text_encoder_folder = text_encoder_folder
        self.frozen_text_encoder = frozen_text_encoder
        self._parts: tuple[Any, Any, Any] | None = None

    def parts(self) -> tuple[Any, Any, Any]:
        """Scheduler, VQ and frozen text encoder (None when the text encoder is trained), loaded once."""
        if self._parts is None:
            from meissonic_cli.model.scheduler import MaskGITScheduler
            from meissonic_cli.model.text_encoder import TextEncoder
            from meissonic_cli.model.vq import load_vq

            root = self.base_root
            scheduler = MaskGITScheduler.from_config_dir(root / "scheduler")
            vq = load_vq(root / "vqvae", dtype=torch.float32).to(self.device).eval()
            text = None
            if not self.cfg.train_text_encoder:
                if self.frozen_text_encoder is not None:
                    text = self.frozen_text_encoder
                else:
                    text = TextEncoder.from_pretrained(self.text_encoder_folder or root / "text_encoder").to(self.device).eval()
            self._parts = (scheduler, vq, text)
        return self._parts

    @torch.no_grad()
    def write_grid(self, path: Path, transformer: nn.Module, trained_text_encoder: nn.Module | None = None) -> Path:
        """Sample every validation prompt with `transformer` and write them as one captioned grid at `path`."""
        from meissonic_cli.sample.pipeline import MeissonicPipeline
        from meissonic_cli.sample.sample import make_grid

        cfg = self.cfg
        scheduler, vq, frozen_text = self.parts()
        text_encoder = trained_text_encoder.to(self.device).eval() if trained_text_encoder is not None else frozen_text
        pipe = MeissonicPipeline(transformer=transformer.to(self.device).eval(), scheduler=scheduler,
                                 text_encoder=text_encoder, vq=vq)
        images = pipe(list(cfg.validation_prompts), steps=cfg.validation_steps, guidance_scale=cfg.validation_cfg,
                      height=cfg.resolution, width=cfg.resolution, seed=cfg.seed)
        grid = make_grid(images, list(cfg.validation_prompts))
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        return path
