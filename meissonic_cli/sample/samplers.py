"""Samplers beyond the official one: reveal orders, masking schedules and inference tricks.

Everything here is opt-in (`SamplerOptions`); with the defaults `sample_tokens` runs the official
sampler unchanged. The options:

- `order`: which still-masked positions a step reveals.
  - `confidence` (official): the most confident draws, with annealed Gumbel noise on the confidences.
  - `halton` (Besnier et al., "Halton Scheduler for Masked Generative Image Transformer", ICLR 2025):
    a fixed 2-D low-discrepancy order, independent of the model. Point k of the Halton sequence,
    (radical inverse of k in base 2, in base 3), picks the cell (row, column) of the token grid;
    cells already picked are skipped, so the order visits every cell once and each step's new
    tokens lie spread over the image, far from each other. Every image starts the order at a random
    point of it (a cyclic shift), so images of a batch do not share one reveal pattern.
  - `random`: uniformly random positions (a reference).
- `schedule`: how many tokens stay masked after step i of n, `floor(L * r((i+1)/n))` (never more than
  the step before minus one, at least one until the last step, which reveals the rest):
  cosine r(x) = cos(pi x / 2) and linear 1 - x (the two of the released scheduler config),
  arccos (2/pi) arccos(x), sqrt 1 - sqrt(x) (most tokens early) and square 1 - x^2 (most late).
  None keeps the model's scheduler config.
- `noise_reg` s (noise regularization of "Bag of Design Choices for Inference of High-Resolution
  Masked Generative Transformer", arXiv 2411.10781): Gaussian noise s * |cos(pi t / (n - 1))| * N(0, 1)
  is added to the logits before the tokens are drawn (t = n-1-i is the step's timestep, so the noise
  is strongest at the first and the last steps); the paper's setting is s = 2. It is added to the
  logits the tokens are drawn from, i.e. after `token_temperature`.
- `differential` f (differential sampling, same paper): from the second step on, for the fraction f
  of the still-masked positions whose predicted distribution moved least since the previous step
  (smallest KL(p_t || p_t-1)), tokens are drawn from the normalised positive part of the change,
  max(p_t - p_t-1, 1e-6), instead of p_t: where the model's belief did not move, the draw follows
  what it is moving towards. The paper's setting covers three quarters of the positions (f = 0.75).
- `cache_refresh` N: the feature cache of `meissonic_cli.sample.cache` (a full forward every N steps,
  cheaper cached forwards between them); 0 or 1 is no cache.

Masked Z-sampling (the paper's third trick) costs an extra transformer evaluation per step; the
study (benchmarks/sampler_study.py) measures quality per evaluation, so it is not offered here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import torch

from meissonic_cli.errors import InputError
from meissonic_cli.model.scheduler import MaskGITScheduler, _gumbel, draw_categorical

ORDERS = ("confidence", "halton", "random")
# Fraction still masked after a fraction x of the steps.
SCHEDULE_FUNCTIONS: dict[str, Callable[[float], float]] = {
    "cosine": lambda x: math.cos(x * math.pi / 2),
    "linear": lambda x: 1.0 - x,
    "arccos": lambda x: 2.0 / math.pi * math.acos(min(1.0, max(0.0, x))),
    "sqrt": lambda x: 1.0 - math.sqrt(x),
    "square": lambda x: 1.0 - x * x,
}
SCHEDULES = tuple(SCHEDULE_FUNCTIONS)
# The schedules the released scheduler computes itself (with its float32 arithmetic).
_SCHEDULER_SCHEDULES = ("cosine", "linear")
DIFFERENTIAL_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Sampler settings beyond the official sampler; the defaults are the official sampler."""

    order: str = "confidence"
    schedule: Optional[str] = None
    noise_reg: float = 0.0
    differential: float = 0.0
    cache_refresh: int = 0

    def problems(self) -> list[str]:
        """What is wrong with these settings, as flag-named messages (empty when they are usable)."""
        out = []
        if self.order not in ORDERS:
            out.append(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            out.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (math.isfinite(self.noise_reg) and self.noise_reg >= 0):
            out.append(f"--noise-reg must be >= 0 (0 = off, 2 = the paper's), got {self.noise_reg}")
        if not (math.isfinite(self.differential) and 0 <= self.differential <= 1):
            out.append(f"--differential must be a fraction in [0, 1] (0 = off, 0.75 = the paper's), got {self.differential}")
        if not isinstance(self.cache_refresh, int) or isinstance(self.cache_refresh, bool) or self.cache_refresh < 0:
            out.append(f"--cache-refresh must be an integer >= 0 (0 = no cache), got {self.cache_refresh!r}")
        return out

    def validate(self) -> "SamplerOptions":
        problems = self.problems()
        if problems:
            raise InputError("; ".join(problems))
        return self

    def is_official(self, scheduler: MaskGITScheduler) -> bool:
        """True when these settings are the official sampler for `scheduler` (nothing to change)."""
        return (self.order == "confidence" and self.schedule in (None, scheduler.config.masking_schedule)
                and self.noise_reg == 0 and self.differential == 0 and self.cache_refresh <= 1)

    @property
    def label(self) -> str:
        """A short name, e.g. 'halton', 'confidence+cache4', 'confidence/linear+noise2'."""
        name = self.order + (f"/{self.schedule}" if self.schedule else "")
        if self.noise_reg:
            name += f"+noise{self.noise_reg:g}"
        if self.differential:
            name += f"+diff{self.differential:g}"
        if self.cache_refresh > 1:
            name += f"+cache{self.cache_refresh}"
        return name


# ----------------------------------------------------------------------------------------------
# Schedules and orders


def mask_counts(schedule: str, steps: int, seq_len: int, starting_mask_ratio: float = 1.0,
                scheduler: Optional[MaskGITScheduler] = None) -> list[int]:
    """Tokens still masked after each step for a start with round(seq_len * starting_mask_ratio) masked.

    cosine and linear follow the released scheduler's float32 arithmetic (`masked_after_step`), so
    they keep exactly the official counts; the others are computed in float64.
    """
    if schedule not in SCHEDULE_FUNCTIONS:
        raise InputError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    n = int(steps)
    if schedule in _SCHEDULER_SCHEDULES:
        base = scheduler.config if scheduler is not None else None
        probe = MaskGITScheduler(base, masking_schedule=schedule) if base is not None else MaskGITScheduler(masking_schedule=schedule)
        return probe.masked_after_step(n, seq_len, starting_mask_ratio)
    fn = SCHEDULE_FUNCTIONS[schedule]
    remaining, table = int(round(seq_len * starting_mask_ratio)), []
    for i in range(n):
        if i == n - 1:
            remaining = 0
        else:
            raw = math.floor(seq_len * starting_mask_ratio * fn((i + 1) / n) + 1e-9)
            remaining = max(1, min(remaining - 1, raw))
        table.append(remaining)
    return table


def radical_inverse(index: int, base: int) -> float:
    """The van der Corput radical inverse of `index` in `base` (the digits mirrored after the point)."""
    out, scale = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        out += digit * scale
        scale /= base
    return out


@functools.lru_cache(maxsize=32)
def halton_order(grid_h: int, grid_w: int) -> tuple[int, ...]:
    """Every flat index of a grid_h x grid_w grid once, in 2-D Halton order (rows base 2, columns base 3).

    Point k = 0, 1, 2, ... maps to the cell (floor(h * phi_2(k)), floor(w * phi_3(k))); repeats are
    skipped. The sequence is uniform, so every cell is reached after a few times h*w points; cells
    not reached after 64*h*w points (none on grids up to 256x256) would follow in raster order.
    """
    total = grid_h * grid_w
    seen = bytearray(total)
    order: list[int] = []
    k, limit = 0, 64 * total + 1024
    while len(order) < total and k < limit:
        row = min(grid_h - 1, int(radical_inverse(k, 2) * grid_h))
        col = min(grid_w - 1, int(radical_inverse(k, 3) * grid_w))
        flat = row * grid_w + col
        if not seen[flat]:
            seen[flat] = 1
            order.append(flat)
        k += 1
    order.extend(i for i in range(total) if not seen[i])
    return tuple(order)


def halton_ranks(grid_h: int, grid_w: int, device: Any = None) -> torch.Tensor:
    """rank[flat index] = its place in `halton_order` (int64, (h*w,))."""
    order = torch.tensor(halton_order(grid_h, grid_w), dtype=torch.long)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks.to(device)


# ----------------------------------------------------------------------------------------------
# The loop


def uses_sampler_loop(options: Optional[SamplerOptions], scheduler: MaskGITScheduler, exact: bool = False,
                      first_step: int = 0) -> bool:
    """True when `options` ask for more than the official sampler (then `run_sampler_loop` decodes);
    InputError when they are combined with the exact loop or the img2img rule (official only)."""
    if options is None or options.validate().is_official(scheduler):
        return False
    if exact:
        raise InputError(f"the exact loop runs the official sampler only; drop --exact to sample with {options.label}")
    if first_step:
        raise InputError(f"the img2img rule runs the official sampler only, not {options.label}")
    return True


def noise_reg_factor(step_index: int, steps: int) -> float:
    """|cos(pi * t / (n - 1))| for the step's timestep t = n-1-i (1 when n == 1)."""
    if steps <= 1:
        return 1.0
    t = steps - 1 - step_index
    return abs(math.cos(math.pi * t / (steps - 1)))


def differential_probs(probs: torch.Tensor, previous: torch.Tensor, fraction: float) -> torch.Tensor:
    """probs (B, M, K) with the rows of the `fraction` of positions whose distribution moved least
    since `previous` (same shape; smallest KL(probs || previous)) replaced by the normalised
    positive part of the change, max(probs - previous, 1e-6)."""
    b, m, _ = probs.shape
    count = min(m, int(round(fraction * m)))
    if count == 0:
        return probs
    kl = (probs * (probs.clamp_min(1e-20).log() - previous.clamp_min(1e-20).log())).sum(-1)
    calm = kl.topk(count, dim=-1, largest=False).indices  # (B, count)
    change = (probs - previous).clamp_min(DIFFERENTIAL_FLOOR)
    change = change / change.sum(-1, keepdim=True)
    out = probs.clone()
    index = calm[:, :, None].expand(-1, -1, probs.shape[-1])
    return out.scatter(1, index, change.gather(1, index))


@dataclasses.dataclass
class _Group:
    """Rows of the batch that share one generator (all rows, or one row each)."""

    rows: slice
    generator: Optional[torch.Generator]
    offsets: Optional[torch.Tensor] = None  # Halton start points, (rows,)
    previous: Optional[torch.Tensor] = None  # probs of the previous step, (rows, M, K)
    previous_positions: Optional[torch.Tensor] = None


def _gen_device(generator: Optional[torch.Generator], fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def run_sampler_loop(
    transformer: Any,
    scheduler: MaskGITScheduler,
    cond: Any,
    latents: torch.Tensor,
    positions: torch.Tensor,
    steps: int,
    guidance_scale: Optional[float],
    generator: Any,
    starting_mask_ratio: float,
    limit: Callable[[torch.Tensor, int], torch.Tensor],
    options: SamplerOptions,
    callback: Optional[Callable[[int, int], None]] = None,
    trace: Optional[dict[str, list]] = None,
) -> torch.Tensor:
    """The fast loop of `pipeline.sample_tokens` with `options` (called from there, in inference mode).

    latents (B, H, W) hold the mask id at `positions` (B, M, ascending); `scheduler` has its timesteps
    and temperatures set; `limit(logits, dim)` applies the codebook limit and the token temperature.
    With a cache and `trace` (a dict), every cached step also runs the uncached forward at the same
    state and appends max/mean |logit difference| to trace["max_abs"] / trace["mean_abs"]; the step
    indices that ran the full forward go to trace["full_steps"].
    """
    from meissonic_cli.sample.cache import FeatureCache
    from meissonic_cli.sample.pipeline import masked_logits

    options.validate()
    b, grid_h, grid_w = latents.shape
    seq_len = grid_h * grid_w
    device = latents.device
    mask_id = scheduler.config.mask_token_id
    schedule = options.schedule or scheduler.config.masking_schedule
    table = mask_counts(schedule, steps, seq_len, starting_mask_ratio, scheduler)
    per_row = isinstance(generator, (list, tuple))
    groups = ([_Group(slice(r, r + 1), generator[r]) for r in range(b)] if per_row
              else [_Group(slice(0, b), generator)])
    ranks = None
    if options.order == "halton":
        ranks = halton_ranks(grid_h, grid_w, device)
        for g in groups:
            n = g.rows.stop - g.rows.start
            g.offsets = torch.randint(seq_len, (n,), generator=g.generator,
                                      device=_gen_device(g.generator, device)).to(device)
    cache = FeatureCache(transformer, cond, options.cache_refresh, mask_id) if options.cache_refresh > 1 else None

    def logits_at(state: torch.Tensor, t: torch.Tensor, where: torch.Tensor, i: int) -> torch.Tensor:
        if cache is None:
            return masked_logits(transformer, state, t, cond, where, guidance_scale)
        hidden = cache.hidden(state, t, where, i)
        if trace is not None and cache.last_was_full:
            trace.setdefault("full_steps", []).append(i)
        if trace is not None and not cache.last_was_full:
            reference = masked_logits(transformer, state, t, cond, where, guidance_scale)
        else:
            reference = None
        if guidance_scale is not None:
            uncond, guided = hidden.chunk(2)
            hidden = uncond + guidance_scale * (guided - uncond)
        out = transformer.mlm_layer.logits_tokens(hidden)
        if reference is not None:
            diff = (out.float() - reference.float()).abs()
            trace.setdefault("max_abs", []).append(float(diff.max()) if diff.numel() else 0.0)
            trace.setdefault("mean_abs", []).append(float(diff.mean()) if diff.numel() else 0.0)
        return out

    for i, t in enumerate(scheduler.timesteps):
        logits = limit(logits_at(latents, t.view(1).long(), positions, i), 2)
        outs = [_step(options, scheduler, g, logits[g.rows], positions[g.rows], latents[g.rows], i, steps, table[i],
                      ranks, mask_id) for g in groups]
        latents = torch.cat([o[0] for o in outs]) if len(outs) > 1 else outs[0][0]
        positions = torch.cat([o[1] for o in outs]) if len(outs) > 1 else outs[0][1]
        if callback is not None:
            callback(i + 1, steps)
    if trace is not None and cache is not None:
        trace.setdefault("full_forwards", []).append(cache.full_forwards)
        trace.setdefault("cached_forwards", []).append(cache.cached_forwards)
    return latents


def _step(options: SamplerOptions, scheduler: MaskGITScheduler, group: _Group, logits: torch.Tensor,
          positions: torch.Tensor, latents: torch.Tensor, i: int, steps: int, keep_masked: int,
          ranks: Optional[torch.Tensor], mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for one group of rows: draw tokens at the masked positions, keep `keep_masked` of them masked."""
    gen = group.generator
    flat = latents.reshape(latents.shape[0], -1)
    b, m, k = logits.shape
    gen_device = _gen_device(gen, logits.device)
    if options.noise_reg and m:
        factor = options.noise_reg * noise_reg_factor(i, steps)
        noise = torch.randn(logits.shape, generator=gen, device=gen_device, dtype=torch.float32).to(logits.device)
        logits = logits.float() + factor * noise
    probs = logits.float().softmax(dim=-1)
    if options.differential:
        if group.previous is not None and m:
            # Positions masked now were masked at the previous step too; both lists ascend.
            index = torch.searchsorted(group.previous_positions.contiguous(), positions.contiguous())
            previous = group.previous.gather(1, index[:, :, None].expand(-1, -1, k))
            drawn_from = differential_probs(probs, previous, options.differential)
        else:
            drawn_from = probs
        group.previous, group.previous_positions = probs, positions
    else:
        drawn_from = probs
    if m:
        draws = draw_categorical(drawn_from.reshape(-1, k), gen).view(b, m).to(flat.device)
    else:
        draws = torch.empty(b, 0, dtype=flat.dtype, device=flat.device)
    pred = flat.scatter(1, positions, draws.to(flat.dtype))
    if keep_masked == 0 or m == 0:
        return pred.view_as(latents), positions[:, :0]
    keep = min(m, keep_masked)
    if options.order == "confidence":
        selected = torch.gather(drawn_from, -1, draws.to(drawn_from.device)[:, :, None])[:, :, 0]
        uniform = torch.zeros_like(selected, device=gen_device).uniform_(0, 1, generator=gen).to(selected.device)
        score = torch.log(selected.clamp(1e-20)) + scheduler.temperatures[i].to(selected.device) * _gumbel(uniform)
    elif options.order == "halton":
        # Earlier in the (shifted) Halton order = revealed sooner.
        shifted = (ranks[positions] - group.offsets[:, None]) % ranks.numel()
        score = -shifted.float()
    else:
        score = torch.rand(b, m, generator=gen, device=gen_device).to(positions.device)
    least = score.topk(keep, dim=-1, largest=False).indices.to(flat.device)
    still = torch.gather(positions, 1, least).sort(dim=-1).values
    return pred.scatter(1, still, mask_id).view_as(latents), still


def evaluations(steps: int, guided: bool) -> int:
    """Transformer evaluations of one image: one per step, two with classifier-free guidance."""
    return int(steps) * (2 if guided else 1)


__all__ = ["ORDERS", "SCHEDULES", "SamplerOptions", "differential_probs", "evaluations", "halton_order", "halton_ranks",
           "mask_counts", "noise_reg_factor", "radical_inverse", "run_sampler_loop", "uses_sampler_loop"]
