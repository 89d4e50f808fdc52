"""Zero-shot editing (paper section 3.2): mask the right tokens, decode them with the sampler.

The transformer learned P(x_i | x_visible) for arbitrary visible subsets, so every edit is the same
three moves: encode the image to VQ tokens, replace the tokens to change by the mask id, and run
MaskGIT decoding from that partial grid with the new prompt (the pipeline's own sampling loop, given
`init_tokens`). Decoding starts with the masked fraction as the scheduler's `starting_mask_ratio` (as
the official inpainting pipeline does) and only ever writes masked positions, so every token that
was not masked comes out bit-identical.

Modes:
- `inpaint`: a mask PNG (white = edit; same size as the image) or `--box x0,y0,x1,y1` (pixels,
  end-exclusive). A token is masked when any pixel of its f x f cell is white, then the token mask is
  dilated by `--dilate N` tokens (a (2N+1)^2 square).
- `outpaint`: `--extend left,top,right,bottom` pixels or `--target WxH` (the original centred). Each
  side is rounded to the nearest multiple of the VQ factor, plus one token where the model's 2x2
  compression needs an even grid. The original's tokens are its own encoding, placed on the canvas;
  the new area is masked.
- `edit` (mask-free, image-to-image): re-mask round(strength x L) of the L tokens (at least one),
  either uniformly at random (`--remask random`) or those the model finds least likely under the new
  prompt (`--remask confidence`: one guided forward pass over the unmasked grid, at timestep 0 —
  the "nothing masked" end of both the sampler's and the trainer's timestep scale).

`--blend N` pastes the original pixels back outside the edited tokens with an N-pixel feathered seam
(the VQ round trip is lossy, so otherwise the kept region is the decoded tokens). Inputs whose sides
are not multiples of the model's pixel multiple are resized to the nearest ones (`--resolution`
picks a size instead); the sidecar records it.

Batch: `--cases FILE.jsonl`, one case per line (`image`, `prompt`, `mode`, `mask` or `box`, `extend` or
`target`, `strength`, `remask`, `dilate`, `blend`, `seed`, `negative_prompt`, `steps`, `cfg`, `name`,
and `source_prompt`/`category`, which are copied to the sidecar for `eval`); missing fields take the
command's values, and case i's seed defaults to `--seed` + i. Relative paths are relative to the
cases file. Each output is `NAME.png` + `NAME.json` (with `source`, the input image's
absolute path, for CLIP-I/DINO); the sidecar is written last and a rerun skips finished cases.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from meissonic_cli.atomic import atomic_write, write_json
from meissonic_cli.config import Problems, field
from meissonic_cli.errors import InputError, OutputExistsError
from meissonic_cli.progress import key_value_table, make_progress
from meissonic_cli.sample.sample import SampleConfig, changed_settings, parse_resolution, parse_temperature, slugify

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

MODES = ("inpaint", "outpaint", "edit")
REMASK = ("random", "confidence")
CASE_FIELDS = ("image", "prompt", "mode", "mask", "box", "extend", "target", "strength", "remask", "dilate", "blend",
               "seed", "negative_prompt", "steps", "cfg", "name", "source_prompt", "category")
# Sidecar fields that must equal the current case's for a finished output to be skipped.
_MUST_MATCH = ("prompt", "mode", "source", "mask", "box", "extend", "target", "strength", "remask", "dilate", "blend",
               "seed", "negative_prompt", "steps", "cfg", "token_temperature")


@dataclass
class EditConfig:
    model: str = field("", help="Model folder in the released layout (transformer/, vqvae/, text_encoder/, tokenizer/, "
                                "scheduler/).")
    image: Optional[str] = field(None, help="Image to edit (PNG/JPEG/WebP).")
    prompt: Optional[str] = field(None, help="What the edited image should show (the whole image, not an instruction).")
    mode: str = field("inpaint", help="inpaint (--mask or --box), outpaint (--extend or --target) or edit (mask-free, "
                                      "--strength).")
    mask: Optional[str] = field(None, help="Inpaint mask: a PNG of the image's size, white where to edit.")
    box: Optional[str] = field(None, help="Inpaint box instead of a mask: x0,y0,x1,y1 in pixels (end-exclusive).")
    dilate: int = field(0, help="Grow the token mask by this many tokens on every side (inpaint).")
    blend: int = field(0, help="Paste the original pixels back outside the edited tokens, feathered over this many "
                               "pixels at the seam (0: output the decoded tokens as they are).")
    extend: Optional[str] = field(None, help="Outpaint: pixels to add as left,top,right,bottom (rounded to the token "
                                             "grid).")
    target: Optional[str] = field(None, help="Outpaint: canvas size WxH, the original centred (instead of --extend).")
    strength: float = field(0.5, help="Mask-free edit: fraction of all tokens to re-mask and redraw, in (0, 1].")
    remask: str = field("random", help="Mask-free edit: which tokens to re-mask: random, or confidence (those least "
                                       "likely under the new prompt).")
    resolution: Optional[str] = field(None, help="Resize the input to this size first (N or WxH). Default: its own size, "
                                                 "rounded to the nearest multiple the model accepts.")
    cases: Optional[str] = field(None, help="Batch: a .jsonl file, one case per line (image, prompt, mode, mask or box, "
                                            "extend or target, strength, seed, ...); paths relative to the file.")
    out: str = field("edits", help="Output folder: NAME.png + NAME.json sidecar per case; reruns skip finished cases.")
    name: Optional[str] = field(None, help="Output name for a single case (default: NNNNN-MODE-PROMPT).")
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(steps=48),
                                 help="Sampler settings (steps, cfg, seed, negative prompt, temperature, device, dtype).")

    def validate(self) -> "EditConfig":
        p = Problems()
        p.check(bool(self.model), "--model is required (a released-layout model folder)")
        p.check((self.cases is None) != (self.image is None),
                "give --image (with --prompt) for one edit, or --cases FILE.jsonl for a batch, not both")
        p.check(self.cases is None or self.prompt is None, "--prompt is given per line in --cases")
        self.sample.check_schedule(p)
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
    remask: str = "random"
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
        if self.mode == "edit" and self.remask not in REMASK:
            raise InputError(f"{at}--remask must be one of {', '.join(REMASK)}, got {self.remask!r}")
        if self.dilate < 0 or self.blend < 0:
            raise InputError(f"{at}--dilate and --blend must be >= 0, got {self.dilate} and {self.blend}")
        if self.steps < 1:
            raise InputError(f"{at}steps must be >= 1, got {self.steps}")
        if self.extend is not None and min(self.extend) < 0:
            raise InputError(f"{at}--extend values must be >= 0 pixels, got {','.join(map(str, self.extend))}")

    def settings(self) -> dict[str, Any]:
        """What identifies this case's output (compared with a finished sidecar before skipping it)."""
        return {"prompt": self.prompt, "mode": self.mode, "source": str(self.image),
                "mask": str(self.mask) if self.mask else None, "box": list(self.box) if self.box else None,
                "extend": list(self.extend) if self.extend else None, "target": list(self.target) if self.target else None,
                "strength": self.strength if self.mode == "edit" else None,
                "remask": self.remask if self.mode == "edit" else None, "dilate": self.dilate, "blend": self.blend,
                "seed": self.seed, "negative_prompt": self.negative_prompt, "steps": self.steps, "cfg": self.cfg,
                "token_temperature": self.token_temperature}


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
# Parsing


def parse_ints(text: Any, n: int, flag: str) -> tuple[int, ...]:
    """'1,2,3,4' or [1, 2, 3, 4] -> a tuple of n ints."""
    values = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n:
        raise InputError(f"{flag} {text!r} must be {n} comma-separated integers")
    return out


def parse_size(text: Any, flag: str) -> tuple[int, int]:
    """'768x512' or [768, 512] -> (width, height)."""
    if isinstance(text, (list, tuple)):
        return parse_ints(text, 2, flag)  # type: ignore[return-value]
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise InputError(f"{flag} {text!r} must be a size like 1024x768 (width x height)")
    return int(m.group(1)), int(m.group(2))


def _resolve_path(value: Any, base: Optional[Path]) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    return path.resolve()


def single_case(cfg: EditConfig) -> EditCase:
    """The one case described by flags."""
    s = cfg.sample
    case = EditCase(
        index=0, image=_resolve_path(cfg.image, None), prompt=cfg.prompt or "", mode=cfg.mode,
        mask=_resolve_path(cfg.mask, None) if cfg.mask else None,
        box=parse_ints(cfg.box, 4, "--box") if cfg.box else None,  # type: ignore[arg-type]
        extend=parse_ints(cfg.extend, 4, "--extend") if cfg.extend else None,  # type: ignore[arg-type]
        target=parse_size(cfg.target, "--target") if cfg.target else None, strength=float(cfg.strength),
        remask=cfg.remask, dilate=int(cfg.dilate), blend=int(cfg.blend), seed=int(s.seed),
        negative_prompt=s.negative_prompt, steps=int(s.steps), cfg=float(s.cfg), name=cfg.name,
        resolution=parse_resolution(cfg.resolution), temperature=parse_temperature(s.temperature),
        token_temperature=float(s.token_temperature),
    )
    case.check()
    return case


def read_cases(cfg: EditConfig) -> list[EditCase]:
    """Cases from --cases (one JSON object per line); missing fields take the command's values."""
    path = Path(str(cfg.cases))
    if not path.is_file():
        raise InputError(f"--cases {path}: no such file; expected a .jsonl file with one edit per line")
    base = path.resolve().parent
    s = cfg.sample
    cases: list[EditCase] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with image, prompt and mode")
        unknown = sorted(set(row) - set(CASE_FIELDS))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CASE_FIELDS)}")
        if not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{where}: 'image' and 'prompt' are required strings")
        try:
            case = EditCase(
                index=len(cases), image=_resolve_path(row["image"], base), prompt=row["prompt"],
                mode=str(row.get("mode", cfg.mode)),
                mask=_resolve_path(row["mask"], base) if row.get("mask") else None,
                box=parse_ints(row["box"], 4, "box") if row.get("box") is not None else None,  # type: ignore[arg-type]
                extend=parse_ints(row["extend"], 4, "extend") if row.get("extend") is not None else None,  # type: ignore[arg-type]
                target=parse_size(row["target"], "target") if row.get("target") is not None else None,
                strength=float(row.get("strength", cfg.strength)), remask=str(row.get("remask", cfg.remask)),
                dilate=int(row.get("dilate", cfg.dilate)), blend=int(row.get("blend", cfg.blend)),
                seed=int(row.get("seed", s.seed + len(cases))),
                negative_prompt=str(row.get("negative_prompt", s.negative_prompt)),
                steps=int(row.get("steps", s.steps)), cfg=float(row.get("cfg", s.cfg)),
                name=str(row["name"]) if row.get("name") else None, resolution=parse_resolution(cfg.resolution),
                temperature=parse_temperature(s.temperature), token_temperature=float(s.token_temperature),
                extra={k: row[k] for k in ("source_prompt", "category") if k in row},
            )
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: {err}") from None
        case.check(where)
        cases.append(case)
    if not cases:
        raise InputError(f"--cases {path}: no cases (one JSON object per line)")
    names = [c.stem for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"--cases {path}: several cases would write {dupes[0]}.png; give them different 'name's")
    return cases


# ----------------------------------------------------------------------------------------------
# Images, masks and token grids


def load_image(path: Path, what: str = "image") -> "Image.Image":
    """An RGB PIL image, or InputError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{what} {path} cannot be read as an image ({err})") from None


def load_mask(path: Path, size: tuple[int, int]) -> "np.ndarray":
    """A boolean (H, W) mask from a PNG of exactly `size` = (W, H): True where the pixel is white-ish."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"mask not found: {path}")
    try:
        with Image.open(path) as im:
            if im.size != tuple(size):
                raise InputError(f"mask {path} is {im.size[0]}x{im.size[1]} but the image is {size[0]}x{size[1]}; "
                                 f"the mask must have the image's size (white = edit)")
            gray = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"mask {path} cannot be read as an image ({err})") from None
    return gray >= 128


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> "np.ndarray":
    """A boolean (H, W) mask of the pixel box x0,y0,x1,y1 (end-exclusive), which must lie inside the image."""
    import numpy as np

    x0, y0, x1, y1 = box
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InputError(f"--box {x0},{y0},{x1},{y1} is not a non-empty box inside the {w}x{h} image "
                         f"(need 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h})")
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def token_mask(pixels: "np.ndarray", factor: int, dilate: int = 0) -> "torch.Tensor":
    """(H/f, W/f) bool: a token is masked when any pixel of its f x f cell is, then dilated by `dilate` tokens."""
    import torch
    import torch.nn.functional as F

    h, w = pixels.shape
    if h % factor or w % factor:
        raise InputError(f"mask size {w}x{h} is not a multiple of the VQ factor {factor}")
    cells = torch.from_numpy(pixels.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3)))
    if dilate > 0:
        grown = F.max_pool2d(cells[None, None].float(), kernel_size=2 * dilate + 1, stride=1, padding=dilate)
        cells = grown[0, 0] > 0
    return cells


def round_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """Each side rounded to the nearest positive multiple of `multiple`."""
    return (max(multiple, int(round(width / multiple)) * multiple), max(multiple, int(round(height / multiple)) * multiple))


def outpaint_layout(size: tuple[int, int], factor: int, even_grid: bool,
                    extend: Optional[Sequence[int]] = None, target: Optional[tuple[int, int]] = None
                    ) -> tuple[int, int, int, int]:
    """(canvas width, canvas height, left, top) in pixels, all multiples of `factor`.

    Each extension is rounded to the nearest multiple of the factor; with `even_grid` (the 2x2
    compression) a side with an odd token count gets one more token on its larger extension.
    """
    w, h = size
    if target is not None:
        tw, th = target
        if tw < w or th < h:
            raise InputError(f"--target {tw}x{th} is smaller than the image ({w}x{h}); outpainting only adds area")
        extend = ((tw - w) // 2, (th - h) // 2, tw - w - (tw - w) // 2, th - h - (th - h) // 2)
    assert extend is not None
    left, top, right, bottom = (int(round(e / factor)) for e in extend)
    gw, gh = w // factor, h // factor
    if even_grid:
        if (gw + left + right) % 2:
            if right >= left:
                right += 1
            else:
                left += 1
        if (gh + top + bottom) % 2:
            if bottom >= top:
                bottom += 1
            else:
                top += 1
    if left + right + top + bottom == 0:
        raise InputError(f"--extend/--target adds nothing once rounded to the {factor}-pixel token grid; extend by at "
                         f"least {factor // 2 + 1} pixels on some side")
    return (gw + left + right) * factor, (gh + top + bottom) * factor, left * factor, top * factor


def feather_blend(decoded: "Image.Image", original: "Image.Image", keep: "np.ndarray", feather: int) -> "Image.Image":
    """Original pixels where `keep` (H, W) is True, decoded elsewhere, mixed over a `feather`-pixel seam."""
    import numpy as np
    from PIL import Image, ImageFilter

    alpha = Image.fromarray((keep * 255).astype(np.uint8), mode="L")
    if feather > 0:
        # Blur, then re-apply the hard inside so the kept interior stays exactly the original.
        blurred = np.asarray(alpha.filter(ImageFilter.GaussianBlur(feather / 2)), dtype=np.float32) / 255.0
        weight = np.minimum(blurred, keep.astype(np.float32))
    else:
        weight = keep.astype(np.float32)
    a = np.asarray(original, dtype=np.float32)
    b = np.asarray(decoded, dtype=np.float32)
    out = weight[..., None] * a + (1 - weight[..., None]) * b
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))


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


def edit_image(pipe: Any, case: EditCase, callback: Optional[Callable[[int, int], None]] = None) -> EditResult:
    """Run one edit with a loaded `MeissonicPipeline`; checks the inputs before any model work."""
    import numpy as np
    import torch
    from PIL import Image

    from meissonic_cli.model.vq import tensor_to_images

    case.check()
    image = load_image(case.image)
    f = int(pipe.vq.downsample_factor)
    multiple = int(pipe.pixel_multiple)
    pixel_mask = None
    if case.mode == "inpaint":
        pixel_mask = load_mask(case.mask, image.size) if case.mask else box_mask(case.box, image.size)  # type: ignore[arg-type]

    work_size = case.resolution or round_size(*image.size, multiple)
    pipe.check_resolution(work_size[1], work_size[0])
    resized_from = None
    if work_size != image.size:
        resized_from = image.size
        image = image.resize(work_size, Image.BICUBIC)
        if pixel_mask is not None:
            pixel_mask = np.asarray(Image.fromarray(pixel_mask).resize(work_size, Image.NEAREST))

    device = pipe.device
    generator = torch.Generator(device=device).manual_seed(int(case.seed))
    mask_id = pipe.scheduler.config.mask_token_id
    source_tokens = pipe.vq.encode(_to_tensor(image, pipe.vq.device)).to(device)  # (1, h, w)

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
            cells = token_mask(pixel_mask, f, case.dilate).to(device)  # type: ignore[arg-type]
            if not bool(cells.any()):
                raise InputError(f"the mask of {case.image.name} is empty (no white pixels); nothing to inpaint")
            tokens[0][cells] = mask_id
        else:
            count = max(1, int(round(case.strength * tokens.numel())))
            logits = None
            if case.remask == "confidence":
                logits = pipe.logits(source_tokens, [case.prompt], case.negative_prompt, case.cfg)
            chosen = remask_positions(source_tokens, count, case.remask, generator, logits)
            tokens.view(-1)[chosen] = mask_id
        keep_pixels = None

    tokens_in = tokens.clone()
    # Decoding starts from the partial grid: only mask-id positions are drawn, the rest is kept as is.
    decoded_tokens = pipe([case.prompt], negative_prompt=case.negative_prompt, steps=case.steps,
                          guidance_scale=case.cfg, width=size[0], height=size[1], temperature=case.temperature,
                          token_temperature=case.token_temperature,
                          generator=generator, callback=callback, output_type="codes", init_tokens=tokens)
    out = tensor_to_images(pipe.vq.decode(decoded_tokens))[0]
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




def _is_done(out: Path, case: EditCase) -> bool:
    return (out / f"{case.stem}.png").is_file() and (out / f"{case.stem}.json").is_file()


def _check_done_matches(out: Path, case: EditCase) -> None:
    path = out / f"{case.stem}.json"
    try:
        done = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        raise OutputExistsError(f"{path} exists but is not a readable sidecar; move it away or use another --out") from None
    expected = case.settings()
    differ = changed_settings(done, expected, _MUST_MATCH)
    if differ:
        raise OutputExistsError(f"{path.name} in {out} was made with different {', '.join(differ)}; nothing was "
                                f"written: use another --out or a different name")


def _precheck(case: EditCase) -> None:
    """Everything about a case's files that can fail, checked before the model loads."""
    image = load_image(case.image)
    if case.mode == "inpaint":
        if case.mask is not None:
            load_mask(case.mask, image.size)
        else:
            box_mask(case.box, image.size)  # type: ignore[arg-type]
    if case.mode == "outpaint" and case.target is not None and (case.target[0] < image.width or case.target[1] < image.height):
        raise InputError(f"--target {case.target[0]}x{case.target[1]} is smaller than {case.image.name} "
                         f"({image.width}x{image.height}); outpainting only adds area")


def run_edit(cfg: EditConfig, progress: bool = True, pipeline: Any = None) -> EditRunResult:
    """Run every case of `cfg` into `cfg.out`, skipping finished ones. Inputs are checked before the model loads."""
    cfg.validate()
    cases = read_cases(cfg) if cfg.cases else [single_case(cfg)]
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder")
    todo = []
    for case in cases:
        if _is_done(out, case):
            _check_done_matches(out, case)
        else:
            _precheck(case)
            todo.append(case)
    result = EditRunResult(out_dir=out, skipped=len(cases) - len(todo))
    if not todo:
        return result

    from meissonic_cli.sample.pipeline import MeissonicPipeline, resolve_model_folder

    if pipeline is None:
        root = resolve_model_folder(cfg.model, allow_download=cfg.sample.allow_download)
        pipeline = MeissonicPipeline.from_pretrained(root, device=cfg.sample.device, dtype=cfg.sample.dtype)
        model_label = str(root.resolve())
    else:
        model_label = str(getattr(pipeline, "model_path", None) or cfg.model)
    out.mkdir(parents=True, exist_ok=True)

    with make_progress(progress, remaining=False) as bar:
        cases_task = bar.add_task("edits", total=len(cases), completed=result.skipped)
        steps_task = bar.add_task("steps", total=todo[0].steps)
        for case in todo:
            bar.update(steps_task, total=case.steps, completed=0, description=f"steps ({case.stem})")
            start = time.perf_counter()
            edited = edit_image(pipeline, case, callback=lambda step, total: bar.update(steps_task, completed=step))
            seconds = time.perf_counter() - start
            png, side = out / f"{case.stem}.png", out / f"{case.stem}.json"
            atomic_write(png, lambda p, im=edited.image: im.save(p, format="PNG"))
            meta = {
                **case.settings(),
                "file": png.name, "width": edited.size[0], "height": edited.size[1],
                "resolution": f"{edited.size[0]}x{edited.size[1]}",
                "resized_from": list(edited.resized_from) if edited.resized_from else None,
                "temperature": list(case.temperature) if isinstance(case.temperature, tuple) else [case.temperature],
                "masked_tokens": edited.masked, "total_tokens": int(edited.token_mask.numel()),
                "model": model_label, "seconds": round(seconds, 4),
                **case.extra,
            }
            write_json(side, meta)
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


__all__ = ["EditCase", "EditConfig", "EditResult", "EditRunResult", "MODES", "REMASK", "box_mask", "edit_image",
           "feather_blend", "load_image", "load_mask", "outpaint_layout", "read_cases", "remask_positions", "round_size",
           "run_edit", "single_case", "summary_table", "token_mask"]
