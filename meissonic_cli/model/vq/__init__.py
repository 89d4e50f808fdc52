"""VQ image tokenizers: images <-> grids of codebook indices.

- `base`: `CodeGrid` (the checks every kind shares), `images_to_tensor`, `tensor_to_images`, `psnr`.
- `vqgan`: `VQTokenizer`, the released aMUSEd VQ-GAN through diffusers' `VQModel`.
- `patch`: `PatchVQ`, a fixed patch codebook (the demo's tokenizer; fit with `fit_patch_vq`).

`load_vq(folder)` picks the kind from the folder's `config.json` `_class_name`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from meissonic_cli.model.vq.base import VQ_CONFIG, CodeGrid, images_to_tensor, psnr, tensor_to_images

if TYPE_CHECKING:
    import torch
    from torch import nn


def load_vq(folder: str | Path, dtype: "torch.dtype | None" = None, variant: str | None = None,
            decode_only: bool = False) -> "nn.Module":
    """Load a VQ folder (or a model root holding `vqvae/`) of either kind: a diffusers `VQModel` gives a
    `VQTokenizer`, a `"_class_name": "PatchVQ"` config a `patch.PatchVQ`; both share the interface.
    `variant` (fp16/bf16) picks a diffusers VQ's variant weights when the folder holds them.
    `decode_only`: a VQTokenizer's encoder is freed until the first `encode` reads it back (`drop_encoder`)."""
    folder = Path(folder)
    if (folder / "vqvae").is_dir():
        folder = folder / "vqvae"
    try:
        class_name = json.loads((folder / VQ_CONFIG).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        class_name = None  # VQTokenizer.from_pretrained names what is wrong with the folder
    if class_name == "PatchVQ":
        from meissonic_cli.model.vq.patch import PatchVQ

        return PatchVQ.from_pretrained(folder, dtype=dtype)
    from meissonic_cli.model.vq.vqgan import VQTokenizer

    vq = VQTokenizer.from_pretrained(folder, dtype=dtype, variant=variant)
    if decode_only:
        vq.drop_encoder(folder, variant)
    return vq


__all__ = ["CodeGrid", "images_to_tensor", "load_vq", "psnr", "tensor_to_images"]
