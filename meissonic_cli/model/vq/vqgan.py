"""The VQ image tokenizer: images <-> grids of codebook indices, through diffusers' `VQModel`.

Meissonic uses the aMUSEd VQ-GAN (the released `vqvae/` folder): five encoder levels
(`block_out_channels` [128, 256, 256, 512, 768], so a downsample factor f = 16), 64 latent channels
and 8192 codes. Its `config.json` has `lookup_from_codebook: true` (decoding starts from indices)
and `force_upcast: true` (run it in float32 even when the rest of the model is half precision).

Pixel range: this VQ works on images in [0, 1], not [-1, 1]. The official training data pipeline
feeds `ToTensor()` output without normalising, and the official pipeline decodes with
`VaeImageProcessor(do_normalize=False)` and clips the output to [0, 1]; we do the same.

- `encode(images)`: encoder -> quant_conv -> nearest codebook entry; returns int64 `(B, H/f, W/f)`.
- `decode(codes)`: codebook lookup -> post_quant_conv -> decoder; returns float `(B, 3, H, W)` in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from meissonic_cli.config import read_json_object
from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.vq.base import VQ_CONFIG, CodeGrid
from meissonic_cli.model.vq.config_check import check_vq_config

VQ_WEIGHTS = "diffusion_pytorch_model.safetensors"
VQ_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def meissonic_vq_config() -> dict[str, Any]:
    """The released Meissonic (= aMUSEd) `vqvae/config.json` fields."""
    return {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 512, 768],
        "down_block_types": ["DownEncoderBlock2D"] * 5,
        "up_block_types": ["UpDecoderBlock2D"] * 5,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 64,
        "layers_per_block": 2,
        "lookup_from_codebook": True,
        "mid_block_add_attention": False,
        "norm_num_groups": 32,
        "norm_type": "group",
        "num_vq_embeddings": 8192,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "vq_embed_dim": None,
        "force_upcast": True,
    }


def tiny_vq_config(codebook_size: int = 64, levels: int = 5, channels: int = 16, latent_channels: int = 8) -> dict[str, Any]:
    """A tiny VQ in the released layout for tests: `levels` encoder levels give f = 2**(levels-1)."""
    cfg = meissonic_vq_config()
    cfg.update(
        block_out_channels=[channels] * levels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(8, channels),
        num_vq_embeddings=codebook_size,
    )
    return cfg


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """The key policy of `state_io.check_keys` for diffusers' loader: every weight the VQ expects must be
    in the folder's files, no other key may be there, and shapes must match."""
    problems = []
    for name, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "shape-mismatched")):
        keys = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get(name) or ())
        if keys:
            problems.append(f"{len(keys)} {what} key(s) (e.g. {', '.join(keys[:4])})")
    errors = [str(e).splitlines()[0] for e in info.get("error_msgs") or () if str(e).strip()]
    if errors:
        problems.append(errors[0])
    if problems:
        raise ModelFormatError(f"weights in {folder} do not match the VQ model its {VQ_CONFIG} describes: {'; '.join(problems)}")


class VQTokenizer(CodeGrid, nn.Module):
    """Images in [0, 1] <-> VQ code grids, wrapping a diffusers `VQModel`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.downsample_factor: int = 2 ** (len(cfg.block_out_channels) - 1)
        self.codebook_size: int = int(cfg.num_vq_embeddings)
        self.embed_dim: int = int(cfg.vq_embed_dim or cfg.latent_channels)
        self.force_upcast: bool = bool(getattr(cfg, "force_upcast", False))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model.config)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices int64 `(B, H/f, W/f)` for float images `(B, 3, H, W)` in [0, 1]."""
        h, w = self._grid_of_images(images)
        self._restore_encoder()
        x = images.to(device=self.device, dtype=self.dtype)
        latents = self.model.encode(x).latents
        indices = self.model.quantize(latents)[2][2]
        return indices.reshape(images.shape[0], h, w).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, mode: str = "whole") -> torch.Tensor:
        """Float images `(B, 3, h*f, w*f)` in [0, 1] for code grids `(B, h, w)`; `mode` is `--vq-decode`
        (auto|whole|banded, see `model.vq_decode`)."""
        return self.decode_raw(codes, mode).float().clamp(0, 1)

    @torch.no_grad()
    def decode_raw(self, codes: torch.Tensor, mode: str = "whole") -> torch.Tensor:
        """The decoder's output `(B, 3, h*f, w*f)` before the clamp to [0, 1]."""
        from meissonic_cli.device import trim_host_memory
        from meissonic_cli.model.vq_decode import vq_decode_for

        self._check_codes(codes)
        trim_host_memory()  # what the sampler freed leaves the process before the decode's activations come
        b, h, w = codes.shape
        f = self.downsample_factor
        codes = codes.to(self.device).long()
        shape = (b, h, w, self.embed_dim)
        if vq_decode_for(self, h * f, w * f, mode) == "banded":
            from meissonic_cli.model.vq.banded import banded_decode

            return banded_decode(self.model, self.model.quantize.get_codebook_entry(codes.reshape(-1), shape))
        if self.model.config.lookup_from_codebook:
            return self.model.decode(codes, force_not_quantize=True, shape=shape).sample
        quant = self.model.quantize.get_codebook_entry(codes.reshape(-1), shape)
        return self.model.decode(quant, force_not_quantize=True).sample

    # ----- builders and loaders

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0) -> "VQTokenizer":
        """A randomly initialised VQ with the given `VQModel` config fields."""
        from diffusers import VQModel

        fields = {k: v for k, v in config.items() if not k.startswith("_")}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VQModel(**fields)
        return cls(model.eval())

    @classmethod
    def tiny(cls, seed: int = 0, codebook_size: int = 64, levels: int = 5, channels: int = 16,
             latent_channels: int = 8) -> "VQTokenizer":
        """A tiny random VQ for tests (default f = 16, 64 codes)."""
        return cls.from_config(tiny_vq_config(codebook_size, levels, channels, latent_channels), seed=seed)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None,
                        variant: str | None = None) -> "VQTokenizer":
        """Load a diffusers `VQModel` folder, or a model root holding `vqvae/`, from local files only.

        `dtype` None keeps float32; a half dtype is ignored when the config asks for `force_upcast`.
        `variant` (fp16/bf16) reads `diffusion_pytorch_model.fp16.safetensors` when the folder holds it;
        a folder holding only one variant's weights loads them (`state_io.pick_variant`).
        """
        from meissonic_cli.model.state_io import has_weights, pick_variant

        folder = Path(folder)
        if (folder / "vqvae").is_dir():
            folder = folder / "vqvae"
        if not folder.is_dir():
            raise ModelFormatError(f"VQ folder not found: {folder}")
        config_path = folder / VQ_CONFIG
        config = read_json_object(config_path, f"{folder}: expected {VQ_CONFIG} (a diffusers VQModel config)")
        if config.get("_class_name", "VQModel") != "VQModel":
            raise ModelFormatError(f"{config_path}: _class_name is {config.get('_class_name')!r}, expected 'VQModel'")
        if not has_weights(folder, VQ_WEIGHTS, VQ_WEIGHTS_INDEX):
            raise ModelFormatError(f"{folder}: expected {VQ_WEIGHTS} (or {VQ_WEIGHTS_INDEX} with its shards)")
        chosen = pick_variant(folder, VQ_WEIGHTS, VQ_WEIGHTS_INDEX, variant)
        from diffusers import VQModel
        from diffusers.utils import logging as diffusers_logging

        check_vq_config(config, config_path)
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its "weights not initialized" warning becomes our Error below
        try:
            model, info = VQModel.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False,
                                                  variant=chosen, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, TypeError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            detail = next((line for line in lines if "size mismatch" in line), lines[0])
            raise ModelFormatError(f"{folder}: cannot load the VQ model ({detail})") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        _check_loading_info(folder, info)
        vq = cls(model.eval())
        if dtype is not None and not (vq.force_upcast and dtype in (torch.float16, torch.bfloat16)):
            vq = vq.to(dtype)
        return vq

    def drop_encoder(self, folder: str | Path, variant: str | None = None) -> None:
        """Free the encoder half (`encoder`, `quant_conv`: 0.22 GiB of the released VQ in float32) until
        `encode` needs it again, when it is read back from `folder`: sampling only decodes."""
        self._encoder_source = (Path(folder), variant)
        self.model.encoder = None
        self.model.quant_conv = None

    def _restore_encoder(self) -> None:
        if self.model.encoder is not None:
            return
        folder, variant = self._encoder_source
        full = type(self).from_pretrained(folder, dtype=self.dtype, variant=variant).model
        self.model.encoder = full.encoder.to(self.device)
        self.model.quant_conv = full.quant_conv.to(self.device)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` + `diffusion_pytorch_model.safetensors` (the diffusers VQModel layout)."""
        self._restore_encoder()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder), safe_serialization=True)


__all__ = ["VQTokenizer", "meissonic_vq_config", "tiny_vq_config"]
