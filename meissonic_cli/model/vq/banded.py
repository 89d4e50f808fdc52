"""Memory-bounded VQ decoding: the decoder's high-resolution layers evaluated in horizontal row bands.

The released VQ decodes in float32 (`force_upcast`). At 1024x1024 its last two levels hold
activations of 0.5-1 GiB each (256 channels after the last upsample, 128 in the last block), and the
whole decode peaks near 4 GiB, twice the bf16 transformer's weights. `banded_decode` computes the same
function holding about one activation of the last level (512 MiB at 1024x1024) plus a few bands:

- The low-resolution part (post_quant_conv, conv_in, the mid block, the first up blocks) runs whole, as
  diffusers runs it, while each activation stays under `whole_bytes`.
- From there each resnet reads its input in bands of rows and writes its output as a list of row
  chunks; an input chunk is freed once no later band needs it, so a level holds about one activation,
  not four. An upsampler's output is never stored: its conv is recomputed from the lower-resolution
  rows whenever a band asks for them.
- Every 3x3 conv sees its real neighbours across band edges (a band reads one extra row per conv above
  and below, a halo) and zero padding only at the image's top and bottom.
- GroupNorm needs statistics over the whole tensor: each norm's input is streamed once, band by band,
  before the norm is applied, accumulating per-group mean and variance in float64 (Chan's pairwise
  combination); the norm is then applied as x * scale + shift per channel, as PyTorch's kernel does.

The result equals the whole decode up to float rounding (the statistics are summed in another order);
`tests/test_vq_banded.py` bounds the difference. Each image of a batch is decoded on its own.
`supports_banded(model)` says whether a decoder has the layout this module knows (the released one
does); anything else decodes whole.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from meissonic_cli.device import trim_host_memory

BAND_BYTES = 16 * 2**20  # the widest tensor of one band (float32, 1024 px wide, 256 channels: 16 rows)
WHOLE_BYTES = 64 * 2**20  # layers whose activations stay under this run whole


# ---------------------------------------------------------------------------------------------
# What the banded path supports


def _plain_conv(conv: Any) -> bool:
    """A stride-1 zero-padded conv whose kernel is 2p+1 rows tall: rows [a, b) of its output need rows
    [a-p, b+p) of its input."""
    if not isinstance(conv, nn.Conv2d):
        return False
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and kh == 2 * ph + 1 and kw == 2 * pw + 1)


def _plain_resnet(res: Any) -> bool:
    """A diffusers ResnetBlock2D without time embedding, up/downsampling or spatial norm."""
    return (type(res).__name__ == "ResnetBlock2D" and getattr(res, "time_emb_proj", None) is None
            and res.upsample is None and res.downsample is None
            and isinstance(res.norm1, nn.GroupNorm) and isinstance(res.norm2, nn.GroupNorm)
            and res.norm1.affine and res.norm2.affine and isinstance(res.nonlinearity, nn.SiLU)
            and _plain_conv(res.conv1) and _plain_conv(res.conv2)
            and (res.conv_shortcut is None or (_plain_conv(res.conv_shortcut) and res.conv_shortcut.kernel_size == (1, 1))))


def _plain_upsampler(up: Any) -> bool:
    """A diffusers Upsample2D: nearest x2, then a conv."""
    return (type(up).__name__ == "Upsample2D" and getattr(up, "norm", None) is None and up.interpolate
            and not up.use_conv_transpose and up.use_conv and getattr(up, "name", "conv") == "conv"
            and _plain_conv(up.conv))


def supports_banded(model: Any) -> bool:
    """Whether `model` (a diffusers VQModel) has the decoder layout `banded_decode` evaluates: group-norm
    resnets, nearest-x2 upsamplers, GroupNorm + SiLU + conv at the end (the released VQ's layout)."""
    dec = getattr(model, "decoder", None)
    if dec is None or getattr(model.config, "norm_type", "group") != "group":
        return False
    blocks = list(getattr(dec, "up_blocks", []))
    if not blocks or not all(type(b).__name__ == "UpDecoderBlock2D" for b in blocks):
        return False
    resnets = [r for b in blocks for r in b.resnets]
    uppers = [u for b in blocks for u in (b.upsamplers or [])]
    return (all(_plain_resnet(r) for r in resnets) and all(_plain_upsampler(u) for u in uppers)
            and isinstance(dec.conv_norm_out, nn.GroupNorm) and dec.conv_norm_out.affine
            and isinstance(dec.conv_act, nn.SiLU) and _plain_conv(dec.conv_out))


def largest_activation_bytes(model: Any, height: int, width: int) -> int:
    """Bytes of the largest activation a whole decode of one `height x width` image holds: the last
    upsampler's output (the widest channels at full resolution) for the released layout."""
    dec = model.decoder
    size = 4 if model.dtype == torch.float32 else 2
    blocks = list(dec.up_blocks)
    levels = len(blocks)
    largest = 0
    for i, block in enumerate(blocks):
        scale = 2 ** (levels - 1 - i)  # this block's resnets run at 1/scale of the image
        for res in block.resnets:
            channels = max(res.in_channels, res.out_channels or res.in_channels)
            largest = max(largest, channels * (height // scale) * (width // scale))
        for up in block.upsamplers or []:
            largest = max(largest, up.channels * (height // scale * 2) * (width // scale * 2))
    return largest * size


# ---------------------------------------------------------------------------------------------
# Sources of rows


class _Whole:
    """A whole activation (1, C, H, W), read by rows."""

    def __init__(self, x: torch.Tensor):
        self.x, self.height = x, x.shape[2]

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.x[:, :, a:b]

    def release_before(self, row: int) -> None:
        pass


class _Chunks:
    """An activation held as chunks of `chunk` rows, appended in order; chunks above a row can be freed."""

    def __init__(self, height: int, chunk: int):
        self.height, self.chunk = height, chunk
        self.parts: list[Optional[torch.Tensor]] = []

    def append(self, part: torch.Tensor) -> None:
        self.parts.append(part)

    def rows(self, a: int, b: int) -> torch.Tensor:
        first, last = a // self.chunk, (b - 1) // self.chunk
        pieces = []
        for i in range(first, last + 1):
            part = self.parts[i]
            if part is None:
                raise RuntimeError(f"banded decode: rows {a}..{b} were already freed")  # a bug, not bad input
            start = i * self.chunk
            pieces.append(part[:, :, max(a - start, 0):min(b - start, part.shape[2])])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def release_before(self, row: int) -> None:
        for i in range(min(row // self.chunk, len(self.parts))):
            self.parts[i] = None


class _Upsampled:
    """conv(nearest x2 (source)), computed for the rows a band asks for; nothing is stored."""

    def __init__(self, source: Any, conv: nn.Conv2d):
        self.source, self.conv = source, conv
        self.height = 2 * source.height

    def rows(self, a: int, b: int) -> torch.Tensor:
        p = self.conv.padding[0]
        lo, hi = max(a - p, 0), min(b + p, self.height)
        low = self.source.rows(lo // 2, (hi - 1) // 2 + 1)
        up = F.interpolate(low, scale_factor=2.0, mode="nearest")
        up = up[:, :, lo - 2 * (lo // 2):][:, :, :hi - lo]
        return _conv_rows(self.conv, up, a, b, lo, self.height)

    def release_before(self, row: int) -> None:
        self.source.release_before(max(row - self.conv.padding[0], 0) // 2)


# ---------------------------------------------------------------------------------------------
# Band arithmetic


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, a: int, b: int, lo: int, height: int) -> torch.Tensor:
    """Rows [a, b) of conv's output, from `x` = rows [lo, lo + x.shape[2]) of its input (height `height`):
    zero rows are added only beyond the image's top and bottom."""
    p = conv.padding[0]
    hi = lo + x.shape[2]
    top, bottom = lo - (a - p), (b + p) - hi
    if top < 0 or bottom < 0 or (top and a - p >= 0) or (bottom and b + p <= height):
        raise RuntimeError(f"banded decode: rows {lo}..{hi} cannot give conv rows {a}..{b}")  # a bug, not bad input
    if top or bottom:
        x = F.pad(x, (0, 0, top, bottom))
    return F.conv2d(x, conv.weight, conv.bias, padding=(0, conv.padding[1]))


class _Moments:
    """Per-group count, mean and sum of squared deviations in float64, combined band by band."""

    def __init__(self, groups: int):
        self.groups = groups
        self.n = 0
        self.mean = torch.zeros(groups, dtype=torch.float64)
        self.m2 = torch.zeros(groups, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        g = self.groups
        per = x.shape[1] // g
        count = per * x.shape[2] * x.shape[3]
        mean = torch.empty(g, dtype=torch.float64)
        m2 = torch.empty(g, dtype=torch.float64)
        for i in range(g):  # one group at a time: the float64 copy stays small
            part = x[0, i * per:(i + 1) * per].double()
            var, mu = torch.var_mean(part, correction=0)
            mean[i], m2[i] = mu, var * count
        if self.n == 0:
            self.n, self.mean, self.m2 = count, mean, m2
            return
        total = self.n + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * count / total)
        self.n = total

    def scale_shift(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel float32 (1, C, 1, 1) scale and shift that apply `norm` with these statistics,
        formed as PyTorch's CPU kernel forms them from its float statistics (scale = rstd * gamma, shift =
        fma(-scale, mean, beta)), so a group whose statistics round alike normalizes bit for bit alike."""
        per = norm.num_channels // self.groups
        rstd = (self.m2 / self.n + norm.eps).rsqrt().float().repeat_interleave(per)
        mean = self.mean.float().repeat_interleave(per)
        weight, bias = norm.weight.detach().float().cpu(), norm.bias.detach().float().cpu()
        scale = rstd * weight
        shift = (bias.double() - scale.double() * mean.double()).float()
        dev = norm.weight.device
        return scale.to(dev).view(1, -1, 1, 1), shift.to(dev).view(1, -1, 1, 1)


def _bands(height: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, height)) for a in range(0, height, rows)]


def _band_rows(channels: int, width: int, element_size: int, band_bytes: int) -> int:
    return max(4, band_bytes // max(channels * width * element_size, 1))


def _norm_act(x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """GroupNorm (as precomputed scale and shift: x * scale + shift, fused as PyTorch's kernel) then SiLU;
    `inplace` overwrites `x` (a band nothing else reads)."""
    scale, shift = scale_shift
    if x.dtype != torch.float32:
        return F.silu(torch.addcmul(shift, x.float(), scale).to(x.dtype), inplace=True)
    return F.silu(torch.addcmul(shift, x, scale, out=x if inplace else None), inplace=True)


def _moments_of(norm: nn.GroupNorm, height: int, rows: int, read: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream `read(a, b)` over the whole height and return `norm`'s scale and shift for it."""
    moments = _Moments(norm.num_groups)
    for a, b in _bands(height, rows):
        moments.add(read(a, b))
        trim_host_memory()
    return moments.scale_shift(norm)


# ---------------------------------------------------------------------------------------------
# The banded layers


def _resnet(res: Any, source: Any, width: int, band_bytes: int) -> _Chunks:
    """A ResnetBlock2D over a source of rows; its output as row chunks (the source is freed as it goes)."""
    height = source.height
    p1, p2 = res.conv1.padding[0], res.conv2.padding[0]
    es = res.conv1.weight.element_size()
    rows = _band_rows(max(res.in_channels, res.out_channels or res.in_channels), width, es, band_bytes)
    ss1 = _moments_of(res.norm1, height, rows, source.rows)

    def conv1_rows(a: int, b: int, lo: int, x: torch.Tensor) -> torch.Tensor:
        return _conv_rows(res.conv1, _norm_act(x, ss1), a, b, lo, height)

    def h1(a: int, b: int) -> torch.Tensor:
        lo, hi = max(a - p1, 0), min(b + p1, height)
        return conv1_rows(a, b, lo, source.rows(lo, hi))

    ss2 = _moments_of(res.norm2, height, rows, h1)
    out = _Chunks(height, rows)
    for a, b in _bands(height, rows):
        lo1, hi1 = max(a - p2, 0), min(b + p2, height)  # rows of conv1's output this band needs
        lo0, hi0 = max(lo1 - p1, 0), min(hi1 + p1, height)  # rows of the input
        x = source.rows(lo0, hi0)
        h = conv1_rows(lo1, hi1, lo0, x)
        h = _conv_rows(res.conv2, _norm_act(h, ss2, inplace=True), a, b, lo1, height)
        skip = x[:, :, a - lo0:b - lo0]
        del x
        if res.conv_shortcut is not None:
            skip = res.conv_shortcut(skip)
        h.add_(skip)  # = skip + h, as diffusers adds them (IEEE addition commutes)
        if res.output_scale_factor != 1:
            h.div_(res.output_scale_factor)
        out.append(h)
        del h, skip
        source.release_before(b - p1 - p2)  # the next band reads from row b - p2 - p1 on
        trim_host_memory()  # freed rows and band temporaries leave the process: RSS stays at what is live
    return out


def _head(dec: Any, source: Any, width: int, band_bytes: int) -> torch.Tensor:
    """conv_out(SiLU(conv_norm_out(x))) over a source of rows: the image (1, C_out, H, W)."""
    height = source.height
    conv = dec.conv_out
    p = conv.padding[0]
    rows = _band_rows(conv.in_channels, width, conv.weight.element_size(), band_bytes)
    ss = _moments_of(dec.conv_norm_out, height, rows, source.rows)
    out = torch.empty(1, conv.out_channels, height, width, dtype=conv.weight.dtype, device=conv.weight.device)
    for a, b in _bands(height, rows):
        lo, hi = max(a - p, 0), min(b + p, height)
        out[:, :, a:b] = _conv_rows(conv, _norm_act(source.rows(lo, hi), ss), a, b, lo, height)
        source.release_before(b - p)
        trim_host_memory()
    return out


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _decode_one(model: Any, quant: torch.Tensor, band_bytes: int, whole_bytes: int) -> torch.Tensor:
    """One image's decoder output (1, C_out, H, W) from its codebook vectors (1, D, h, w)."""
    dec = model.decoder
    x: Optional[torch.Tensor] = dec.conv_in(model.post_quant_conv(quant))
    x = dec.mid_block(x, None)
    source: Any = None  # rows of the current activation once the banded part has started
    width = 0
    for block in dec.up_blocks:
        for res in block.resnets:
            if source is None and _nbytes(x) <= whole_bytes:
                x = res(x, None)
                continue
            if source is None:
                source, width, x = _Whole(x), x.shape[3], None
            source = _resnet(res, source, width, band_bytes)
        for up in block.upsamplers or []:
            if source is None and _nbytes(x) * 4 <= whole_bytes:
                x = up(x)
                continue
            if source is None:
                source, width, x = _Whole(x), x.shape[3], None
            source, width = _Upsampled(source, up.conv), width * 2
    if source is None:
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))
    return _head(dec, source, width, band_bytes)


@torch.no_grad()
def banded_decode(model: Any, quant: torch.Tensor, band_bytes: int = BAND_BYTES,
                  whole_bytes: int = WHOLE_BYTES) -> torch.Tensor:
    """The decoder output (B, C_out, H, W) of a diffusers VQModel (`supports_banded`) for codebook vectors
    `quant` (B, D, h, w): what `model.decode(quant, force_not_quantize=True).sample` returns, up to float
    rounding, holding about one last-level activation instead of four (see the module docstring)."""
    return torch.cat([_decode_one(model, quant[i:i + 1], band_bytes, whole_bytes) for i in range(quant.shape[0])])


__all__ = ["BAND_BYTES", "WHOLE_BYTES", "banded_decode", "largest_activation_bytes", "supports_banded"]
