"""What every VQ image tokenizer shares: the code-grid checks and the image <-> tensor helpers.

Both tokenizer kinds (`vqgan.VQTokenizer`, the released aMUSEd VQ-GAN through diffusers, and
`patch.PatchVQ`, the demo's patch codebook) build on `CodeGrid`; `meissonic_cli.model.vq.load_vq`
picks the kind from the folder's `config.json` `_class_name`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from meissonic_cli.errors import InputError

VQ_CONFIG = "config.json"


class CodeGrid:
    """What every VQ kind (`VQTokenizer`, `patch.PatchVQ`) checks about the images it encodes and
    the code grids it decodes; the class sets `downsample_factor` and `codebook_size`."""

    downsample_factor: int
    codebook_size: int

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Code grid `(h, w)` for an image of `height x width` pixels; both must be multiples of f."""
        f = self.downsample_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise InputError(f"image size {width}x{height} is not a positive multiple of the VQ's downsample factor {f}")
        return height // f, width // f

    def _grid_of_images(self, images: torch.Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.grid_size(images.shape[2], images.shape[3])

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 3:
            raise InputError(f"expected code grids of shape (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise InputError(f"code ids must lie in [0, {self.codebook_size}); got {int(codes.min())}..{int(codes.max())}")


def psnr(a: torch.Tensor, b: torch.Tensor, max_value: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two image batches of the same shape (inf when equal)."""
    if a.shape != b.shape:
        raise InputError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(max_value ** 2 / mse)


def images_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """Stack PIL images (all the same size) into a float `(B, 3, H, W)` tensor in [0, 1]."""
    import numpy as np

    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float().div_(255.0)


def tensor_to_images(batch: torch.Tensor) -> list[Any]:
    """Float `(B, 3, H, W)` in [0, 1] -> list of PIL RGB images."""
    from PIL import Image

    arr = (batch.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
