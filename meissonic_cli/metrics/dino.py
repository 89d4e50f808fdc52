"""DINO image similarity for edits (the paper's Table 7 "DINO" column), from a local checkpoint.

The EMU-Edit and MagicBrush evaluations compare an edited image with its source by the cosine of
the CLS features of a self-supervised DINO ViT-S/16: resize the short side to 256 (bicubic),
centre-crop 224, ImageNet normalisation. The network is timm's `VisionTransformer`, whose
parameter names are those of the facebookresearch/dino checkpoints (`dino_deitsmall16_pretrain.pth`)
and of timm's `vit_small_patch16_224.dino` weights, so either file loads as it is. A full DINO
training checkpoint (`checkpoint.pth`: teacher, student, optimizer, args) loads its teacher backbone,
without unpickling anything but tensors, containers and `argparse.Namespace`; `module.` and
`backbone.` prefixes are stripped as DINO's `load_pretrained_weights` does.

The architecture is a name from `DINO_ARCHS` or a JSON file of `VisionTransformer` keyword
arguments (tests use a tiny one).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from meissonic_cli.config import read_json_object
from meissonic_cli.errors import ModelFormatError
from meissonic_cli.metrics.clip import adopt_state, load_state_file

# The released DINO ViTs; all use qkv bias, MLP ratio 4 and LayerNorm eps 1e-6 (timm's defaults).
DINO_ARCHS: dict[str, dict[str, Any]] = {
    "vits16": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "vits8": {"patch_size": 8, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "vitb16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
    "vitb8": {"patch_size": 8, "embed_dim": 768, "depth": 12, "num_heads": 12},
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_arch(arch: str) -> dict[str, Any]:
    """`VisionTransformer` keyword arguments for a `DINO_ARCHS` name or a JSON file of them."""
    if arch in DINO_ARCHS:
        return {"img_size": 224, **DINO_ARCHS[arch]}
    path = Path(arch)
    if path.suffix == ".json" and path.is_file():
        return {"img_size": 224, **read_json_object(path)}
    raise ModelFormatError(f"unknown DINO architecture {arch!r}; choose one of {', '.join(DINO_ARCHS)} "
                           f"or give a JSON file of timm VisionTransformer arguments")


def _dino_backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Full DINO training checkpoints nest the ViT under teacher/student "backbone." with a DINO head beside it.
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


@dataclass
class DinoModel:
    """A DINO ViT with its evaluation preprocessing; `features` are L2-normalised CLS vectors."""

    model: torch.nn.Module
    preprocess: Any
    device: torch.device

    @torch.no_grad()
    def features(self, images: Sequence[Any]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model(batch).float(), dim=-1)


def load_dino(arch: str, checkpoint: str | Path, device: str | torch.device = "cpu") -> DinoModel:
    """Build the DINO ViT `arch` and load the local `checkpoint` (a dino .pth or timm .safetensors)."""
    from timm.models.vision_transformer import VisionTransformer
    from torchvision import transforms

    kwargs = dino_arch(arch)
    try:
        with torch.device("meta"):
            net = VisionTransformer(num_classes=0, **kwargs)
    except TypeError as err:
        raise ModelFormatError(f"{arch}: not a VisionTransformer configuration ({err})") from None
    path = Path(checkpoint)
    # A full DINO training checkpoint ({teacher, student, optimizer, epoch, args: argparse.Namespace, ...})
    # gives its teacher, as DINO's own loader does (checkpoint_key="teacher"); Namespace is the one
    # non-container class it holds, so it is the one the weights-only unpickler may build.
    state = _dino_backbone_state(load_state_file(path, wrappers=("teacher", "state_dict", "model"),
                                                 safe_globals=(argparse.Namespace,)))
    adopt_state(net, state, str(path), f"DINO {arch}")
    dev = torch.device(device)
    net = net.float().eval().to(dev)
    size = kwargs["img_size"] if isinstance(kwargs["img_size"], int) else kwargs["img_size"][0]
    preprocess = transforms.Compose([
        # 256/224 of the crop, as in the DINO evaluations (short side 256 for a 224 crop).
        transforms.Resize(round(size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return DinoModel(model=net, preprocess=preprocess, device=dev)


__all__ = ["DINO_ARCHS", "DinoModel", "dino_arch", "load_dino"]
