"""Zero-shot editing (paper section 3.2): mask the right tokens, decode them with the sampler.

The transformer learned P(x_i | x_visible) for arbitrary visible subsets, so every edit is the same
three moves: encode the image to VQ tokens, replace the tokens to change by the mask id, and run
MaskGIT decoding from that partial grid with the new prompt (the pipeline's own sampling loop, given
`init_tokens`). Decoding starts with the masked fraction as the scheduler's `starting_mask_ratio` (as
the official inpainting pipeline does) and only ever writes masked positions, so every token that
was not masked comes out bit-identical.

Modes (the defaults follow the official scripts, github viiika/Meissonic `inpaint.py` and its
`InpaintPipeline` / `Img2ImgPipeline`; tests check them against their recorded outputs):
- `inpaint`: a mask image (white = repaint) or `--box x0,y0,x1,y1` (pixels, end-exclusive). The
  mask may have any size: like inpaint.py, the image and the mask are each resized to the working
  size with PIL's default filter (a line says so when their sizes differ). The mask then goes
  straight to the token grid with a Lanczos resize, to grey (ITU-R 601) and a token is repainted
  when its level is >= 128 of 255, the official rule (thin lines and specks under about half a token
  vanish; soft edges count by their weight). A box masks every token it touches. `--dilate N` then
  grows the token mask by N tokens (a (2N+1)^2 square). Inpainting and outpainting decode with the
  linear masking schedule from starting ratio M/L, which the official inpainting pipeline forces.
  Better than the official code: a mask that selects no token leaves the image as it is (the
  official loop re-masks one kept token per step), and any token grid works (the official mask
  preprocessing crashes unless the grid side is a multiple of 16, e.g. at 384 or 640 px).
- `outpaint`: `--extend left,top,right,bottom` pixels or `--target WxH` (the original centred). Each
  side is rounded to the nearest multiple of the VQ factor, plus one token where the model's 2x2
  compression needs an even grid. The original's tokens are its own encoding, placed on the canvas;
  the new area is masked.
- `edit` (mask-free, image-to-image), `--edit-rule`:
  - `official` (default, the official img2img rule): of n steps only the last int(n x strength) run;
    each token is masked independently with the probability the model's schedule gives at the step
    before them (cosine: cos(pi/2 (n - run)/n), e.g. 0.38/0.71/0.92 for strength 0.3/0.5/0.8 at 12
    steps), drawn from the seeded generator before decoding. Strength under 1/n runs no step (the
    image is kept). Better than the official code at strength 1: every token is masked (the
    official pipeline reads the t = 0 end of the schedule there, masks nothing and then re-masks
    one token per step).
  - `exact-count`: re-mask exactly round(strength x L) of the L tokens (at least one), uniformly at
    random, and run every step from starting ratio M/L.
  - `confidence`: the same count, the tokens the model finds least likely under the new prompt
    (one guided forward pass over the unmasked grid, at timestep 0 — the "nothing masked" end of
    both the sampler's and the trainer's timestep scale).
`--exact` runs the official sampler loop with a CPU generator (see `sample --exact`).

`--blend N` pastes the original pixels back outside the edited tokens with an N-pixel feathered seam
(the VQ round trip is lossy, so otherwise the kept region is the decoded tokens). Inputs whose sides
are not multiples of the model's pixel multiple are resized to the nearest ones (`--resolution`
picks a size instead); the sidecar records it.

Batch: `--cases FILE.jsonl`, one case per line (`image`, `prompt`, `mode`, `mask` or `box`, `extend` or
`target`, `strength`, `edit_rule`, `dilate`, `blend`, `seed`, `negative_prompt`, `steps`, `cfg`, `name`,
and `source_prompt`/`category`, which are copied to the sidecar for `eval`); missing fields take the
command's values, and case i's seed defaults to `--seed` + i. `--cases FILE.json` also reads the
official `cases.json` format: a JSON list of `{"input", "mask", "prompt", "negative_prompts"}`
(inpaint cases; a `null` negative prompt means none, a missing one the command's). Relative paths
are resolved against the cases file's folder, then the working directory. Each output is `NAME.png` + `NAME.json` (with `source`, the input image's
absolute path, for CLIP-I/DINO); the sidecar is written last and a rerun skips finished cases.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from meissonic_cli.config import Problems, check_number, field
from meissonic_cli.errors import InputError, OutputExistsError
from meissonic_cli.progress import key_value_table, make_progress
from meissonic_cli.safety import MAX_RESOLUTION
from meissonic_cli.sample.edit_cases import OFFICIAL_CASE_KEYS, parse_ints, parse_size, read_cases, single_case
from meissonic_cli.sample.edit_masks import (
    box_mask,
    check_working_size,
    dilate_tokens,
    feather_blend,
    image_size,
    img2img_mask_ratio,
    img2img_start,
    load_image,
    load_mask,
    mask_levels,
    mask_token_grid,
    open_resized,
    outpaint_layout,
    round_size,
    token_mask,
)
from meissonic_cli.sample.offload import check_pipeline_quantize
from meissonic_cli.sample.outputs import (
    check_case_limits,
    check_output_folder,
    check_replaceable,
    is_done,
    make_output_folder,
    model_identity,
    other_model,
    read_done_sidecar,
    write_output,
)
from meissonic_cli.sample.sample import (
    OFFICIAL_RESOLUTION,
    SampleConfig,
    changed_settings,
    generator_device,
    load_pipeline,
    slugify,
    text_encoder_label,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

MODES = ("inpaint", "outpaint", "edit")
EDIT_RULES = ("official", "exact-count", "confidence")
CASE_FIELDS = ("image", "prompt", "mode", "mask", "box", "extend", "target", "strength", "edit_rule", "dilate", "blend",
               "seed", "negative_prompt", "steps", "cfg", "name", "source_prompt", "category")
# Sidecar fields that must equal the current case's for a finished output to be skipped.
# Every edit setting reaches this comparison or is listed with its reason in tests/test_rerun_identity.py.
_MUST_MATCH = ("prompt", "mode", "source", "mask", "box", "extend", "target", "strength", "edit_rule", "dilate", "blend",
               "seed", "negative_prompt", "steps", "cfg", "temperature", "token_temperature", "exact", "text_encoder",
               "dtype", "generator", "variant", "quantize", "vq_decode")


@dataclass
class EditConfig:
    model: str = field("", help="Model folder in the released layout (transformer/, vqvae/, text_encoder/, tokenizer/, "
                                "scheduler/).", short="-m")
    image: Optional[str] = field(None, help="Image to edit (PNG/JPEG/WebP).", short="-i")
    prompt: Optional[str] = field(None, help="What the edited image should show (the whole image, not an instruction).",
                                  short="-p")
    mode: str = field("inpaint", help="inpaint (--mask or --box), outpaint (--extend or --target) or edit (mask-free, "
                                      "--strength).")
    mask: Optional[str] = field(None, help="Inpaint mask image, white where to repaint (any size: resized to the "
                                           "working size, then a token is repainted when the Lanczos-resized grey "
                                           "level is >= 128, the official rule). Unlike the official code, a mask "
                                           "that selects no token keeps the image, and any grid size works.")
    box: Optional[str] = field(None, help="Inpaint box instead of a mask: x0,y0,x1,y1 in pixels (end-exclusive).")
    dilate: int = field(0, bounds=(0, MAX_RESOLUTION), help="Grow the token mask by this many tokens on every side (inpaint).")
    blend: int = field(0, bounds=(0, MAX_RESOLUTION), help="Paste the original pixels back outside the edited tokens, feathered over this many "
                               "pixels at the seam (0: output the decoded tokens as they are).")
    extend: Optional[str] = field(None, help="Outpaint: pixels to add as left,top,right,bottom (rounded to the token "
                                             "grid).")
    target: Optional[str] = field(None, help="Outpaint: canvas size WxH, the original centred (instead of --extend).")
    strength: float = field(0.5, help="Mask-free edit strength in (0, 1]: with --edit-rule official the last "
                                      "int(steps x strength) steps run from a grid masked at their start ratio; "
                                      "otherwise the fraction of tokens to re-mask.")
    edit_rule: str = field("official", help="Mask-free edit: official (img2img: each token masked with the schedule's "
                                            "probability, last part of the steps; strength 1 masks all, unlike the "
                                            "official code), exact-count (round(strength x tokens) at random) or "
                                            "confidence (that many, least likely under the prompt).")
    resolution: Optional[str] = field(None, help="Resize the input to this size first (N or WxH). Default: its own size, "
                                                 "rounded to the nearest multiple the model accepts.")
    cases: Optional[str] = field(None, help="Batch: a .jsonl file, one case per line (image, prompt, mode, mask or box, "
                                            "extend or target, strength, seed, ...), or the official cases.json (a "
                                            "list of {input, mask, prompt, negative_prompts}); paths relative to the "
                                            "file's folder, then the working directory; - reads standard input.")
    out: str = field("edits", help="Output folder: NAME.png + NAME.json sidecar per case; reruns skip finished cases.",
                     short="-o")
    name: Optional[str] = field(None, help="Output name for a single case (default: NNNNN-MODE-PROMPT).")
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(steps=48),
                                 help="Sampler settings (steps, cfg, seed, negative prompt, temperature, device, dtype).")

    def validate(self) -> "EditConfig":
        p = Problems(self)
        p.check(bool(self.model), "--model is required (a released-layout model folder or a cached hub id)")
        p.check((self.cases is None) != (self.image is None),
                "give --image (with --prompt) for one edit, or --cases FILE.jsonl for a batch, not both")
        p.check(self.cases is None or self.prompt is None, "--prompt is given per line in --cases")
        try:
            self.sample.apply_preset()
        except InputError as err:
            p.check(False, str(err))
        if self.sample.preset == "official" and self.resolution is None:
            self.resolution = str(OFFICIAL_RESOLUTION)
        self.sample.check_schedule(p)
        self.sample.check_lora(p)
        p.raise_if_any()
        return self


@dataclass
class EditCase:
    """One edit, with every setting resolved and its paths absolute."""

    index: int
    image: Path
    prompt: str
    mode: str = "inpaint"
    mask: Optional[Path] = None
    box: Optional[tuple[int, int, int, int]] = None
    extend: Optional[tuple[int, int, int, int]] = None
    target: Optional[tuple[int, int]] = None
    strength: float = 0.5
    edit_rule: str = "official"
    dilate: int = 0
    blend: int = 0
    seed: int = 0
    negative_prompt: str = ""
    steps: int = 48
    cfg: float = 9.0
    name: Optional[str] = None
    resolution: Optional[tuple[int, int]] = None
    temperature: Any = (2.0, 0.0)  # sampler temperature: (start, end) or one number
    token_temperature: float = 1.0  # divides the logits before each token draw (1 = official)
    exact: bool = False  # the official sampler loop, with a CPU generator
    text_encoder: Optional[str] = None  # recorded in the sidecar (the pipeline holds the encoder)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # copied into the sidecar

    @property
    def stem(self) -> str:
        return self.name or f"{self.index:05d}-{self.mode}-{slugify(self.prompt)}"

    def check(self, where: str = "") -> None:
        """Raise InputError for settings that are wrong whatever the image (one line, naming the flag)."""
        at = f"{where}: " if where else ""
        if self.mode not in MODES:
            raise InputError(f"{at}unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not self.prompt.strip():
            raise InputError(f"{at}the prompt is empty; describe what the edited image should show")
        if self.mode == "inpaint" and (self.mask is None) == (self.box is None):
            raise InputError(f"{at}inpaint needs exactly one of --mask PNG (white = edit) or --box x0,y0,x1,y1")
        if self.mode == "outpaint" and (self.extend is None) == (self.target is None):
            raise InputError(f"{at}outpaint needs exactly one of --extend left,top,right,bottom or --target WxH")
        if self.mode == "edit" and not (0.0 < self.strength <= 1.0):
            raise InputError(f"{at}--strength must be in (0, 1] (the fraction of tokens to redraw), got {self.strength}")
        if self.mode == "edit" and self.edit_rule not in EDIT_RULES:
            raise InputError(f"{at}--edit-rule must be one of {', '.join(EDIT_RULES)}, got {self.edit_rule!r}")
        for name in ("dilate", "blend"):  # the flags' bounds, for --cases rows too
            check_number(getattr(self, name), f"{at}{name}" if at else f"--{name}", EditConfig, name)
        if self.steps < 1:
            raise InputError(f"{at}steps must be >= 1, got {self.steps}")
        if self.extend is not None and min(self.extend) < 0:
            raise InputError(f"{at}--extend values must be >= 0 pixels, got {','.join(map(str, self.extend))}")
        check_case_limits(self, at)

    def settings(self) -> dict[str, Any]:
        """What identifies this case's output (compared with a finished sidecar before skipping it)."""
        return {"prompt": self.prompt, "mode": self.mode, "source": str(self.image),
                "mask": str(self.mask) if self.mask else None, "box": list(self.box) if self.box else None,
                "extend": list(self.extend) if self.extend else None, "target": list(self.target) if self.target else None,
                "strength": self.strength if self.mode == "edit" else None,
                "edit_rule": self.edit_rule if self.mode == "edit" else None, "dilate": self.dilate, "blend": self.blend,
                "seed": self.seed, "negative_prompt": self.negative_prompt, "steps": self.steps, "cfg": self.cfg,
                "temperature": list(self.temperature) if isinstance(self.temperature, tuple) else [self.temperature],
                "token_temperature": self.token_temperature, "exact": self.exact,
                "text_encoder": text_encoder_label(self.text_encoder)}


@dataclass
class EditResult:
    """An edited image with the token grids before and after decoding."""

    image: "Image.Image"
    tokens_in: "torch.Tensor"  # (h, w) int64, the mask id where tokens were masked
    tokens_out: "torch.Tensor"  # (h, w) int64
    token_mask: "torch.Tensor"  # (h, w) bool, True = decoded
    size: tuple[int, int]  # output (width, height)
    resized_from: Optional[tuple[int, int]] = None

    @property
    def masked(self) -> int:
        return int(self.token_mask.sum())


# ----------------------------------------------------------------------------------------------
# Choosing the tokens to redraw


def remask_positions(tokens: "torch.Tensor", count: int, how: str, generator: Optional["torch.Generator"] = None,
                     logits: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """Flat indices (ascending) of the `count` tokens of `tokens` (1, h, w) to re-mask.

    random: a uniform draw; confidence: the lowest log-probabilities of the current tokens under
    `logits` (1, L, K), the guided logits of one forward with nothing masked
    (`MeissonicPipeline.logits(tokens, prompt, ...)`, timestep 0).
    """
    import torch

    n = tokens.numel()
    if how == "random":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gen_device)
        return order[:count].sort().values.to(tokens.device)
    if logits is None:
        raise InputError("confidence re-masking needs the model's logits of the current tokens")
    logp = torch.log_softmax(logits.float(), dim=-1)[0]
    current = torch.gather(logp, -1, tokens.reshape(-1, 1).to(logp.device))[:, 0]
    return current.topk(count, largest=False).indices.sort().values.to(tokens.device)


def _to_tensor(image: "Image.Image", device: Any) -> "torch.Tensor":
    from meissonic_cli.model.vq import images_to_tensor

    return images_to_tensor([image]).to(device)


def with_schedule(pipe: Any, masking_schedule: str) -> Any:
    """`pipe` sharing every model, with a scheduler of the given masking schedule (the official
    inpainting pipeline forces "linear" on its scheduler; this leaves `pipe`'s own untouched)."""
    import copy

    if pipe.scheduler.config.masking_schedule == masking_schedule:
        return pipe
    other = copy.copy(pipe)
    other.scheduler = type(pipe.scheduler)(pipe.scheduler.config, masking_schedule=masking_schedule)
    return other


def edit_image(pipe: Any, case: EditCase, callback: Optional[Callable[[int, int], None]] = None,
               vq_decode: str = "whole") -> EditResult:
    """Run one edit with a loaded `MeissonicPipeline`; checks the inputs before any model work. `vq_decode`:
    how the VQ decodes the result (`model.vq_decode`)."""
    import numpy as np
    import torch
    from PIL import Image

    from meissonic_cli.model.vq import tensor_to_images

    case.check()
    check_working_size(case, pipe)  # before the image is decoded
    image = load_image(case.image)
    f = int(pipe.vq.downsample_factor)
    multiple = int(pipe.pixel_multiple)
    box_pixels = None
    if case.mode == "inpaint" and case.mask is None:
        box_pixels = box_mask(case.box, image.size)  # type: ignore[arg-type]

    work_size = case.resolution or round_size(*image.size, multiple)
    pipe.check_resolution(work_size[1], work_size[0])
    resized_from = None
    if work_size != image.size:
        resized_from = image.size
        image = open_resized(case.image, work_size)  # as inpaint.py loads it
        if box_pixels is not None:
            box_pixels = np.asarray(Image.fromarray(box_pixels).resize(work_size, Image.NEAREST))

    device = pipe.device
    # --exact draws from a CPU generator (the same stream on every device), as diffusers pipelines do.
    generator = torch.Generator(device="cpu" if case.exact else device).manual_seed(int(case.seed))
    mask_id = pipe.scheduler.config.mask_token_id
    source_tokens = pipe.vq.encode(_to_tensor(image, pipe.vq.device)).to(device)  # (1, h, w)
    decoder, first_step, ratio = with_schedule(pipe, "linear"), 0, None

    if case.mode == "outpaint":
        cw, ch, left, top = outpaint_layout(image.size, f, bool(pipe.transformer.config.downsample),
                                            case.extend, case.target)
        pipe.check_resolution(ch, cw)
        gh, gw = ch // f, cw // f
        tokens = torch.full((1, gh, gw), mask_id, dtype=torch.long, device=device)
        th, tw = source_tokens.shape[1:]
        tokens[:, top // f:top // f + th, left // f:left // f + tw] = source_tokens
        keep_pixels = np.zeros((ch, cw), dtype=bool)
        keep_pixels[top:top + image.height, left:left + image.width] = True
        canvas = Image.new("RGB", (cw, ch))
        canvas.paste(image, (left, top))
        size = (cw, ch)
    else:
        size = image.size
        canvas = image
        tokens = source_tokens.clone()
        if case.mode == "inpaint":
            grid = tuple(source_tokens.shape[1:])
            if case.mask is not None:
                cells = mask_token_grid(load_mask(case.mask, work_size), grid, case.dilate)  # type: ignore[arg-type]
            else:
                cells = token_mask(box_pixels, f, case.dilate)  # type: ignore[arg-type]
            tokens[0][cells.to(device)] = mask_id
        elif case.edit_rule == "official":
            decoder = pipe
            first_step = img2img_start(case.steps, case.strength)
            if first_step < case.steps:
                # Scheduler.add_noise of the official img2img pipeline: one uniform draw per token from
                # the seeded generator, before any step.
                p = img2img_mask_ratio(pipe.scheduler.config.masking_schedule, case.steps, first_step)
                draw = torch.rand(tokens.shape, generator=generator, device=generator.device).to(device)
                tokens[draw < p.to(device)] = mask_id
                ratio = 1.0
        else:
            decoder = pipe
            count = max(1, int(round(case.strength * tokens.numel())))
            logits = None
            if case.edit_rule == "confidence":
                logits = pipe.logits(source_tokens, [case.prompt], case.negative_prompt, case.cfg)
            chosen = remask_positions(source_tokens, count, "confidence" if case.edit_rule == "confidence" else "random",
                                      generator, logits)
            tokens.view(-1)[chosen] = mask_id
        keep_pixels = None

    tokens_in = tokens.clone()
    if bool((tokens_in == mask_id).any()) and first_step < case.steps:
        # Decoding starts from the partial grid: only mask-id positions are drawn, the rest is kept as is.
        decoded_tokens = decoder([case.prompt], negative_prompt=case.negative_prompt, steps=case.steps,
                                 guidance_scale=case.cfg, width=size[0], height=size[1], temperature=case.temperature,
                                 token_temperature=case.token_temperature, exact=case.exact,
                                 generator=generator, callback=callback, output_type="codes", init_tokens=tokens,
                                 first_step=first_step, starting_mask_ratio=ratio, vq_decode=vq_decode)
    else:
        # Nothing to redraw (a mask that selects no token, or a strength that runs no step): the image
        # is kept as its tokens decode (the official loop would re-mask one kept token per step).
        decoded_tokens = tokens
    out = tensor_to_images(pipe.vq.decode(decoded_tokens, vq_decode))[0]
    edited = (tokens_in == mask_id)[0]
    if case.blend > 0:
        if keep_pixels is None:
            keep_pixels = ~np.kron(edited.cpu().numpy(), np.ones((f, f), dtype=bool))
        out = feather_blend(out, canvas, keep_pixels, case.blend)
    return EditResult(image=out, tokens_in=tokens_in[0].cpu(), tokens_out=decoded_tokens[0].cpu(),
                      token_mask=edited.cpu(), size=size, resized_from=resized_from)


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class EditRunResult:
    out_dir: Path
    written: list[Path] = dataclasses.field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    masked_tokens: list[int] = dataclasses.field(default_factory=list)




def _run_identity(cfg: EditConfig, pipeline: Any) -> dict[str, Any]:
    """The sidecar settings that come from the run, not the case: the transformer dtype, the generator's device,
    the weights variant, the quantization and the VQ decode."""
    from meissonic_cli.device import resolve_device, resolve_dtype

    dtype = pipeline.dtype if pipeline is not None else resolve_dtype(cfg.sample.dtype)
    device = pipeline.device if pipeline is not None else resolve_device(cfg.sample.device)
    return {"dtype": str(dtype).replace("torch.", ""), "generator": generator_device(cfg.sample.exact, device),
            "variant": cfg.sample.variant, "quantize": cfg.sample.quantize, "vq_decode": cfg.sample.vq_decode}


def _check_done_matches(out: Path, case: EditCase, model: Optional[dict[str, Any]] = None,
                        run: Optional[dict[str, Any]] = None) -> None:
    path = out / f"{case.stem}.json"
    done = read_done_sidecar(path)
    expected = {**case.settings(), **(run or {})}
    differ = changed_settings(done, expected, _MUST_MATCH) + other_model(done, model)
    if differ:
        raise OutputExistsError(f"{path.name} in {out} was made with different {', '.join(differ)}; nothing was "
                                f"written: use another --out or a different name")


def _precheck(case: EditCase) -> None:
    """Everything about a case's files that can fail, checked before the model loads."""
    check_working_size(case)  # from the header: an oversized image is refused before it is decoded
    image = load_image(case.image)
    if case.mode == "inpaint":
        if case.mask is not None:
            image_size(case.mask, "mask")
        else:
            box_mask(case.box, image.size)  # type: ignore[arg-type]
    if case.mode == "outpaint" and case.target is not None and (case.target[0] < image.width or case.target[1] < image.height):
        raise InputError(f"--target {case.target[0]}x{case.target[1]} is smaller than {case.image.name} "
                         f"({image.width}x{image.height}); outpainting only adds area")


def case_notes(pipe: Any, case: EditCase) -> list[str]:
    """One-line notices about how a case's inputs are read: a mask whose size differs from the image
    (both are resized to the working size, as inpaint.py does), or a mask that selects no token."""
    if case.mode != "inpaint" or case.mask is None:
        return []
    size = image_size(case.image)
    work = case.resolution or round_size(*size, int(pipe.pixel_multiple))
    mask_size = image_size(case.mask, "mask")
    notes = []
    if mask_size != size:
        notes.append(f"{case.stem}: mask {case.mask.name} is {mask_size[0]}x{mask_size[1]} and image {case.image.name} "
                     f"{size[0]}x{size[1]}: each is resized to {work[0]}x{work[1]}, as the official inpaint.py does")
    f = int(pipe.vq.downsample_factor)
    if not bool(mask_token_grid(load_mask(case.mask, work), (work[1] // f, work[0] // f)).any()):
        notes.append(f"{case.stem}: mask {case.mask.name} selects no token at {work[0]}x{work[1]} (a token is repainted "
                     f"where the mask averages at least half white); the image is kept as it is")
    return notes


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def run_edit(cfg: EditConfig, progress: bool = True, pipeline: Any = None,
             notify: Optional[Callable[[str], None]] = _stderr,
             on_step: Optional[Callable[[int, int], None]] = None) -> EditRunResult:
    """Run every case of `cfg` into `cfg.out`, skipping finished ones. Inputs are checked before the model loads.
    `notify` receives one line per notice about a case's inputs (`case_notes`); `on_step(step, total)`
    is called after each decoding step."""
    cfg.validate()
    cases = read_cases(cfg) if cfg.cases else [single_case(cfg)]
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder")
    check_output_folder(out)
    model_id = None
    if any((out / f"{c.stem}.png").is_file() and (out / f"{c.stem}.json").is_file() for c in cases):
        model_id = model_identity(pipeline, cfg.model, cfg.sample.allow_download, lora=cfg.sample.lora)
    run = _run_identity(cfg, pipeline)
    todo = []
    for case in cases:
        if is_done(out / f"{case.stem}.png", out / f"{case.stem}.json", model_id, notify):
            _check_done_matches(out, case, model_id, run)
        else:
            _precheck(case)
            for path in (out / f"{case.stem}.png", out / f"{case.stem}.json"):
                check_replaceable(path, False)  # a file of that name we did not write is kept
            todo.append(case)
    result = EditRunResult(out_dir=out, skipped=len(cases) - len(todo))
    if not todo:
        return result

    model_id = model_id or model_identity(pipeline, cfg.model, cfg.sample.allow_download, lora=cfg.sample.lora)
    if pipeline is None:  # the one loading path of sample, edit and the app, with edit's --model
        pipeline = load_pipeline(dataclasses.replace(cfg.sample, model=cfg.model))
    check_pipeline_quantize(pipeline, cfg.sample.quantize)
    from meissonic_cli.sample.guidance import check_negative_prompts  # imports torch: not at CLI start

    check_negative_prompts([case.negative_prompt for case in todo], pipeline.transformer)
    model_label = model_id["model"]
    for case in todo:
        check_working_size(case, pipeline)  # rounded to the model's token grid, before --out is made
        for note in case_notes(pipeline, case):
            if notify is not None:
                notify(note)
    make_output_folder(out, "--out")

    with make_progress(progress, remaining=False) as bar:
        cases_task = bar.add_task("edits", total=len(cases), completed=result.skipped)
        steps_task = bar.add_task("steps", total=todo[0].steps)
        for case in todo:
            bar.update(steps_task, total=case.steps, completed=0, description=f"steps ({case.stem})")
            start = time.perf_counter()
            def step_done(step: int, total: int) -> None:
                bar.update(steps_task, completed=step)
                if on_step is not None:
                    on_step(step, total)

            edited = edit_image(pipeline, case, callback=step_done, vq_decode=cfg.sample.vq_decode)
            seconds = time.perf_counter() - start
            png, side = out / f"{case.stem}.png", out / f"{case.stem}.json"
            meta = {
                **case.settings(),
                "file": png.name, "width": edited.size[0], "height": edited.size[1],
                "resolution": f"{edited.size[0]}x{edited.size[1]}",
                "resized_from": list(edited.resized_from) if edited.resized_from else None,
                **run, "masked_tokens": edited.masked, "total_tokens": int(edited.token_mask.numel()),
                "model": model_label, "model_digest": model_id["model_digest"], "lora": model_id["lora"],
                "seconds": round(seconds, 4), "offload": cfg.sample.offload,
                **case.extra,
            }
            write_output(png, side, edited.image, meta)
            result.written.append(png)
            result.masked_tokens.append(edited.masked)
            result.seconds += seconds
            bar.advance(cases_task)
    return result


def summary_table(result: EditRunResult) -> Any:
    """A rich table summarising an edit run."""
    rows = [("output", str(result.out_dir)),
            ("edits written / skipped (done)", f"{len(result.written)} / {result.skipped}")]
    if result.written:
        rows.append(("time", f"{result.seconds:.1f} s, {result.seconds / len(result.written):.2f} s/edit"))
        rows.append(("tokens redrawn per edit", ", ".join(map(str, result.masked_tokens[:8]))
                     + (" ..." if len(result.masked_tokens) > 8 else "")))
    return key_value_table("edit", rows)


__all__ = ["EDIT_RULES", "OFFICIAL_CASE_KEYS", "EditCase", "EditConfig", "EditResult", "EditRunResult", "MODES",
           "box_mask", "case_notes", "dilate_tokens", "edit_image", "feather_blend", "image_size", "img2img_mask_ratio",
           "img2img_start", "load_image", "load_mask", "mask_levels", "mask_token_grid", "open_resized",
           "outpaint_layout", "parse_ints", "parse_size", "read_cases", "remask_positions", "round_size", "run_edit",
           "single_case", "summary_table", "token_mask", "with_schedule"]
