"""Checks of a diffusers `VQModel` `config.json` before anything is built.

diffusers builds whatever the config says: a zero group count or codebook divides by zero, an empty
`block_out_channels` indexes past its end, a negative `layers_per_block` builds a model that silently
drops the file's weights, and a huge codebook allocates gigabytes before failing. `check_vq_config`
refuses each of these with one `ModelFormatError` naming the file and the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from meissonic_cli.config import number_problem
from meissonic_cli.errors import ModelFormatError

MAX_LEVELS = 12  # downsample factor 2**11; the released VQ has 5 levels
MAX_CHANNELS = 65536
MAX_LAYERS_PER_BLOCK = 64
MAX_CODES = 1 << 20  # the released VQ has 8192 codes


def _int(config: dict[str, Any], key: str, where: Path, low: int, high: int, default: Any = None) -> int:
    """`config[key]` (or `default`) when a whole number in [low, high]: `config.number_problem`, the check of
    every number setting, else ModelFormatError naming the file and the key."""
    value = config.get(key, default)
    problem = number_problem(value, f"{where}: {key}", "int", (low, high))
    if problem:
        raise ModelFormatError(problem)
    return value


def _estimated_parameters(channels: list[int], layers: int, latent: int, embed: int, codes: int,
                          in_channels: int, out_channels: int) -> int:
    """A rough count (the 3x3 convolutions dominate) so a config that describes an absurd model is
    refused before diffusers allocates it."""
    convs = sum(9 * c * c * (2 * (2 * layers + 1) + 2) for c in channels)  # resnets + down/up samplers
    convs += 4 * 2 * 9 * channels[-1] ** 2  # the encoder's and the decoder's mid blocks
    return convs + 9 * channels[0] * (in_channels + out_channels) + 9 * channels[-1] * latent * 2 + codes * embed


def check_vq_config(config: dict[str, Any], where: str | Path) -> None:
    """Raise one ModelFormatError (naming `where` and the key) for a VQModel config that cannot build a
    working model: types, positive sizes, channels divisible by the group count, and a parameter bound."""
    where = Path(where)
    channels = config.get("block_out_channels", [64])
    if not isinstance(channels, list) or not channels or len(channels) > MAX_LEVELS:
        raise ModelFormatError(f"{where}: block_out_channels must be a list of 1 to {MAX_LEVELS} whole numbers, got {channels!r}")
    for c in channels:
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_CHANNELS:
            raise ModelFormatError(f"{where}: block_out_channels must hold whole numbers in [1, {MAX_CHANNELS:,}], got {channels!r}")
    for key in ("down_block_types", "up_block_types"):
        types = config.get(key)
        if types is None:
            continue
        if not isinstance(types, list) or len(types) != len(channels) or not all(isinstance(t, str) for t in types):
            raise ModelFormatError(f"{where}: {key} must be a list of {len(channels)} block names "
                                   f"(one per block_out_channels entry), got {types!r}")
    layers = _int(config, "layers_per_block", where, 1, MAX_LAYERS_PER_BLOCK, 1)
    in_channels = _int(config, "in_channels", where, 1, 64, 3)
    out_channels = _int(config, "out_channels", where, 1, 64, 3)
    latent = _int(config, "latent_channels", where, 1, MAX_CHANNELS, 3)
    codes = _int(config, "num_vq_embeddings", where, 1, MAX_CODES, 256)
    _int(config, "sample_size", where, 1, 1 << 20, 32)
    embed = latent
    if config.get("vq_embed_dim") is not None:
        embed = _int(config, "vq_embed_dim", where, 1, MAX_CHANNELS)
    norm_type = config.get("norm_type", "group")
    if norm_type not in ("group", "spatial"):
        raise ModelFormatError(f"{where}: norm_type must be 'group' or 'spatial', got {norm_type!r}")
    groups = _int(config, "norm_num_groups", where, 1, MAX_CHANNELS, 32)
    bad = [c for c in channels if c % groups]
    if bad:
        raise ModelFormatError(f"{where}: block_out_channels {channels} must each be divisible by norm_num_groups ({groups})")
    if not isinstance(config.get("act_fn", "silu"), str):
        raise ModelFormatError(f"{where}: act_fn must be an activation name, got {config.get('act_fn')!r}")
    scaling = config.get("scaling_factor", 0.18215)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ModelFormatError(f"{where}: scaling_factor must be a finite number, got {scaling!r}")
    for key in ("lookup_from_codebook", "force_upcast", "mid_block_add_attention"):
        if key in config and not isinstance(config[key], bool):
            raise ModelFormatError(f"{where}: {key} must be true or false, got {config[key]!r}")
    from meissonic_cli.safety import check_parameter_count

    check_parameter_count(_estimated_parameters(channels, layers, latent, embed, codes, in_channels, out_channels),
                          f"{where} (VQ config)")


__all__ = ["check_vq_config"]
