"""HPS v2 / v2.1 as the `hpsv2` package scores: its preprocessing, its tokens, its formula.

Score: 100 x cos(image, prompt) of the open_clip ViT-H-14 with the HPS checkpoint (no logit scale),
as `hpsv2.evaluation` reports the benchmark (`hpsv2.score` returns the bare cosine). v2.0 and v2.1
are the same network with other weights (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`).

Preprocessing is hpsv2's evaluation transform (`image_transform(..., resize_longest_max=True)`),
not open_clip's shortest-side resize and centre crop: the RGB image as a [0, 1] tensor, its longest
side resized to 224 (torchvision tensor resize, bicubic, antialiased), padded with 0 (black) to a
square, the padding split as evenly as possible (the extra pixel right/bottom), then CLIP
normalisation. hpsv2 skips resize and padding when the longest side is already 224 (a non-square
image then cannot enter its ViT); here such an image is padded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from meissonic_cli.metrics.clip import ClipModel, load_clip
from meissonic_cli.metrics.weights import check_hps_name

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class HPSPreprocess:
    """PIL image -> (3, size, size) normalised tensor, the way hpsv2's evaluation transform makes it."""

    size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __call__(self, image: Any) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        x = TF.to_tensor(image.convert("RGB"))
        height, width = x.shape[1:]
        scale = self.size / float(max(height, width))
        if scale != 1.0 or height != width:
            new = (round(height * scale), round(width * scale))
            if scale != 1.0:
                x = TF.resize(x, list(new), InterpolationMode.BICUBIC, antialias=True)
            pad_h, pad_w = self.size - new[0], self.size - new[1]
            x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(x, list(self.mean), list(self.std))


def load_hps(model: str, checkpoint: str | Path, version: str, device: str | torch.device = "cpu") -> ClipModel:
    """The HPS v`version` scorer: open_clip `model` with the local checkpoint and hpsv2's preprocessing."""
    path = Path(checkpoint)
    check_hps_name(path, version)
    clip = load_clip(model, path, device, f"HPS v{version}")
    size = clip.model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return dataclasses.replace(clip, preprocess=HPSPreprocess(size))


__all__ = ["HPSPreprocess", "load_hps"]
