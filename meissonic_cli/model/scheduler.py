"""MaskGIT parallel decoding: the schedule and the step of the released Meissonic scheduler.

Sampling starts from an all-mask grid. Each step draws a token for every masked position from the
model's distribution, then re-masks the least confident ones, so that the number still masked
follows a cosine (or linear) schedule; confidences get Gumbel noise scaled by an annealed
temperature. `step` reproduces the official step bit for bit (same float32 arithmetic, same torch
RNG calls in the same order); `step_masked` is the sampler's fast variant that only looks at the
positions still masked (see its docstring for how it differs).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from meissonic_cli.atomic import write_json
from meissonic_cli.config import field, read_json_object
from meissonic_cli.errors import ConfigError, InputError, ModelFormatError

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SCHEDULER_CLASS_NAME = "Scheduler"
SCHEDULES = ("cosine", "linear")
DRAWS = ("multinomial", "inverse_cdf")


@dataclasses.dataclass
class SchedulerConfig:
    """Fields of the released `scheduler/scheduler_config.json`."""

    mask_token_id: int = field(8255, help="Token id that marks a masked position (the transformer's vocab_size-1).")
    masking_schedule: str = field("cosine", help="How the masked fraction falls over the steps: cosine (the paper's) or linear.")

    def validate(self) -> "SchedulerConfig":
        problems = []
        if self.masking_schedule not in SCHEDULES:
            problems.append(f"masking_schedule must be one of {', '.join(SCHEDULES)}, got {self.masking_schedule!r}")
        if not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            problems.append(f"mask_token_id must be a non-negative integer, got {self.mask_token_id!r}")
        if problems:
            raise ConfigError(problems)
        return self


@dataclasses.dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor  # the tokens after this step (re-masked where not yet decided)
    pred_original_sample: torch.Tensor  # the fully decoded guess of this step


@dataclasses.dataclass
class MaskedStepOutput(SchedulerOutput):
    masked_positions: torch.Tensor  # (B, M') flat indices still masked after this step, ascending


def draw_categorical(probs: torch.Tensor, generator: Optional[torch.Generator] = None, block: int = 128) -> torch.Tensor:
    """One index per row of probs (N, K), drawn with probability proportional to the row, by inverse CDF.

    One uniform number per row, from `generator` on its own device. Two levels keep it accurate
    and cheap: the row's mass per block of `block` codes (summed in float32, accumulated in float64)
    picks a block, a float64 cumulative sum inside that block picks the code; one float32 cumulative
    sum over all 8192 codes would pile up rounding that misweights the rarest codes, and one in
    float64 costs a pass over every code in double. Codes with zero probability are never drawn.
    """
    n, k = probs.shape
    pad = (-k) % block
    blocks = (F.pad(probs, (0, pad)) if pad else probs).reshape(n, -1, block)
    sums = blocks.sum(-1).double()
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    gen_device = generator.device if generator is not None else probs.device
    u = torch.rand(n, 1, generator=generator, device=gen_device, dtype=torch.float64).to(probs.device) * total
    # Rounding could put u at the very end of the mass, past the last code with probability > 0.
    u = torch.minimum(u, total * (1 - 1e-12))
    chosen = torch.searchsorted(cdf, u, right=True)
    rest = u - (cdf.gather(1, chosen) - sums.gather(1, chosen))
    inner = blocks.gather(1, chosen[:, :, None].expand(-1, -1, block))[:, 0].double().cumsum(-1)
    rest = torch.minimum(rest, inner[:, -1:] * (1 - 1e-12))
    return (chosen * block + torch.searchsorted(inner, rest, right=True))[:, 0]


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log((-torch.log(uniform.clamp(1e-20))).clamp(1e-20))


class MaskGITScheduler:
    """The released Meissonic scheduler (`set_timesteps`, `step`) plus RNG-free schedule tables."""

    def __init__(self, config: Optional[SchedulerConfig] = None, *, mask_token_id: Optional[int] = None,
                 masking_schedule: Optional[str] = None):
        config = config or SchedulerConfig()
        if mask_token_id is not None:
            config = dataclasses.replace(config, mask_token_id=mask_token_id)
        if masking_schedule is not None:
            config = dataclasses.replace(config, masking_schedule=masking_schedule)
        self.config = config.validate()
        self.timesteps: Optional[torch.Tensor] = None
        self.temperatures: Optional[torch.Tensor] = None

    # -- config files ---------------------------------------------------------------------------

    @classmethod
    def from_config_dir(cls, folder: Union[str, Path]) -> "MaskGITScheduler":
        """Read `scheduler_config.json` from a scheduler/ folder or a model root holding one."""
        folder = Path(folder)
        path = folder / SCHEDULER_CONFIG_NAME
        if not path.is_file() and (folder / "scheduler" / SCHEDULER_CONFIG_NAME).is_file():
            path = folder / "scheduler" / SCHEDULER_CONFIG_NAME
        values = read_json_object(path, f"scheduler config not found: expected {folder / SCHEDULER_CONFIG_NAME}")
        names = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = sorted(k for k in values if not k.startswith("_") and k not in names)
        if unknown:
            raise ModelFormatError(f"{path}: unknown scheduler field(s) {', '.join(unknown)}; expected {', '.join(sorted(names))}")
        try:
            return cls(SchedulerConfig(**{k: v for k, v in values.items() if k in names}))
        except ConfigError as err:
            raise ModelFormatError(f"{path}: {err}") from None

    def save_config(self, folder: Union[str, Path]) -> Path:
        """Write `folder/scheduler_config.json` (released layout), atomically."""
        data = {"_class_name": SCHEDULER_CLASS_NAME, **dataclasses.asdict(self.config)}
        return write_json(Path(folder) / SCHEDULER_CONFIG_NAME, data)

    # -- schedule --------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int,
                      temperature: Union[float, Sequence[float]] = (2, 0),
                      device: Union[str, torch.device, None] = None) -> None:
        """timesteps n-1..0 (int64); temperatures linspace(t0, t1, n), or linspace(tau, 0.01, n) for a scalar."""
        n = int(num_inference_steps)
        if n < 1:
            raise ConfigError(f"number of steps must be >= 1, got {num_inference_steps}")
        self.timesteps = torch.arange(n, device=device).flip(0)
        if isinstance(temperature, (tuple, list)):
            if len(temperature) != 2:
                raise ConfigError(f"temperature must be one number or a (start, end) pair, got {temperature!r}")
            self.temperatures = torch.linspace(float(temperature[0]), float(temperature[1]), n, device=device)
        else:
            self.temperatures = torch.linspace(float(temperature), 0.01, n, device=device)

    @property
    def num_inference_steps(self) -> int:
        self._require_timesteps()
        return len(self.timesteps)

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise InputError("call set_timesteps(num_steps) before stepping the scheduler")

    def _step_index(self, timestep: Union[int, torch.Tensor]) -> int:
        self._require_timesteps()
        hits = (self.timesteps.cpu() == int(timestep)).nonzero()
        if len(hits) != 1:
            raise InputError(f"timestep {int(timestep)} is not one of the {len(self.timesteps)} scheduled timesteps")
        return int(hits[0, 0])

    def raw_mask_len(self, step_index: int, seq_len: int, starting_mask_ratio: float = 1.0) -> torch.Tensor:
        """floor(L * schedule((i+1)/n) * starting_mask_ratio), with the official float32 arithmetic.

        Returns a float32 scalar tensor. The float32 rounding matters: at n=48, i=31 cos(pi/3) comes
        out just under 0.5, giving L/2-1 where exact arithmetic gives L/2.
        """
        n = self.num_inference_steps
        ratio = torch.tensor([[step_index]]) + 1
        ratio = ratio / n
        if self.config.masking_schedule == "cosine":
            mask_ratio = torch.cos(ratio * math.pi / 2)
        else:
            mask_ratio = 1 - ratio
        mask_ratio = starting_mask_ratio * mask_ratio
        return (seq_len * mask_ratio).floor()[0, 0]

    def masked_after_step(self, num_inference_steps: int, seq_len: int, starting_mask_ratio: float = 1.0) -> list[int]:
        """Tokens still masked after each step, with no confidence ties, from a start with
        round(seq_len * starting_mask_ratio) masked (all of them by default).

        RNG-free: each step re-masks max(1, min(still_masked - 1, raw)); the last step reveals all.
        Leaves this scheduler's timesteps/temperatures untouched.
        """
        probe = MaskGITScheduler(self.config)
        probe.set_timesteps(num_inference_steps)
        remaining, table = int(round(seq_len * starting_mask_ratio)), []
        for i in range(num_inference_steps):
            if i == num_inference_steps - 1:
                remaining = 0
            else:
                raw = int(probe.raw_mask_len(i, seq_len, starting_mask_ratio))
                remaining = max(1, min(remaining - 1, raw))
            table.append(remaining)
        return table

    # -- the official step ----------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, starting_mask_ratio: float = 1.0) -> SchedulerOutput:
        """One decoding step, bit-identical to the official `Scheduler.step`.

        model_output: logits (B, K, H, W) with sample (B, H, W), or (B, L, K) with sample (B, L).
        Randomness: one `torch.multinomial` draw for every position (known ones too), then, unless
        timestep is 0, a (B, L) uniform draw, both from `generator` on its own device.
        """
        def draw_tokens(probs2d: torch.Tensor) -> torch.Tensor:
            gen_device = generator.device if generator is not None else probs2d.device
            return torch.multinomial(probs2d.to(gen_device), 1, generator=generator)[:, 0].to(probs2d.device)

        def draw_uniform(like: torch.Tensor) -> torch.Tensor:
            gen_device = generator.device if generator is not None else like.device
            return torch.zeros_like(like, device=gen_device).uniform_(0, 1, generator=generator).to(like.device)

        return self._step(model_output, timestep, sample, starting_mask_ratio, draw_tokens, draw_uniform)

    def step_with_draws(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
                        multinomial_ids: torch.Tensor, uniform: Optional[torch.Tensor],
                        starting_mask_ratio: float = 1.0) -> SchedulerOutput:
        """`step` with the random draws given: multinomial_ids (B, L) int64 and uniform (B, L) float32.

        For reproducing recorded runs, or a run whose random numbers come from elsewhere.
        """
        def draw_tokens(probs2d: torch.Tensor) -> torch.Tensor:
            return multinomial_ids.reshape(-1).to(probs2d.device)

        def draw_uniform(like: torch.Tensor) -> torch.Tensor:
            if uniform is None:
                raise InputError("uniform draws are required for every step except the one at timestep 0")
            return uniform.reshape(like.shape).to(like.device, like.dtype)

        return self._step(model_output, timestep, sample, starting_mask_ratio, draw_tokens, draw_uniform)

    def _step(self, model_output, timestep, sample, starting_mask_ratio, draw_tokens, draw_uniform) -> SchedulerOutput:
        mask_id = self.config.mask_token_id
        two_dim = sample.dim() == 3 and model_output.dim() == 4
        if two_dim:
            b, k, h, w = model_output.shape
            sample = sample.reshape(b, h * w)
            model_output = model_output.reshape(b, k, h * w).permute(0, 2, 1)
        if sample.dim() != 2 or model_output.dim() != 3 or model_output.shape[:2] != sample.shape:
            raise InputError(
                f"expected logits (B, K, H, W) with tokens (B, H, W), or (B, L, K) with (B, L); got "
                f"{tuple(model_output.shape)} and {tuple(sample.shape)}"
            )
        unknown = sample == mask_id
        # float32 is what the official step computes on CPU; identical for float32 logits.
        probs = model_output.float().softmax(dim=-1)
        b, seq_len, k = probs.shape
        pred = draw_tokens(probs.reshape(-1, k)).view(b, seq_len)
        pred = torch.where(unknown, pred, sample)

        if int(timestep) == 0:
            prev = pred
        else:
            i = self._step_index(timestep)
            mask_len = self.raw_mask_len(i, seq_len, starting_mask_ratio).to(probs.device).view(1, 1)
            mask_len = torch.min(unknown.sum(dim=-1, keepdim=True) - 1, mask_len)
            mask_len = torch.max(torch.tensor([1], device=probs.device), mask_len)
            selected = torch.gather(probs, -1, pred[:, :, None])[:, :, 0]
            selected = torch.where(unknown, selected, torch.finfo(selected.dtype).max)
            temperature = self.temperatures[i].to(probs.device)
            confidence = torch.log(selected.clamp(1e-20)) + temperature * _gumbel(draw_uniform(selected))
            cut = torch.gather(torch.sort(confidence, dim=-1).values, 1, mask_len.long())
            prev = torch.where(confidence < cut, mask_id, pred)

        if two_dim:
            prev, pred = prev.reshape(b, h, w), pred.reshape(b, h, w)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=pred)

    # -- the sampler's fast step ------------------------------------------------------------------

    def step_masked(self, logits_at_masked: torch.Tensor, masked_positions: torch.Tensor, sample: torch.Tensor,
                    step_index: int, generator: Optional[torch.Generator] = None,
                    starting_mask_ratio: float = 1.0, draw: str = "multinomial") -> MaskedStepOutput:
        """One decoding step that only touches the positions still masked.

        logits_at_masked (B, M, K) are the logits at masked_positions (B, M), flat indices into the
        token grid of `sample` ((B, H, W) or (B, L)); every listed position must hold the mask token
        and no other may. Known tokens never change, so the official step's draws for them and its
        comparisons against them are dropped: the same number of tokens stays masked after every step
        as with `step` (exactly `masked_after_step` from an all-mask start), and the re-masked ones
        are the least confident by the same noisy-confidence rule. What differs is the random stream:
        only M multinomial and M uniform numbers are drawn per step instead of L each, so a seeded run
        does not reproduce `step`'s tokens. Exactly mask_len positions are re-masked even when
        confidences tie (the official comparison would then re-mask fewer).

        draw="inverse_cdf" samples the tokens with `draw_categorical` (one uniform per position)
        instead of `torch.multinomial` (one exponential per position and code on CPU): the same
        distribution, another random stream, and on CPU tens of times cheaper for 8192 codes.
        """
        if draw not in DRAWS:
            raise InputError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
        mask_id = self.config.mask_token_id
        flat = sample.reshape(sample.shape[0], -1)
        b, m, k = logits_at_masked.shape
        if masked_positions.shape != (b, m):
            raise InputError(f"masked_positions must be ({b}, {m}) to match the logits, got {tuple(masked_positions.shape)}")
        n = self.num_inference_steps
        if not 0 <= step_index < n:
            raise InputError(f"step_index {step_index} outside 0..{n - 1}")
        positions = masked_positions.to(flat.device)
        probs = logits_at_masked.float().softmax(dim=-1)
        gen_device = generator.device if generator is not None else probs.device
        if m:
            if draw == "inverse_cdf":
                draws = draw_categorical(probs.reshape(-1, k), generator).view(b, m).to(flat.device)
            else:
                draws = torch.multinomial(probs.reshape(-1, k).to(gen_device), 1, generator=generator)
                draws = draws[:, 0].view(b, m).to(flat.device)
        else:
            draws = torch.empty(b, 0, dtype=flat.dtype, device=flat.device)
        pred = flat.scatter(1, positions, draws.to(flat.dtype))

        if step_index == n - 1 or m == 0:
            still = positions[:, :0]
            prev = pred
        else:
            raw = int(self.raw_mask_len(step_index, flat.shape[1], starting_mask_ratio))
            mask_len = min(m, max(1, min(m - 1, raw)))
            selected = torch.gather(probs, -1, draws.to(probs.device)[:, :, None])[:, :, 0]
            uniform = torch.zeros_like(selected, device=gen_device).uniform_(0, 1, generator=generator).to(selected.device)
            confidence = torch.log(selected.clamp(1e-20)) + self.temperatures[step_index].to(selected.device) * _gumbel(uniform)
            least = confidence.topk(mask_len, dim=-1, largest=False).indices.to(flat.device)
            still = torch.gather(positions, 1, least).sort(dim=-1).values
            prev = pred.scatter(1, still, mask_id)
        return MaskedStepOutput(prev_sample=prev.view_as(sample), pred_original_sample=pred.view_as(sample), masked_positions=still)
