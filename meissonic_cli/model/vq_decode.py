"""`--vq-decode auto|whole|banded`: how the VQ turns code grids into pixels.

- `whole` (default): the decoder over the whole image at once, as diffusers and the official pipeline
  run it (bit for bit theirs). The released VQ in float32 holds ~4 GiB of activations at 1024x1024.
- `banded`: `model/vq/banded.py`, the decoder's high-resolution layers in row bands with the GroupNorm
  statistics of the whole image: the same function up to float rounding (a few 8-bit pixel values move
  by one), with a quarter of the whole decode's memory at 1024x1024 or less, and about 1.6x slower on a CPU.
- `auto`: `banded` when one activation of the whole decode of one image would pass
  `AUTO_BANDED_BYTES` (the released VQ: images over 512x512 pixels, e.g. 1024x1024), else `whole`.

The default is `whole`: the toolkit's images stay the official pipeline's, bit for bit, unless a user
asks for the low-memory decode (`banded` or `auto`).

Sidecars record the decode an image got (`whole` or `banded`), so a rerun with another one redoes it.
This module is torch-free at import: the CLI reads the constants.
"""

from __future__ import annotations

from typing import Any

from meissonic_cli.errors import InputError

VQ_DECODE_MODES = ("auto", "whole", "banded")
AUTO_BANDED_BYTES = 256 * 2**20
VQ_DECODE_HELP = ("How the VQ decodes tokens to pixels: whole (default: the whole image at once, as the official "
                  "pipeline, bit for bit theirs), banded (the decoder's high-resolution layers in row bands with the "
                  "whole image's norm statistics: the same image up to float rounding, a quarter of the "
                  "memory or less at 1024x1024, slower) or auto (banded for images over 512x512 pixels, else whole). "
                  "The sidecars record which one ran.")


def check_vq_decode(mode: str) -> str:
    if mode not in VQ_DECODE_MODES:
        raise InputError(f"unknown --vq-decode {mode!r}; use one of {', '.join(VQ_DECODE_MODES)}")
    return mode


def vq_decode_for(vq: Any, height: int, width: int, mode: str = "whole") -> str:
    """The decode (`whole` or `banded`) that `vq` runs for one `height x width` image under `mode`;
    InputError when `banded` is asked of a VQ without a banded decode."""
    check_vq_decode(mode)
    if mode == "whole":
        return "whole"
    model = getattr(vq, "model", None)
    from meissonic_cli.model.vq.banded import largest_activation_bytes, supports_banded

    supported = model is not None and type(model).__name__ == "VQModel" and supports_banded(model)
    if mode == "banded":
        if not supported:
            raise InputError(f"--vq-decode banded needs the released VQ-GAN's decoder layout; this model's VQ "
                             f"({type(vq).__name__}) has another: use --vq-decode whole or auto")
        return "banded"
    big = supported and largest_activation_bytes(model, height, width) > AUTO_BANDED_BYTES
    return "banded" if big else "whole"


__all__ = ["AUTO_BANDED_BYTES", "VQ_DECODE_HELP", "VQ_DECODE_MODES", "check_vq_decode", "vq_decode_for"]
