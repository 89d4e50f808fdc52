"""The Meissonic masked image transformer, in plain PyTorch.

What this module implements (paper sections 2.2-2.3; numerics of the official `Transformer2DModel`):
- `TransformerConfig`: the fields of the released `transformer/config.json`; builders `meissonic_1b()`,
  `meissonic_tiny()`.
- Token embedding (vocab = codebook + spare ids + mask id) -> RMSNorm -> 1x1 conv, then the optional
  2x2 strided-conv compression ("Comp.") before the blocks and the transposed-conv decompression
  ("Decomp.") after them.
- Conditioning: pooled text embedding + sinusoids of the five micro-conditions (`cond_embed`), plus
  the masking-rate ("timestep") sinusoid, summed into one vector `temb` that modulates every block.
  With `guidance_embeds` (a guidance-distilled student, `meissonic distill`) the guidance scale g adds
  `time_text_embed.guidance_embedder(sinusoid(g*1000))` to it, as diffusers'
  `CombinedTimestepGuidanceTextProjEmbeddings` does (FLUX-dev); its last layer starts at zero.
- N multi-modal blocks (joint text+image attention with separate weights per stream, AdaLN-Zero
  modulation, per-head QK RMSNorm), then 2N single-modal blocks (parallel attention + MLP).
- 3-axis rotary position embedding over (0, row, col) ids; text ids are zero.
- MLM head: 1x1 conv -> RMSNorm -> 1x1 conv to codebook logits.
- `from_pretrained` / `save_pretrained` in the released `transformer/` layout (single file or
  sharded index), with strict key matching.
- A fast inference path for sampling: `prepare_conditioning` hoists everything that does not change
  across sampling steps, and `forward_cached(..., positions=...)` runs the 8192-way head only where
  logits are still needed.
- `BlockCache`: the sampler's feature cache (`sample/cache.py`) as an optional argument of every
  block's forward, as litgpt passes its KV cache into attention: one block forward for every path.

The state_dict keys are those of the released checkpoint, so module names follow it (`norm1.linear`,
`attn.to_out.0`, `ff.net.0.proj`, ...). Float32 numerics equal the official model's on the
conformance vectors (../shared/conformance) to within 1e-4 given the same timestep sinusoid
(see `timestep_sinusoid` for the one torch-version dependence).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from meissonic_cli.atomic import atomic_write, write_json
from meissonic_cli.config import field, read_json_object
from meissonic_cli.errors import ConfigError, InputError, ModelFormatError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CLASS_NAME = "Transformer2DModel"
# Written into config.json for tools that read it; nothing here depends on diffusers.
DIFFUSERS_VERSION = "0.31.0"

# Five micro-conditions (orig width, orig height, crop top, crop left, score), 256 channels each.
MICRO_COND_DIM = 256
NUM_MICRO_CONDS = 5
TIME_PROJ_DIM = 256
EPS = 1e-6
ROPE_THETA = 10000.0
FP16_MAX = 65504.0


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class TransformerConfig:
    """Hyper-parameters of the transformer; exactly the fields of the released `config.json`."""

    patch_size: int = field(1, help="Patch size inherited from Flux; the model embeds one token per position, so it must be 1.")
    in_channels: int = field(64, help="Unused by the architecture (kept because config.json carries it); the token embedding width is the hidden width.")
    num_layers: int = field(14, help="Number of multi-modal (joint text+image) blocks.")
    num_single_layers: int = field(28, help="Number of single-modal blocks after the multi-modal ones (the paper uses twice num_layers).")
    attention_head_dim: int = field(128, help="Width of one attention head.")
    num_attention_heads: int = field(8, help="Number of attention heads; hidden width = heads x head dim.")
    joint_attention_dim: int = field(1024, help="Width of the text-encoder hidden states fed as the text sequence.")
    pooled_projection_dim: int = field(1024, help="Width of the pooled text embedding; must equal the hidden width (as in the official model).")
    guidance_embeds: bool = field(
        False, help="Guidance embedding (as FLUX-dev): the guidance scale is an input added to the timestep embedding, so one "
        "forward gives guided logits. Off in the released model; on in a `meissonic distill` student.")
    axes_dims_rope: tuple[int, int, int] = field((16, 56, 56), help="Rotary channels per id axis (0, row, col); must sum to the head dim.")
    vocab_size: int = field(8256, help="Token embedding rows: the codebook, spare ids and, last, the mask token.")
    codebook_size: int = field(8192, help="Number of VQ codes, i.e. the number of output logits per position.")
    downsample: bool = field(True, help="2x2 strided-conv compression of the token grid before the blocks (on in the 1024px model).")
    upsample: bool = field(True, help="Transposed-conv decompression after the blocks; must match downsample.")

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)  # type: ignore[assignment]

    @property
    def inner_dim(self) -> int:
        """Hidden width D = heads x head dim."""
        return self.num_attention_heads * self.attention_head_dim

    def estimated_parameters(self) -> int:
        """The parameter count from the config alone (within a few percent at full size), so a config
        claiming an absurd model is refused before anything is allocated: per joint block 36 D^2,
        per single block 15 D^2, plus the token embedding, logits, text projection and compression."""
        d = self.inner_dim
        blocks = 36 * d * d * self.num_layers + 15 * d * d * self.num_single_layers
        return blocks + (self.vocab_size + self.codebook_size + self.joint_attention_dim + 4 * d) * d

    @property
    def mask_token_id(self) -> int:
        """The id of the mask token: the last embedding row."""
        return self.vocab_size - 1

    def validate(self) -> "TransformerConfig":
        problems = []
        if self.patch_size != 1:
            problems.append(f"patch_size must be 1, got {self.patch_size}")
        if self.pooled_projection_dim != self.inner_dim:
            problems.append(
                f"pooled_projection_dim ({self.pooled_projection_dim}) must equal num_attention_heads*attention_head_dim "
                f"({self.inner_dim}): the official model feeds the hidden-width condition through a layer sized by it"
            )
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(f"axes_dims_rope {list(self.axes_dims_rope)} must be 3 values summing to attention_head_dim ({self.attention_head_dim})")
        if any(a % 2 for a in self.axes_dims_rope):
            problems.append(f"axes_dims_rope {list(self.axes_dims_rope)} must all be even")
        if any(a < 0 for a in self.axes_dims_rope):
            problems.append(f"axes_dims_rope {list(self.axes_dims_rope)} must all be >= 0")
        if self.vocab_size <= self.codebook_size:
            problems.append(f"vocab_size ({self.vocab_size}) must exceed codebook_size ({self.codebook_size}) to hold the mask token")
        if self.downsample != self.upsample:
            problems.append("downsample and upsample must both be true or both false")
        for name in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "codebook_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not problems:
            from meissonic_cli.safety import check_parameter_count

            check_parameter_count(self.estimated_parameters(), "transformer config")
        if problems:
            raise ConfigError(problems)
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """The config.json content, in the released layout."""
        out: dict[str, Any] = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TransformerConfig":
        """Build from a config.json dict; `_`-prefixed keys are metadata and ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if not k.startswith("_") and k not in names)
        if unknown:
            raise ModelFormatError(
                f"{source}: unknown transformer config field(s) {', '.join(unknown)}; expected the fields of a Meissonic "
                f"Transformer2DModel config: {', '.join(sorted(names))}"
            )
        # These three change nothing in the architecture, so the class defaults may stand in.
        optional = {"patch_size", "in_channels", "guidance_embeds"}
        missing = sorted(n for n in names if n not in values and n not in optional)
        if missing:
            raise ModelFormatError(f"{source}: missing transformer config field(s) {', '.join(missing)}")
        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        wrong = [f"{k}={v!r}" for k, v in values.items() if k in names and (
            (kinds[k] == "int" and (not isinstance(v, int) or isinstance(v, bool))) or (kinds[k] == "bool" and not isinstance(v, bool))
            or (kinds[k].startswith("tuple") and not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v))))]
        if wrong:
            raise ModelFormatError(f"{source}: transformer config field(s) of the wrong type: {', '.join(wrong)} "
                                   "(sizes are whole numbers, flags true/false, axes_dims_rope a list of whole numbers)")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}).validate()

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "TransformerConfig":
        values = read_json_object(path, f"transformer config not found: expected {path}")
        return cls.from_dict(values, source=str(path))


def meissonic_1b() -> TransformerConfig:
    """The released Meissonic 1024px configuration (1,006,946,304 parameters)."""
    return TransformerConfig(
        patch_size=1, in_channels=64, num_layers=14, num_single_layers=28, attention_head_dim=128,
        num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=1024, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56), vocab_size=8256, codebook_size=8192, downsample=True, upsample=True,
    ).validate()


def meissonic_tiny(**overrides: Any) -> TransformerConfig:
    """A test-sized configuration (width 32, 1+2 blocks, 64 codes); keyword overrides replace fields."""
    cfg = TransformerConfig(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4), vocab_size=65, codebook_size=64, downsample=True, upsample=True,
    )
    return dataclasses.replace(cfg, **overrides).validate()


NAMED_CONFIGS = {"1b": meissonic_1b, "tiny": meissonic_tiny}


# ----------------------------------------------------------------------------------------------
# Numerical building blocks


def timestep_sinusoid(x: torch.Tensor, dim: int = TIME_PROJ_DIM) -> torch.Tensor:
    """`[cos(x*f), sin(x*f)]` with f_k = exp(-ln(1e4)*k/(dim/2)), in float32.

    The operation order is that of torch/diffusers: training timesteps reach 1e6, where one ulp in a
    frequency moves the output by up to 0.06, so only this exact float32 recipe reproduces the model.
    It still inherits torch's float32 `exp`: torch 2.14 rounds 5 of the 128 frequencies one ulp away
    from torch 2.13 (which made the conformance vectors), moving training-scale logits by ~5e-3.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device)
    freqs = torch.exp(exponent / half)
    args = x.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """RMSNorm over the last dim; the statistics are taken in float32 as in the official model."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _channel_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the channels of an NCHW map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=EPS)


def image_ids(grid_h: int, grid_w: int, config: TransformerConfig, device: Any = None) -> torch.Tensor:
    """Rotary ids `(0, row, col)` for a `grid_h x grid_w` token grid, row-major, float32.

    With compression the blocks see the 2x smaller grid, so the ids cover that grid; without it they
    cover the full grid. (The official callers choose between the two with a `height == 1024` test,
    which breaks a compressing model at any other resolution.)
    """
    h, w = (grid_h // 2, grid_w // 2) if config.downsample else (grid_h, grid_w)
    rows = torch.arange(h, dtype=torch.float32, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32, device=device)[None, :].expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)


def rope_tables(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (S, head_dim), float32, for ids (S, n_axes).

    Frequencies and angles are computed in float64 and then rounded, as the official FluxPosEmbed
    does on CPU/CUDA; each channel pair shares one angle (repeat-interleaved).
    """
    pos = ids.float().to(torch.float64)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device)[: dim // 2] / dim))
        angles = torch.outer(pos[:, axis], freqs)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=-1).float(), torch.cat(sin_parts, dim=-1).float()


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with even channels negated, so rotation is `x*cos + swap_pairs(x)*signed_sin`."""
    sign = torch.ones(sin.shape[-1], dtype=sin.dtype, device=sin.device)
    sign[0::2] = -1
    return sin * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, heads, S, hd) by the precomputed tables (S, hd).

    out[2j] = x[2j]*cos - x[2j+1]*sin, out[2j+1] = x[2j+1]*cos + x[2j]*sin, computed in float32. Folding
    the sign into the table gives bit-identical results to the official stack-and-negate form.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x.float() * cos + swapped.float() * signed_sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The feature cache's per-block state


class BlockCache:
    """Keys/values of one block's attention kept across sampling steps (the sampler's feature cache).

    With `index` None a block given this cache runs its full forward and records the keys/values
    (after QK-norm and the rotary embedding) of every position of the [text, image] sequence. With
    `index` set, the rows the block is given are those positions of the sequence only (image rows; a
    double block then gets c=None and does not run the text stream): their fresh keys/values overwrite
    the record there and their queries attend to the whole record.
    """

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.index: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record (full pass) or write in (cached pass) `k`, `v`; return what attention should use."""
        if self.index is None:
            self.keys, self.values = k, v
            return k, v
        if self.keys is None or self.values is None:
            raise InputError("a cached block step needs a full forward first (BlockCache has no record)")
        self.keys[:, :, self.index] = k
        self.values[:, :, self.index] = v
        return self.keys, self.values


# ----------------------------------------------------------------------------------------------
# Modules (names mirror the released checkpoint keys)


class _TwoLayerMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (the diffusers TimestepEmbedding / text projection layout)."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = _TwoLayerMLP(TIME_PROJ_DIM, dim)
        self.text_embedder = _TwoLayerMLP(pooled_dim, dim)
        if guidance:
            # diffusers' guidance_embedder (a TimestepEmbedding over sinusoid(g*1000)). Built last so the other
            # layers draw the same initial weights as without it; its output layer starts at zero, so a
            # student initialised from a teacher starts as the teacher's conditional model.
            self.guidance_embedder = _TwoLayerMLP(TIME_PROJ_DIM, dim)
            nn.init.zeros_(self.guidance_embedder.linear_2.weight)
            nn.init.zeros_(self.guidance_embedder.linear_2.bias)


class _Modulation(nn.Module):
    """AdaLN-Zero parameters: `linear(SiLU(temb))` split into n chunks of width D."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(c[:, None, :] for c in self.linear(F.silu(temb)).chunk(self.n, dim=1))


class _GeluProj(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    """Linear(D->4D), GELU(tanh), Linear(4D->D); net.1 is the (parameter-free) dropout slot."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _Attention(nn.Module):
    """QK-RMSNorm attention; with `joint=True` it also holds the text-stream projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        if joint:
            self.add_q_proj = nn.Linear(dim, dim)
            self.add_k_proj = nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
            self.norm_added_q = RMSNorm(head_dim)
            self.norm_added_k = RMSNorm(head_dim)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
            self.to_add_out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _qkv(self, x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, nq: RMSNorm, nk: RMSNorm):
        return nq(self._split(q(x))), nk(self._split(k(x))), self._split(v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               cache: Optional[BlockCache] = None) -> torch.Tensor:
        cos, signed_sin = rope
        q, k = apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin)
        if cache is not None:
            k, v = cache.update(k, v)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.heads * self.head_dim).to(q.dtype)

    def forward_single(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       cache: Optional[BlockCache] = None) -> torch.Tensor:
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        return self.attend(q, k, v, rope, cache)

    def forward_joint(self, x: torch.Tensor, c: Optional[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
                      cache: Optional[BlockCache] = None):
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if c is None:  # a cached step: the text's keys/values are in the cache
            return self.to_out[0](self.attend(q, k, v, rope, cache)), None
        cq, ck, cv = self._qkv(c, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)
        # Text first: the rotary tables are laid out as [text ids, image ids].
        out = self.attend(torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2), rope, cache)
        t = c.shape[1]
        return self.to_out[0](out[:, t:]), self.to_add_out(out[:, :t])


class DoubleStreamBlock(nn.Module):
    """Multi-modal block: each stream has its own weights; attention runs over text+image jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = _Modulation(dim, 6)
        self.norm1_context = _Modulation(dim, 6)
        self.attn = _Attention(dim, heads, head_dim, joint=True)
        self.ff = _FeedForward(dim)
        self.ff_context = _FeedForward(dim)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor], temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], cache: Optional[BlockCache] = None):
        """(c, x) after the block. With a `cache` in its cached mode (see `BlockCache`), c is None,
        x holds only the rows at `cache.index` and `rope` their tables; it returns (None, x)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(temb)
        if c is None:
            if cache is None or cache.index is None:
                raise InputError("a double block without the text stream (c=None) needs a BlockCache with an index")
            attn_x, _ = self.attn.forward_joint(_layer_norm(x) * (1 + scale1) + shift1, None, rope, cache)
            x = x + gate1 * attn_x
            return None, x + gate2 * self.ff(_layer_norm(x) * (1 + scale2) + shift2)
        cshift1, cscale1, cgate1, cshift2, cscale2, cgate2 = self.norm1_context(temb)
        attn_x, attn_c = self.attn.forward_joint(
            _layer_norm(x) * (1 + scale1) + shift1, _layer_norm(c) * (1 + cscale1) + cshift1, rope, cache
        )
        x = x + gate1 * attn_x
        x = x + gate2 * self.ff(_layer_norm(x) * (1 + scale2) + shift2)
        c = c + cgate1 * attn_c
        c = c + cgate2 * self.ff_context(_layer_norm(c) * (1 + cscale2) + cshift2)
        if c.dtype == torch.float16:
            c = c.clip(-FP16_MAX, FP16_MAX)
        return c, x


class SingleStreamBlock(nn.Module):
    """Single-modal block over cat([text, image]): attention and MLP in parallel, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = _Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(5 * dim, dim)
        self.attn = _Attention(dim, heads, head_dim, joint=False)

    def forward(self, z: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: Optional[BlockCache] = None) -> torch.Tensor:
        """z after the block; with a `cache` in its cached mode z holds only the rows at `cache.index`."""
        shift, scale, gate = self.norm(temb)
        m = _layer_norm(z) * (1 + scale) + shift
        mlp = F.gelu(self.proj_mlp(m), approximate="tanh")
        z = z + gate * self.proj_out(torch.cat([self.attn.forward_single(m, rope, cache), mlp], dim=2))
        if z.dtype == torch.float16:
            z = z.clip(-FP16_MAX, FP16_MAX)
        return z


class _TokenEmbed(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, dim)
        self.layer_norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(ids)).permute(0, 3, 1, 2))


class _Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _channel_rms_norm(self.norm, x)
        # The official layer pads right/bottom by one; a k=2 s=2 conv reads the pad only on odd grids.
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = nn.ConvTranspose2d(dim, dim, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_channel_rms_norm(self.norm, x))


class _DownBlock(nn.Module):
    def __init__(self, dim: int, enabled: bool):
        super().__init__()
        self.downsample = _Downsample(dim) if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)


class _UpBlock(nn.Module):
    def __init__(self, dim: int, enabled: bool):
        super().__init__()
        self.upsample = _Upsample(dim) if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.upsample is None else self.upsample(x)


class _MlmHead(nn.Module):
    """1x1 conv -> channel RMSNorm -> 1x1 conv to codebook logits."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.layer_norm = RMSNorm(dim)
        self.conv2 = nn.Conv2d(dim, codebook_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(_channel_rms_norm(self.layer_norm, self.conv1(x)))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The same head on channels-last vectors (..., D) -> (..., K): 1x1 convs are linear layers."""
        return self.logits_tokens(self.hidden_tokens(x))

    def hidden_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The head up to its last layer, on channels-last vectors (..., D) -> (..., D)."""
        return self.layer_norm(F.linear(x, self.conv1.weight.flatten(1)))

    def logits_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """The head's last layer (linear, no bias) on `hidden_tokens` output: (..., D) -> (..., K)."""
        return F.linear(h, self.conv2.weight.flatten(1))


@dataclasses.dataclass
class Conditioning:
    """Step-invariant inputs of the blocks for one batch of prompts (see `prepare_conditioning`)."""

    context: torch.Tensor  # (B, T, D) text after context_embedder + RMSNorm
    pooled_temb: torch.Tensor  # (B, D) the pooled/micro-condition part of temb, PMLP(cond_embed(...))
    rope_cos: torch.Tensor  # (T + h*w, head_dim) float32
    rope_sin: torch.Tensor  # (T + h*w, head_dim) float32
    grid_hw: tuple[int, int]  # token grid (H, W) the tables were built for
    rope_signed_sin: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.rope_signed_sin is None:
            self.rope_signed_sin = _signed_sin(self.rope_sin)

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos, self.rope_signed_sin


class MeissonicTransformer(nn.Module):
    """The Meissonic transformer; state_dict keys and shapes equal the released checkpoint's."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.gradient_checkpointing = False
        self.time_text_embed = _TimeTextEmbed(d, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, d)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(d, heads, hd) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(d, heads, hd) for _ in range(config.num_single_layers)])
        self.embed = _TokenEmbed(config.vocab_size, d)
        self.mlm_layer = _MlmHead(d, config.codebook_size)
        self.cond_embed = _TwoLayerMLP(config.pooled_projection_dim + NUM_MICRO_CONDS * MICRO_COND_DIM, d, bias=False)
        self.encoder_proj_layer_norm = RMSNorm(d)
        self.project_to_hidden_norm = RMSNorm(d)
        self.project_to_hidden = nn.Linear(d, d, bias=False)
        self.project_from_hidden_norm = RMSNorm(d)
        self.project_from_hidden = nn.Linear(d, d, bias=False)
        self.down_block = _DownBlock(d, config.downsample)
        self.up_block = _UpBlock(d, config.upsample)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.context_embedder.weight.device

    def compressed_grid(self, grid_h: int, grid_w: int) -> tuple[int, int]:
        """The grid the blocks see for a (grid_h, grid_w) token grid."""
        return (grid_h // 2, grid_w // 2) if self.config.downsample else (grid_h, grid_w)

    def time_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        """TMLP(sinusoid(timestep*1000)), (B or 1, D).

        Like the official forward, the timestep is multiplied by 1000 (training passes mask_prob*1000,
        the sampler passes the step index). The product is always taken in float32, the precision the
        model was trained with; the official half-precision path rounds it to half first.
        """
        t = torch.as_tensor(timestep, device=self.device)
        if t.dim() == 0:
            t = t.view(1)
        proj = timestep_sinusoid(t.to(torch.float32) * 1000)
        return self.time_text_embed.timestep_embedder(proj.to(self.dtype))

    def guidance_embedding(self, guidance: Any, batch: int) -> torch.Tensor:
        """guidance_embedder(sinusoid(g*1000)), (B or 1, D), for a guidance-embedded model (`guidance_embeds`).

        `guidance` is the guidance scale g: a number, or a (B,) or (1,) tensor. As the timestep, it is
        multiplied by 1000 in float32 before the sinusoid (diffusers' FLUX convention).
        """
        if not self.config.guidance_embeds:
            raise InputError("this transformer has no guidance embedding (guidance_embeds is false): pass guidance=None "
                             "and run classifier-free guidance with two forwards")
        g = torch.as_tensor(guidance, dtype=torch.float32, device=self.device)
        if g.dim() == 0:
            g = g.view(1)
        if g.dim() != 1 or g.shape[0] not in (1, batch):
            raise InputError(f"guidance must be one number or ({batch},) scales, got shape {tuple(g.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise InputError("guidance scales must be finite")
        proj = timestep_sinusoid(g * 1000)
        return self.time_text_embed.guidance_embedder(proj.to(self.dtype))

    # -- conditioning (step-invariant) --------------------------------------------------------

    def prepare_conditioning(
        self,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        micro_conds: torch.Tensor,
        grid_hw: tuple[int, int],
        img_ids: Optional[torch.Tensor] = None,
        txt_ids: Optional[torch.Tensor] = None,
        guidance: Any = None,
    ) -> Conditioning:
        """Everything of a forward pass that does not depend on the tokens or the timestep.

        grid_hw is the token grid (H, W). img_ids/txt_ids default to `image_ids(H, W, config)` and
        zeros; explicit ids follow the official convention ((N, 3), or (B, N, 3) of which [0] is used).
        `guidance` (a guidance-embedded model only, where it is required): the guidance scale, one
        number or one per row; its embedding is step-invariant, so it is held in `pooled_temb`.
        """
        cfg = self.config
        grid_h, grid_w = int(grid_hw[0]), int(grid_hw[1])
        if cfg.downsample and (grid_h % 2 or grid_w % 2):
            raise InputError(f"token grid {grid_h}x{grid_w} must have even sides for a model with downsample (2x2 compression)")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
            raise InputError(
                f"encoder_hidden_states must be (B, T, {cfg.joint_attention_dim}), got {tuple(encoder_hidden_states.shape)}"
            )
        b, t = encoder_hidden_states.shape[:2]
        if tuple(pooled_projections.shape) != (b, cfg.pooled_projection_dim):
            raise InputError(f"pooled_projections must be ({b}, {cfg.pooled_projection_dim}), got {tuple(pooled_projections.shape)}")
        if tuple(micro_conds.shape) != (b, NUM_MICRO_CONDS):
            raise InputError(
                f"micro_conds must be ({b}, 5) = [orig_width, orig_height, crop_top, crop_left, score], got {tuple(micro_conds.shape)}"
            )
        device, dtype = self.device, self.dtype
        context = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states.to(device, dtype)))
        micro = timestep_sinusoid(micro_conds.to(device).flatten(), MICRO_COND_DIM).reshape(b, -1)
        cond = self.cond_embed(torch.cat([pooled_projections.to(device, dtype), micro.to(dtype)], dim=1))
        pooled_temb = self.time_text_embed.text_embedder(cond)
        if cfg.guidance_embeds or guidance is not None:
            if guidance is None:
                raise InputError("this transformer is guidance-distilled (guidance_embeds): give the guidance scale "
                                 "(guidance=...), e.g. the --guidance-scale a sampler uses")
            pooled_temb = pooled_temb + self.guidance_embedding(guidance, b)

        h, w = self.compressed_grid(grid_h, grid_w)
        if img_ids is None:
            img_ids = image_ids(grid_h, grid_w, cfg, device=device)
        elif img_ids.dim() == 3:
            img_ids = img_ids[0]
        if txt_ids is None:
            txt_ids = torch.zeros(t, 3, device=device)
        elif txt_ids.dim() == 3:
            txt_ids = txt_ids[0]
        if img_ids.shape != (h * w, 3):
            raise InputError(
                f"img_ids must be ({h * w}, 3) for a {grid_h}x{grid_w} token grid (the blocks see {h}x{w}), got "
                f"{tuple(img_ids.shape)}; build them with meissonic_cli.model.transformer.image_ids(H, W, config)"
            )
        if txt_ids.shape != (t, 3):
            raise InputError(f"txt_ids must be ({t}, 3), got {tuple(txt_ids.shape)}")
        ids = torch.cat([txt_ids.to(device).float(), img_ids.to(device).float()], dim=0)
        cos, sin = rope_tables(ids, cfg.axes_dims_rope)
        return Conditioning(context=context, pooled_temb=pooled_temb, rope_cos=cos, rope_sin=sin, grid_hw=(grid_h, grid_w))

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: Optional[torch.Tensor] = None,
        txt_ids: Optional[torch.Tensor] = None,
        micro_conds: Optional[torch.Tensor] = None,
        guidance: Any = None,
    ) -> torch.Tensor:
        """Logits (B, codebook_size, H, W) for token ids (B, H, W), with the official call signature.

        `timestep` is (B,) or (1,) and is multiplied by 1000 inside; `micro_conds` is required (the
        keyword default only keeps the official argument order). `guidance`: the guidance scale of
        a guidance-embedded model (required there, refused otherwise).
        """
        if micro_conds is None:
            raise InputError("micro_conds (B, 5) = [orig_width, orig_height, crop_top, crop_left, score] is required")
        if hidden_states.dim() != 3:
            raise InputError(f"hidden_states must be token ids (B, H, W), got shape {tuple(hidden_states.shape)}")
        cond = self.prepare_conditioning(
            encoder_hidden_states, pooled_projections, micro_conds, tuple(hidden_states.shape[1:]), img_ids, txt_ids,
            guidance=guidance,
        )
        return self.forward_cached(hidden_states, timestep, cond)

    def forward_cached(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        positions: Optional[torch.Tensor] = None,
        head: str = "logits",
        cache: Optional[list[BlockCache]] = None,
    ) -> torch.Tensor:
        """The forward pass with the step-invariant work taken from `cond`.

        Without `positions` it returns (B, K, H, W) logits, equal to `forward`. With `positions`
        (B, M) flat indices into the H*W grid (row-major) it returns (B, M, K): the MLM head, most of
        the cost once most tokens are decided, runs only there. With positions and head="hidden" it
        stops before the head's last (linear) layer and returns (B, M, D); `mlm_layer.logits_tokens`
        finishes it, so a caller mixing logits linearly (classifier-free guidance) can mix these instead.
        With positions, `cond` may hold k*B rows for B token grids (k prompt groups over the same
        tokens, e.g. [uncond, cond]); the tokens are then embedded once and the output has k*B rows.
        `cache`, one `BlockCache` per block (double blocks first), records every block's keys/values.
        """
        if head not in ("logits", "hidden") or (head == "hidden" and positions is None):
            raise InputError(f"head must be 'logits', or 'hidden' together with positions; got {head!r}")
        b, grid_h, grid_w = hidden_states.shape
        if (grid_h, grid_w) != tuple(cond.grid_hw):
            raise InputError(f"token grid {grid_h}x{grid_w} differs from the {cond.grid_hw[0]}x{cond.grid_hw[1]} grid the conditioning was built for")
        context = cond.context
        repeats = 1
        if context.shape[0] != b:
            if context.shape[0] == 1:
                context = context.expand(b, -1, -1)
            elif positions is not None and context.shape[0] % b == 0:
                # Classifier-free guidance runs the same tokens under each prompt group: embed them once.
                repeats = context.shape[0] // b
            else:
                raise InputError(f"batch of {b} token grids but conditioning for {context.shape[0]} prompts")
        t = context.shape[1]
        temb = self.time_embedding(timestep) + cond.pooled_temb
        if temb.shape[0] != b * repeats:
            temb = temb.expand(b * repeats, -1)
        rope = cond.rope

        if positions is None:
            x = self.embed(hidden_states.to(self.device))
        else:
            # Each distinct id has one embedding vector: run the embedding's 1x1 conv once per id.
            ids, inverse = torch.unique(hidden_states.to(self.device), return_inverse=True)
            x = self.embed(ids.view(1, -1, 1))[0, :, :, 0].t()[inverse].permute(0, 3, 1, 2)
        x = self.down_block(x)
        h, w = x.shape[-2:]
        x = self.project_to_hidden(self.project_to_hidden_norm(x.flatten(2).transpose(1, 2)))
        if repeats > 1:
            x = x.repeat(repeats, 1, 1)
            positions = positions.repeat(repeats, 1)
            b = b * repeats

        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        c = context
        caches = None
        if cache is not None:
            if len(cache) != len(self.transformer_blocks) + len(self.single_transformer_blocks):
                raise InputError(f"cache must hold one BlockCache per block, got {len(cache)}")
            caches = iter(cache)
        for block in self.transformer_blocks:
            if checkpoint:
                c, x = torch.utils.checkpoint.checkpoint(block, x, c, temb, rope, use_reentrant=False)
            else:
                c, x = block(x, c, temb, rope, next(caches) if caches is not None else None)
        z = torch.cat([c, x], dim=1)
        for block in self.single_transformer_blocks:
            if checkpoint:
                z = torch.utils.checkpoint.checkpoint(block, z, temb, rope, use_reentrant=False)
            else:
                z = block(z, temb, rope, next(caches) if caches is not None else None)

        y = self.project_from_hidden(self.project_from_hidden_norm(z[:, t:]))
        y = self.up_block(y.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        if positions is None:
            return self.mlm_layer(y)
        y = y.flatten(2).transpose(1, 2)  # (B, H*W, D)
        picked = torch.gather(y, 1, positions.to(y.device)[..., None].expand(-1, -1, y.shape[-1]))
        hidden = self.mlm_layer.hidden_tokens(picked)
        return hidden if head == "hidden" else self.mlm_layer.logits_tokens(hidden)

    # -- persistence ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: Union[str, Path],
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        variant: Optional[str] = None,
    ) -> "MeissonicTransformer":
        """Load a released-layout transformer: `folder` is the model root (with transformer/) or
        the transformer folder itself. Keys must match exactly."""
        return from_pretrained(folder, dtype=dtype, device=device, variant=variant)

    def save_pretrained(self, folder: Union[str, Path], max_shard_size: Union[int, str, None] = None) -> Path:
        """Write config.json + weights (one file, or shards + index above max_shard_size)."""
        return save_pretrained(self, folder, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------------------------
# Parameter counts


def num_parameters(model: nn.Module, exclude_compression: bool = False) -> int:
    """Number of parameters (works on the meta device); optionally without the Comp./Decomp. layers."""
    return sum(
        p.numel() for n, p in model.named_parameters()
        if not (exclude_compression and n.startswith(("down_block.", "up_block.")))
    )


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level prefix (`transformer_blocks`, `embed`, ...), in module order."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        prefix = name.split(".", 1)[0]
        counts[prefix] = counts.get(prefix, 0) + p.numel()
    return counts


def build_on_meta(config: TransformerConfig) -> MeissonicTransformer:
    """Instantiate without allocating weights (for counting and for loading with assign)."""
    with torch.device("meta"):
        return MeissonicTransformer(config)


# ----------------------------------------------------------------------------------------------
# Loading and saving


def transformer_folder(folder: Union[str, Path]) -> Path:
    """The transformer/ folder of a released-layout model root, or `folder` itself if it is one."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelFormatError(f"model folder not found: {folder}")
    if (folder / "transformer" / CONFIG_NAME).is_file():
        return folder / "transformer"
    if (folder / CONFIG_NAME).is_file():
        return folder
    raise ModelFormatError(
        f"no transformer config in {folder}: expected {folder / 'transformer' / CONFIG_NAME} (model root) "
        f"or {folder / CONFIG_NAME} (transformer folder)"
    )


def load_state_dict_files(folder: Path, variant: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                          dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Read the weights of a transformer folder: the single file, else the sharded index, in `variant`
    (fp16/bf16) when the folder holds it (see `state_io.weight_files`); with `dtype` each tensor is cast as
    it is read (no full-precision copy of the model is kept)."""
    from meissonic_cli.model.state_io import read_weights

    return read_weights(folder, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, device=device, variant=variant, dtype=dtype)


def weight_shapes(folder: Union[str, Path], variant: Optional[str] = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, safetensors dtype) of a transformer folder's weights, read from the file headers only."""
    from safetensors import SafetensorError, safe_open

    from meissonic_cli.model.state_io import weight_files

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in weight_files(folder, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, variant):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    out[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as err:
            raise ModelFormatError(f"cannot read weights in {path}: {err}") from None
    return out


def check_state_dict(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Strict key and shape matching with a readable error; values are tensors or shapes (see `state_io.check_keys`)."""
    from meissonic_cli.model.state_io import check_keys

    check_keys(model.state_dict(), state, source, what="the transformer config")


def from_pretrained(
    folder: Union[str, Path],
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    variant: Optional[str] = None,
) -> MeissonicTransformer:
    """Load `folder` (model root or transformer/ folder); see `MeissonicTransformer.from_pretrained`."""
    from meissonic_cli.model.state_io import load_state_into

    tdir = transformer_folder(folder)
    config = TransformerConfig.from_json(tdir / CONFIG_NAME)
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = load_state_dict_files(tdir, variant, device=device, dtype=dtype)
    model = build_on_meta(config)
    load_state_into(model, state, f"weights in {tdir}", what="the transformer config", dtype=dtype or "stored")
    return model.eval()


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_pretrained(model: MeissonicTransformer, folder: Union[str, Path], max_shard_size: Union[int, str, None] = None) -> Path:
    """Write `folder/config.json` and the weights in the released transformer/ layout.

    Each file is written under a temporary name and renamed into place; weight files of the other
    layout (single vs sharded) left by an earlier save are removed afterwards so loading is unambiguous.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in state:
        nbytes = state[key].numel() * state[key].element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes

    written: set[str] = set()
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(shards[0], p, metadata=meta))
        written.add(WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(folder / name, lambda p, s=shard: save_file(s, p, metadata=meta))
            weight_map.update({k: name for k in shard})
            written.add(name)
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(folder / WEIGHTS_INDEX_NAME, index)
        written.add(WEIGHTS_INDEX_NAME)
    write_json(folder / CONFIG_NAME, model.config.to_json_dict())
    stale = re.compile(r"diffusion_pytorch_model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for path in folder.iterdir():
        if stale.fullmatch(path.name) and path.name not in written:
            path.unlink()
    return folder
