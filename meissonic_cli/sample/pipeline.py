"""Text-to-image sampling: `MeissonicPipeline` loads a released-layout model folder and runs MaskGIT
parallel decoding with classifier-free guidance (paper section 2.3).

Python API::

    from meissonic_cli.sample.pipeline import MeissonicPipeline

    pipe = MeissonicPipeline.from_pretrained("path/to/Meissonic", device="auto", dtype="fp32")
    images = pipe(["a watercolor fox in the snow", "a red bicycle"], steps=48, guidance_scale=9.0, seed=0)
    images[0].save("fox.png")

The diffusers spelling works too (`call_args`): `from_pretrained(path, torch_dtype=..., variant="fp16")`,
`.to(device)`, `pipe(prompt=..., num_inference_steps=..., num_images_per_prompt=..., generator=...,
output_type="pil"|"np"|"pt", return_dict=...).images`.

`from_pretrained(folder)` reads the released layout: transformer/, vqvae/, text_encoder/,
tokenizer/ (optional: CLIP's BPE ships with open_clip) and scheduler/. A Hugging Face repo id such
as `MeissonFlow/Meissonic` is accepted only when it is already in the local Hugging Face cache, or
with `allow_download=True` (and HF_HUB_OFFLINE unset); otherwise download it first with
`hf download MeissonFlow/Meissonic` (`model.hub`). `variant="fp16"` reads the `*.fp16.safetensors`
weights; a folder holding only one variant's weights loads them and says so (`model.hub.model_variant`).

Calling the pipeline (`__call__`): prompts (a string or a list; or `prompt`), `negative_prompt` (default "",
one string or one per prompt), `steps` (48; or `num_inference_steps`), `num_images_per_prompt` (1), `guidance_scale` (9; CFG runs when it is > 1),
`height`/`width` (default: `default_resolution`, i.e. a 64x64 token grid (1024 px with the
released f=16 VQ) for a model with 2x2 compression and a 32x32 grid (512 px) without; both must be
multiples of `pixel_multiple`), `temperature` ((2, 0), or one number tau for linspace(tau, 0.01)),
`token_temperature` (1: the logits are divided by it before each token draw; 1 is the official
sampler, below 1 sharpens the draws towards each position's most likely codes), `micro_conds` (default (width, height, 0, 0, 6)), `seed` (one int for the batch, or one per image)
or `generator`, `callback(step, steps)`, `output_type` ("pil" -> list of PIL images, "np"/"pt" -> the
images batched as diffusers returns them, "codes" -> int64 (B, h, w) code grids, "tensor" -> float
(B, 3, H, W) in [0, 1]), `return_dict` (False: the tuple `(images,)`), `exact`, `init_tokens` and `sampler` (`samplers.SamplerOptions`; None = official),
`vq_decode` ("auto" | "whole" | "banded": how the VQ decodes, `model.vq_decode`; "whole" is the official decode).

`init_tokens` (B, h, w) starts decoding from given token grids instead of an all-mask grid: the
positions holding the mask id are decoded, every other token comes back bit-identical (what
inpainting, outpainting and mask-free editing need, `meissonic_cli.sample.edit`). With M of the L tokens
masked the schedule runs with starting_mask_ratio M/L, as the official inpainting pipeline does, in
both loops. `pipe.logits(tokens, prompts)` gives the guided logits of one forward over given tokens.

The sampling loop (`sample_tokens`):
- starts from an all-mask grid (or `init_tokens`); text features, the pooled/micro-condition
  embedding and the rotary tables are computed once per call (`MeissonicTransformer.prepare_conditioning`,
  for the negative and the positive prompts together), so a step only recomputes the timestep embedding;
- runs the negative and positive prompts as one batch [uncond, cond] per step, embedding the
  shared tokens once, and runs the transformer's head only at the positions still masked, up to
  its last layer (`forward_cached(..., positions, head="hidden")`); since that layer is linear, the
  guidance mix `uncond + s*(cond - uncond)` is taken on its input and the 8192-way projection runs
  for B rows instead of 2B (`masked_logits`; equal to the official logits within float rounding);
- steps the scheduler with `step_masked`, which keeps exactly the official number of tokens masked
  after every step (`MaskGITScheduler.masked_after_step`), drawing tokens by inverse CDF (one random
  number per masked position instead of one per position and code).
The timestep passed to the transformer is the scheduler's t as a (1,) int64 tensor, as in the
official pipeline (the model multiplies it by 1000).

A guidance-distilled model (`guidance_embeds`, from `meissonic distill`) runs ONE forward per step with
`guidance_scale` fed to its embedding; only the empty negative prompt is supported (`guidance.py`).

`exact=True` runs the official loop instead (`exact_logits`): the full forward (conditioning
recomputed, logits for every position) and the official `scheduler.step`, whose random draws cover
every position. Given the same seed and device it reproduces the official sampler's tokens up to
float rounding of the logits; the fast loop draws only for masked positions, so its tokens differ
for the same seed while following the same distribution. Seeded runs of either mode are
reproducible on the same device and batch layout. With a list of seeds each image draws from its
own generator.

`from_pretrained(..., lora=["PATH[:SCALE]", ...])` stacks LoRA adapter files unmerged (`model.lora.apply_lora`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from meissonic_cli.device import dtype_table, resolve_device, resolve_dtype, trim_host_memory
from meissonic_cli.errors import InputError, ModelFormatError
from meissonic_cli.model.hub import HUB_ID, model_variant, resolve_model_folder
from meissonic_cli.model.lora import apply_lora
from meissonic_cli.model.scheduler import MaskGITScheduler
from meissonic_cli.model.transformer import Conditioning, MeissonicTransformer
from meissonic_cli.model.vq_decode import vq_decode_for
from meissonic_cli.sample.call_args import (
    OUTPUT_TYPES,
    check_output_type,
    move_pipeline,
    one_of,
    prompt_list,
    repeat_per_prompt,
    wrap_output,
)
from meissonic_cli.sample.guidance import check_negative_prompts, embeds_guidance, guidance_batch
from meissonic_cli.sample.model_folder import check_model_folder, need_file
from meissonic_cli.sample.offload import check_low_vram, load_transformer, place_parts
from meissonic_cli.sample.samplers import run_sampler_loop, uses_sampler_loop

DTYPES = dtype_table()
# Token grid of the default resolution: the released 1024px model (with 2x2 compression) samples
# a 64x64 grid, the 512px Monetico-style model (without) a 32x32 grid.
DEFAULT_GRID_COMPRESSED = 64
DEFAULT_GRID_PLAIN = 32
DEFAULT_MICRO_SCORE = 6.0
# How the fast loop draws tokens: inverse CDF needs one random number per position, torch.multinomial
# one per position and code (8192), which on CPU costs as much as a tenth of a step.
DRAW = "inverse_cdf"

ProgressCallback = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------
# The sampling loop


def _generators(seed: Union[int, Sequence[int], None], generator: Any, batch: int,
                device: torch.device) -> Union[torch.Generator, list[torch.Generator], None]:
    if generator is not None and seed is not None:
        raise InputError("give either seed or generator, not both")
    if generator is not None:
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise InputError(f"{len(generator)} generators for {batch} prompts; give one per prompt or a single one")
        return list(generator) if isinstance(generator, (list, tuple)) else generator
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise InputError(f"{len(seed)} seeds for {batch} prompts; give one per prompt or a single int")
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    return torch.Generator(device=device).manual_seed(int(seed))


def exact_logits(transformer: MeissonicTransformer, tokens: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 pooled: torch.Tensor, micro_conds: torch.Tensor, guidance_scale: Optional[float] = None) -> torch.Tensor:
    """Logits (B, K, H, W) as the official pipeline computes them: the full forward, with guidance
    `uncond + s*(cond - uncond)` when guidance_scale is given (text/pooled/micro_conds then hold
    2B rows, [uncond, cond]); a guidance-embedded transformer: one forward, guidance_scale its input."""
    if embeds_guidance(transformer):
        return transformer(tokens, text, pooled, timestep, micro_conds=micro_conds, guidance=guidance_scale)
    if guidance_scale is None:
        return transformer(tokens, text, pooled, timestep, micro_conds=micro_conds)
    uncond, cond = transformer(torch.cat([tokens, tokens]), text, pooled, timestep, micro_conds=micro_conds).chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def masked_logits(transformer: MeissonicTransformer, tokens: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                  positions: torch.Tensor, guidance_scale: Optional[float] = None) -> torch.Tensor:
    """The fast loop's logits (B, M, K) at positions (B, M): `exact_logits` gathered there, computed
    with the conditioning prepared once (`cond`, 2B rows [uncond, cond] when guidance_scale is given;
    a guidance-embedded transformer's `cond` holds the scale and guidance_scale is None)."""
    if guidance_scale is None:
        return transformer.forward_cached(tokens, timestep, cond, positions=positions)
    uncond, guided = transformer.forward_cached(tokens, timestep, cond, positions=positions, head="hidden").chunk(2)
    # The head's last layer is linear without bias: mixing its input equals mixing its output, and
    # the 8192-way projection then runs on B rows instead of 2B.
    return transformer.mlm_layer.logits_tokens(uncond + guidance_scale * (guided - uncond))


def check_token_temperature(value: float) -> float:
    """`value` as a float if it is a usable token temperature (finite, > 0), else InputError."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and t > 0):
        raise InputError(f"token temperature must be a number > 0 (1 = the official sampler), got {value!r}")
    return t


def _check_init_tokens(init_tokens: torch.Tensor, b: int, grid_hw: tuple[int, int],
                       mask_id: int) -> tuple[torch.Tensor, int]:
    """init_tokens as int64 (B, H, W) and the number of masked positions, which every row must share."""
    tokens = torch.as_tensor(init_tokens)
    if tokens.dim() == 2:
        tokens = tokens[None]
    if tuple(tokens.shape) != (b, *grid_hw) or tokens.is_floating_point() or tokens.is_complex():
        raise InputError(f"init_tokens must be integer token grids of shape ({b}, {grid_hw[0]}, {grid_hw[1]}), "
                         f"got {tokens.dtype} {tuple(tokens.shape)}")
    counts = (tokens.reshape(b, -1) == mask_id).sum(1).tolist()
    if len(set(counts)) > 1:
        raise InputError(f"init_tokens rows have {counts} masked positions; every row of a batch must have the same "
                         f"number (decode rows with different masks in separate calls)")
    return tokens.to(torch.long, copy=True), int(counts[0])


def sample_tokens(
    transformer: MeissonicTransformer,
    scheduler: MaskGITScheduler,
    text: torch.Tensor,
    pooled: torch.Tensor,
    micro_conds: torch.Tensor,
    grid_hw: tuple[int, int],
    steps: int = 48,
    guidance_scale: float = 9.0,
    negative_text: Optional[torch.Tensor] = None,
    negative_pooled: Optional[torch.Tensor] = None,
    temperature: Union[float, Sequence[float]] = (2, 0),
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    callback: Optional[ProgressCallback] = None,
    exact: bool = False,
    num_codes: Optional[int] = None,
    init_tokens: Optional[torch.Tensor] = None,
    token_temperature: float = 1.0,
    sampler: Any = None, trace: Optional[dict] = None,
    first_step: int = 0,
    starting_mask_ratio: Optional[float] = None,
) -> torch.Tensor:
    """MaskGIT decoding from an all-mask grid (or from `init_tokens`); returns int64 code grids (B, H, W).

    text (B, T, joint_dim), pooled (B, P) and micro_conds (B, 5) condition the prompts; with
    guidance_scale > 1 the negative features (same shapes) are required. `generator` is one
    generator for the batch, or one per row (each row then draws from its own). `num_codes` limits
    sampling to the first codes (for a VQ with a smaller codebook than the transformer's head).
    `init_tokens` (B, H, W) starts from a partial grid (inpainting, outpainting, editing): only its
    mask-id positions are decoded, every other token comes back unchanged. Every row must hold the
    same number M of masked positions; the schedule then runs with starting_mask_ratio M/L, so the
    count still masked after each step is `masked_after_step(steps, L, M/L)`.
    `token_temperature` divides the (guided) logits before each draw; 1 leaves them as the official
    sampler uses them. See the module docstring for the fast and the `exact` loop; `sampler`
    (`samplers.SamplerOptions`, None = official) runs `samplers.run_sampler_loop` (which fills `trace`).
    `first_step` > 0 runs only steps first_step..steps-1 and `starting_mask_ratio` replaces M/L
    (the official img2img rule, `edit.py`: the last part of the steps with ratio 1).
    """
    b = text.shape[0]
    grid_h, grid_w = int(grid_hw[0]), int(grid_hw[1])
    seq_len = grid_h * grid_w
    embedded = embeds_guidance(transformer)  # one forward over the prompts' rows, the scale fed to the embedding
    guided = guidance_scale > 1.0 and not embedded
    device = transformer.device
    per_row = isinstance(generator, (list, tuple))
    token_temperature = check_token_temperature(token_temperature)
    if per_row and len(generator) != b:
        raise InputError(f"{len(generator)} generators for a batch of {b}")
    all_text, all_pooled, all_micro = guidance_batch(text, pooled, micro_conds, negative_text, negative_pooled,
                                                     guidance_scale, embedded)
    mask_id = scheduler.config.mask_token_id
    if init_tokens is None:
        latents = torch.full((b, grid_h, grid_w), mask_id, dtype=torch.long, device=device)
        masked, ratio = seq_len, 1.0
    else:
        latents, masked = _check_init_tokens(init_tokens, b, (grid_h, grid_w), mask_id)
        latents = latents.to(device)
        if masked == 0:
            return latents
        ratio = masked / seq_len
    if starting_mask_ratio is not None:
        ratio = float(starting_mask_ratio)
    if not 0 <= int(first_step) < steps:
        raise InputError(f"first_step must be in 0..{steps - 1}, got {first_step}")
    scheduler.set_timesteps(steps, temperature, device=device)

    def limit(logits: torch.Tensor, dim: int) -> torch.Tensor:
        if num_codes is not None and num_codes < logits.shape[dim]:
            logits = logits.narrow(dim, 0, num_codes)
        return logits if token_temperature == 1.0 else logits / token_temperature

    custom = uses_sampler_loop(sampler, scheduler, exact, int(first_step))
    with torch.inference_mode():
        if exact:
            # The official loop: every step recomputes the conditioning and the logits of every position.
            for i, t in list(enumerate(scheduler.timesteps))[int(first_step):]:
                logits = limit(exact_logits(transformer, latents, t.view(1).long(), all_text, all_pooled, all_micro,
                                            guidance_scale if guided or embedded else None), 1)
                if per_row:
                    latents = torch.cat([scheduler.step(logits[r:r + 1], t, latents[r:r + 1], generator[r],
                                                        starting_mask_ratio=ratio).prev_sample for r in range(b)])
                else:
                    latents = scheduler.step(logits, t, latents, generator, starting_mask_ratio=ratio).prev_sample
                if callback is not None:
                    callback(i + 1, steps)
            return latents

        cond = transformer.prepare_conditioning(all_text, all_pooled, all_micro, (grid_h, grid_w),
                                                guidance=float(guidance_scale) if embedded else None)
        if init_tokens is None:
            positions = torch.arange(seq_len, device=device).expand(b, seq_len)
        else:
            # nonzero lists row by row in ascending order, and every row has `masked` entries.
            positions = (latents.reshape(b, seq_len) == mask_id).nonzero()[:, 1].view(b, masked)
        if custom:
            return run_sampler_loop(transformer, scheduler, cond, latents, positions, steps,
                                    guidance_scale if guided else None, generator, ratio, limit, sampler, callback, trace)
        for i, t in list(enumerate(scheduler.timesteps))[int(first_step):]:
            logits = limit(masked_logits(transformer, latents, t.view(1).long(), cond, positions,
                                         guidance_scale if guided else None), 2)
            if per_row:
                outs = [scheduler.step_masked(logits[r:r + 1], positions[r:r + 1], latents[r:r + 1], i, generator[r],
                                              starting_mask_ratio=ratio, draw=DRAW) for r in range(b)]
                latents = torch.cat([o.prev_sample for o in outs])
                positions = torch.cat([o.masked_positions for o in outs])
            else:
                out = scheduler.step_masked(logits, positions, latents, i, generator, starting_mask_ratio=ratio,
                                            draw=DRAW)
                latents, positions = out.prev_sample, out.masked_positions
            if callback is not None:
                callback(i + 1, steps)
    return latents


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass
class MeissonicPipeline:
    """Transformer + scheduler + text encoder + VQ, loaded from one released-layout folder."""

    transformer: MeissonicTransformer
    scheduler: MaskGITScheduler
    text_encoder: Any  # meissonic_cli.model.text_encoder.TextEncoder
    vq: Any  # meissonic_cli.model.vq.vqgan.VQTokenizer (or what vq.load_vq returns)
    model_path: Optional[Path] = None
    loras: list = dataclasses.field(default_factory=list)  # model.lora.AppliedLoRA per --lora, in order
    offloader: Any = None  # sample.offload.Offloader, with --offload model|sequential
    text_memo: dict = dataclasses.field(default_factory=dict, repr=False)  # prompt -> (text, pooled) on the CPU

    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, Path] = HUB_ID,
        device: Union[str, torch.device, None] = "auto",
        dtype: Union[str, torch.dtype, None] = None,
        allow_download: bool = False,
        text_encoder: Union[str, Path, None] = None,
        variant: Optional[str] = None,
        torch_dtype: Union[str, torch.dtype, None] = None,
        lora: Union[str, Path, Sequence[Any], None] = None,
        quantize: str = "none",
        offload: str = "none",
        compile: bool = False,
    ) -> "MeissonicPipeline":
        """Load a released-layout folder (or a cached Hugging Face repo id) onto `device` in `dtype`.

        `dtype` (or diffusers' `torch_dtype`; default fp32) is the transformer's and the text encoder's (as
        diffusers' `torch_dtype`; the encoder's LayerNorms stay float32); the VQ runs in float32 when its
        config asks for it (`force_upcast`, as the released one does). `variant` ("fp16"/"bf16") reads each part's `*.fp16.safetensors` weights where
        it has them (`model.hub.model_variant`).
        `text_encoder`: another text encoder folder to use (`TextEncoder.for_model`), e.g. the laion
        CLIP-ViT-H-14 CLIPModel folder the official scripts load; prompts keep the model's tokenizer.
        `quantize` (none|int8|fp8|int4), `offload` (none|model|sequential), `compile`: see `sample.offload`.
        """
        from meissonic_cli.model.text_encoder import HF_CONFIG, TextEncoder
        from meissonic_cli.model.vq import load_vq

        dev = resolve_device(device)
        dt = resolve_dtype(one_of(torch_dtype, dtype, "torch_dtype", "dtype", "fp32"))
        home = check_low_vram(quantize, offload, compile, dev, dt)  # where the parts live between stages
        root = resolve_model_folder(model, allow_download=allow_download)
        if text_encoder is not None:
            need_file(Path(text_encoder).expanduser(), [HF_CONFIG], "--text-encoder config")
        check_model_folder(root, text_encoder=text_encoder is None)
        variant = model_variant(root, variant)
        # Smallest parts first, so a broken folder fails before the transformer's weights are read.
        scheduler = MaskGITScheduler.from_config_dir(root / "scheduler")
        # Sampling only decodes: the VQ's encoder is read when an edit first encodes (0.22 GiB for the released VQ).
        vq = load_vq(root / "vqvae", dtype=dt, variant=variant, decode_only=True).to(home).eval()
        encoder = TextEncoder.for_model(root, text_encoder and Path(text_encoder).expanduser(),
                                        dtype=dt, variant=variant).to(home).eval()
        trim_host_memory()  # the float32 copies the text encoder was cast from, before the transformer comes
        transformer = load_transformer(root, dt, dev, home, quantize, variant)
        pipe = cls(transformer=transformer, scheduler=scheduler, text_encoder=encoder, vq=vq, model_path=root,
                   loras=apply_lora(transformer, lora))
        pipe.check_parts()
        trim_host_memory()  # what loading freed (float32 tensors cast on the way) leaves the process
        return place_parts(pipe, offload, compile, dev)

    def to(self, *args: Any, device: Union[str, torch.device, None] = None,
           dtype: Union[str, torch.dtype, None] = None) -> "MeissonicPipeline":
        """Move the pipeline to a device and/or the transformer and text encoder to a dtype, as diffusers'
        `pipe.to("cuda")` / `pipe.to(torch.float16)`; the VQ keeps its own precision."""
        return move_pipeline(self, args, device, dtype)

    def check_parts(self) -> None:
        """Raise ModelFormatError if the parts do not fit together."""
        cfg = self.transformer.config
        problems = []
        if self.scheduler.config.mask_token_id != cfg.mask_token_id:
            problems.append(f"scheduler mask_token_id {self.scheduler.config.mask_token_id} != transformer vocab_size-1 "
                            f"({cfg.mask_token_id})")
        if self.text_encoder.width != cfg.joint_attention_dim:
            problems.append(f"text encoder width {self.text_encoder.width} != transformer joint_attention_dim "
                            f"{cfg.joint_attention_dim}")
        if self.text_encoder.pooled_dim != cfg.pooled_projection_dim:
            problems.append(f"text encoder projection size {self.text_encoder.pooled_dim} != transformer "
                            f"pooled_projection_dim {cfg.pooled_projection_dim}")
        if self.vq.codebook_size > cfg.codebook_size:
            problems.append(f"VQ codebook ({self.vq.codebook_size}) is larger than the transformer's ({cfg.codebook_size})")
        if problems:
            where = f" in {self.model_path}" if self.model_path else ""
            raise ModelFormatError(f"model parts do not fit together{where}: {'; '.join(problems)}")

    @property
    def device(self) -> torch.device:
        """The execution device (with offload the parts sit on the CPU between their stages)."""
        return self.offloader.device if self.offloader is not None else self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: the VQ factor, times 2 with the 2x2 compression."""
        return int(self.vq.downsample_factor) * (2 if self.transformer.config.downsample else 1)

    @property
    def default_resolution(self) -> int:
        """Side of the default square image: a 64x64 token grid with compression, 32x32 without."""
        grid = DEFAULT_GRID_COMPRESSED if self.transformer.config.downsample else DEFAULT_GRID_PLAIN
        return grid * int(self.vq.downsample_factor)

    def check_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) for an image size, or InputError naming the valid sizes."""
        m = self.pixel_multiple
        bad = [s for s in (height, width) if int(s) <= 0 or int(s) % m]
        if bad:
            s = int(bad[0])
            lower, upper = max(m, s // m * m), max(m, -(-s // m) * m)
            near = f"{lower}" if lower == upper else f"{lower} or {upper}"
            why = f"the VQ factor {self.vq.downsample_factor}" + (" x 2 for the model's 2x2 compression"
                                                                  if self.transformer.config.downsample else "")
            raise InputError(f"resolution {width}x{height} is not divisible by {m} ({why}); use multiples of {m} "
                             f"(nearest to {s}: {near}; default {self.default_resolution})")
        f = int(self.vq.downsample_factor)
        return int(height) // f, int(width) // f

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (B, 77, D), pooled (B, P)) in the transformer's dtype."""
        if prompts and all(p in self.text_memo for p in prompts):
            seq = torch.stack([self.text_memo[p][0] for p in prompts])
            pooled = torch.stack([self.text_memo[p][1] for p in prompts])
            return seq.to(self.device, self.dtype), pooled.to(self.device, self.dtype)
        with torch.inference_mode():
            seq, pooled = self.text_encoder.encode(list(prompts))
        return seq.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    def __call__(
        self,
        prompts: Union[str, Sequence[str], None] = None,
        negative_prompt: Union[str, Sequence[str]] = "",
        steps: Optional[int] = None,
        guidance_scale: float = 9.0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        temperature: Union[float, Sequence[float]] = (2, 0),
        micro_conds: Optional[Union[Sequence[float], torch.Tensor]] = None,
        seed: Union[int, Sequence[int], None] = None,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        callback: Optional[ProgressCallback] = None,
        output_type: str = "pil",
        exact: bool = False,
        init_tokens: Optional[torch.Tensor] = None,
        token_temperature: float = 1.0,
        sampler: Any = None,
        first_step: int = 0,
        starting_mask_ratio: Optional[float] = None,
        vq_decode: str = "whole",
        *,
        prompt: Union[str, Sequence[str], None] = None,
        num_inference_steps: Optional[int] = None,
        num_images_per_prompt: int = 1,
        return_dict: bool = True,
    ) -> Any:
        """Generate `num_images_per_prompt` images per prompt; see the module docstring for every argument
        and `call_args` for the diffusers spellings (`prompt`, `num_inference_steps`, `return_dict`).

        `init_tokens` (B, h, w) decodes only the mask-id positions of given token grids (see
        `sample_tokens`); height and width then default to the grid's image size.
        """
        prompts, negative_prompt = repeat_per_prompt(prompt_list(prompt, prompts), negative_prompt,
                                                     num_images_per_prompt)
        steps = one_of(num_inference_steps, steps, "num_inference_steps", "steps", 48)
        check_output_type(output_type)
        if int(steps) < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        if init_tokens is not None and height is None and width is None:
            f = int(self.vq.downsample_factor)
            height, width = int(init_tokens.shape[-2]) * f, int(init_tokens.shape[-1]) * f
        height, width, grid = self._image_size(height, width)
        vq_decode_for(self.vq, height, width, vq_decode)  # a bad mode fails before the steps
        # exact: CPU generators (as diffusers pipelines draw), so a seed gives one random stream on every device.
        gens = _generators(seed, generator, len(prompts), torch.device("cpu") if exact else self.device)
        text, pooled, neg_text, neg_pooled, micro = self._prompt_inputs(prompts, negative_prompt, guidance_scale,
                                                                        width, height, micro_conds)
        codes = sample_tokens(
            self.transformer, self.scheduler, text, pooled, micro, grid, steps=int(steps),
            guidance_scale=float(guidance_scale), negative_text=neg_text, negative_pooled=neg_pooled,
            temperature=temperature, generator=gens, callback=callback, exact=exact, num_codes=self._num_codes(),
            init_tokens=init_tokens, token_temperature=token_temperature, sampler=sampler,
            first_step=first_step, starting_mask_ratio=starting_mask_ratio,
        )
        if output_type == "codes":
            return codes
        return wrap_output(self.vq.decode(codes, vq_decode), output_type, return_dict)

    def logits(
        self,
        tokens: torch.Tensor,
        prompts: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[str]] = "",
        guidance_scale: float = 9.0,
        timestep: int = 0,
        positions: Optional[torch.Tensor] = None,
        micro_conds: Optional[Union[Sequence[float], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Guided logits (B, M, K) of token grids (B, h, w) at flat `positions` (B, M) (default: every
        position), from one forward at `timestep` (0 is the nothing-masked end of the schedule); K is
        the VQ's codebook size. The same logits the fast sampling loop draws from."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        f = int(self.vq.downsample_factor)
        grid = (int(tokens.shape[-2]), int(tokens.shape[-1]))
        width, height = grid[1] * f, grid[0] * f
        tokens = tokens.reshape(-1, *grid).to(self.device, torch.long)
        if tokens.shape[0] != len(prompts):
            raise InputError(f"{tokens.shape[0]} token grids for {len(prompts)} prompts")
        text, pooled, neg_text, neg_pooled, micro = self._prompt_inputs(prompts, negative_prompt, guidance_scale,
                                                                        width, height, micro_conds)
        if positions is None:
            positions = torch.arange(grid[0] * grid[1], device=self.device).expand(len(prompts), -1)
        embedded = embeds_guidance(self.transformer)
        guided = guidance_scale > 1.0 and not embedded
        with torch.inference_mode():
            cond = self.transformer.prepare_conditioning(
                *guidance_batch(text, pooled, micro, neg_text, neg_pooled, guidance_scale, embedded), grid,
                guidance=float(guidance_scale) if embedded else None)
            out = masked_logits(self.transformer, tokens, torch.tensor([int(timestep)], device=self.device), cond,
                                positions.to(self.device), float(guidance_scale) if guided else None)
        num_codes = self._num_codes()
        return out if num_codes is None else out[..., :num_codes]

    def _num_codes(self) -> Optional[int]:
        """The VQ's codebook size when it is smaller than the transformer's head (sampling stays inside it)."""
        vq_codes = int(self.vq.codebook_size)
        return vq_codes if vq_codes < self.transformer.config.codebook_size else None

    def _image_size(self, height: Optional[int], width: Optional[int]) -> tuple[int, int, tuple[int, int]]:
        height = int(height or width or self.default_resolution)
        width = int(width or height)
        return height, width, self.check_resolution(height, width)

    def _prompt_inputs(self, prompts: list[str], negative_prompt: Union[str, Sequence[str]], guidance_scale: float,
                       width: int, height: int, micro_conds: Any) -> tuple[torch.Tensor, ...]:
        """(text, pooled, negative text or None, negative pooled or None, micro_conds) for the prompts;
        the negative prompts are encoded only when guidance runs."""
        if not prompts:
            raise InputError("no prompts given")
        b = len(prompts)
        negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != b:
            raise InputError(f"{len(negatives)} negative prompts for {b} prompts; give one, or one per prompt")
        micro = self._micro_conds(micro_conds, b, width, height)
        check_negative_prompts(negatives, self.transformer)
        text, pooled = self.encode_prompts(prompts)
        neg_text = neg_pooled = None
        if guidance_scale > 1.0 and not embeds_guidance(self.transformer):
            neg_text, neg_pooled = self.encode_prompts(negatives)
        return text, pooled, neg_text, neg_pooled, micro

    def _micro_conds(self, micro_conds: Any, b: int, width: int, height: int) -> torch.Tensor:
        if micro_conds is None:
            micro = torch.tensor([[width, height, 0, 0, DEFAULT_MICRO_SCORE]], dtype=torch.float32)
        else:
            micro = torch.as_tensor(micro_conds, dtype=torch.float32)
            if micro.dim() == 1:
                micro = micro[None]
        if micro.dim() != 2 or micro.shape[1] != 5 or micro.shape[0] not in (1, b):
            raise InputError(f"micro_conds must be 5 numbers (orig_width, orig_height, crop_top, crop_left, score) "
                             f"or ({b}, 5), got shape {tuple(micro.shape)}")
        return micro.expand(b, 5).to(self.device)


__all__ = ["DTYPES", "HUB_ID", "OUTPUT_TYPES", "MeissonicPipeline", "check_model_folder", "exact_logits", "guidance_batch",
           "masked_logits", "resolve_device", "resolve_dtype", "resolve_model_folder", "sample_tokens"]
