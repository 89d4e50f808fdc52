"""Batch sampling to a folder: prompts (flags, .txt or .jsonl) -> one PNG + JSON sidecar per image.

Output naming is stable: image i of the prompt list is `{i:05d}-{slug}.png`, with
`{i:05d}-{slug}.json` beside it holding the prompt, negative prompt, seed, steps, cfg, resolution,
temperature, sampler, model and the seconds it took. The sidecar is written last (both atomically),
so an image counts as done when both files exist; a rerun skips done images and redoes the others.
A done image whose sidecar records different settings stops the run before anything is written
(pick another --out), so a folder never mixes settings silently.

Prompt files (`-` is standard input; FIFOs, /dev/stdin and `<(...)` work too; read with
`meissonic_cli.textfiles`: UTF-8 with or without a byte-order mark, `--prompts-format` for names
without a .txt/.jsonl ending):
- `.txt`: one prompt per line (split on \\n or \\r\\n only); blank lines and lines starting with `#` are
  skipped.
- `.jsonl`: one JSON object per line with `prompt` and optionally `negative_prompt`, `seed`,
  `steps`, `cfg`; missing fields take the command's values. Blank lines are skipped; any other
  malformed line stops the run naming its line number. Lines are split on \\n only, so a JSON string
  may hold U+2028/U+2029/U+0085.
Seeds: image i gets `seed + i` (wrapped into 0..2**63-1) unless its jsonl line gives one. With
`--images-per-prompt N`, prompt p gives images p*N .. p*N+N-1 (so names stay stable), image p*N+j seeded
`seed + p*N + j`, or the jsonl line's seed + j.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from meissonic_cli.config import (
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_NOISE_REG,
    MAX_STEPS,
    Problems,
    check_number,
    field,
    parse_resolution,
    parse_temperature,
)
from meissonic_cli.errors import InputError, ModelFormatError, OutputExistsError
from meissonic_cli.model.compiled import COMPILE_HELP
from meissonic_cli.model.hub import ALLOW_DOWNLOAD_HELP, VARIANT_HELP, VARIANTS
from meissonic_cli.model.quantize import QUANTIZE_HELP, QUANTIZE_MODES
from meissonic_cli.model.vq_decode import VQ_DECODE_HELP, VQ_DECODE_MODES
from meissonic_cli.progress import key_value_table, make_progress
from meissonic_cli.readers import parse_json
from meissonic_cli.safety import MAX_SEED, check_seed, derive_seed
from meissonic_cli.sample.offload import OFFLOAD_HELP, OFFLOAD_MODES, check_pipeline_quantize
from meissonic_cli.sample.outputs import other_model, read_done_sidecar
from meissonic_cli.textfiles import jsonl_lines, read_text, text_format, txt_lines

JSONL_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "cfg")
# The official scripts' settings (github viiika/Meissonic inference.py and inpaint.py): 64 steps,
# guidance 9 and this negative prompt; `--exact` runs their sampler loop with a CPU generator.
OFFICIAL_NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, text, "
                            "jpeg artifacts, signature, sketch, duplicate, ugly, identifying mark")
OFFICIAL_RESOLUTION = 1024  # both scripts resize/sample at 1024 x 1024
PRESETS: dict[str, dict[str, Any]] = {
    "official": {"steps": 64, "cfg": 9.0, "negative_prompt": OFFICIAL_NEGATIVE_PROMPT, "exact": True},
}
# Sidecar fields that must equal the current run's for a done image to be skipped.
# Every SampleConfig field reaches this comparison or is listed with its reason in tests/test_rerun_identity.py.
_MUST_MATCH = ("prompt", "negative_prompt", "seed", "steps", "cfg", "resolution", "temperature", "token_temperature",
               "text_encoder", "sampler", "dtype", "generator", "variant", "quantize", "vq_decode")
# Values of sidecar fields added after the first release, for sidecars written before them (`edit`'s too).
_SIDECAR_DEFAULTS = {"token_temperature": 1.0, "exact": False, "quantize": "none", "vq_decode": "whole"}
# Sidecar fields compared only when a finished sidecar has them (older ones did not record them).
_COMPARED_WHEN_RECORDED = ("generator", "dtype", "variant")
GRID_NAME = "grid.png"
# Narrower grid tiles are enlarged (see make_grid): 64 px samples would leave room for ~10 characters of caption.
MIN_GRID_TILE = 160
MAX_IMAGES_PER_PROMPT = 10_000


@dataclass
class SampleConfig:
    model: str = field("", help="Model folder in the released layout (transformer/, vqvae/, text_encoder/, tokenizer/, "
                                "scheduler/), or a Hugging Face repo id already in the local cache.", short="-m")
    prompt: list[str] = field(default_factory=list, help="A prompt; repeat the flag for several.", short="-p")
    prompts: Optional[str] = field(None, help="A prompts file: .txt (one per line, # comments) or .jsonl (prompt, "
                                              "negative_prompt, seed, steps, cfg per line); - reads standard input, "
                                              "and any readable path works (FIFO, /dev/stdin, <(...)).")
    prompts_format: Optional[str] = field(None, help="Format of --prompts: txt or jsonl. Default: the file's ending, "
                                                     "txt for a name without one (-, /dev/stdin, <(...)).")
    images_per_prompt: int = field(1, help="Images per prompt (seeds differ): prompt p gives images p*N to p*N+N-1, "
                                           "so file names stay stable.")
    out: str = field("samples", help="Output folder: one PNG and one JSON sidecar per image; a rerun skips images "
                                     "already written.", short="-o")
    negative_prompt: str = field("", help="Negative prompt for classifier-free guidance (jsonl lines may override it).")
    steps: int = field(48, bounds=(1, MAX_STEPS), help="Decoding steps.")
    cfg: float = field(9.0, bounds=(0, MAX_GUIDANCE), help="Classifier-free guidance scale; guidance runs when it is > 1.", flag="--guidance-scale",
                       also=("--cfg",))
    resolution: Optional[str] = field(None, help="Image size: 1024 (square) or WxH, a multiple of the VQ factor (x2 "
                                                 "with compression). Default: 1024 for the compressing (1024px) model, "
                                                 "512 otherwise, at the released VQ factor 16.")
    seed: int = field(0, help="Base seed: image i gets seed + i (unless its jsonl line sets one).")
    batch_size: int = field(1, bounds=(1, MAX_BATCH), help="Images sampled together (same steps and cfg).")
    device: str = field("auto", help="auto, cpu, cuda, cuda:N or mps.")
    dtype: str = field("fp32", help="Weights and activations of the transformer and the text encoder (its layer "
                                    "norms stay fp32): fp32, bf16 or fp16. The released VQ decodes in fp32.")
    quantize: str = field("none", help=QUANTIZE_HELP)
    offload: str = field("none", help=OFFLOAD_HELP)
    compile: bool = field(False, help=COMPILE_HELP, flag="--compile/--no-compile")
    vq_decode: str = field("whole", help=VQ_DECODE_HELP)
    temperature: str = field("2,0", help="Gumbel temperature annealed over the steps: 'start,end', or one number tau "
                                         "for tau..0.01.")
    token_temperature: float = field(1.0, bounds=(1e-3, 1e3), help="Divides the logits before each token draw: 1 is the official sampler; "
                                               "below 1 (e.g. 0.25) draws closer to each position's most likely codes, "
                                               "which helps small or briefly trained models.")
    order: str = field("confidence", help="Which masked positions each step reveals: confidence (the official "
                                          "sampler), halton (a fixed, spread-out 2-D Halton order) or random.")
    schedule: Optional[str] = field(None, help="How many tokens stay masked after each step: cosine, linear, arccos, "
                                               "sqrt or square. Default: the model's scheduler config (cosine).")
    noise_reg: float = field(0.0, bounds=(0, MAX_NOISE_REG), help="Noise regularization: Gaussian noise of this scale (times |cos| of the step) "
                                       "on the logits before each draw; 0 = off, 2 = the paper's (arXiv 2411.10781).")
    differential: float = field(0.0, help="Differential sampling: this fraction of the masked positions, those whose "
                                          "prediction moved least since the last step, draw from the change of their "
                                          "distribution; 0 = off, 0.75 = the paper's (arXiv 2411.10781).")
    cache_refresh: int = field(0, bounds=(0, MAX_STEPS), help="Feature cache: a full forward every N steps, and between them only the "
                                       "positions masked at the last full one are recomputed (keys/values of the rest "
                                       "reused); 0 = off. Approximate: see `meissonic_cli.sample.cache`.")
    grid: bool = field(False, help="Also write grid.png: every image of the prompt list with its prompt.")
    exact: bool = field(False, help="Run the official sampler loop (full logits and the official scheduler step "
                                    "every step) with a CPU generator, as diffusers pipelines draw: slower, reproduces "
                                    "the official random draws, and a seed gives the same image on CPU and GPU (up to "
                                    "float rounding of the logits).")
    allow_download: bool = field(False, help=ALLOW_DOWNLOAD_HELP)
    variant: Optional[str] = field(None, help=VARIANT_HELP)
    text_encoder: Optional[str] = field(None, help="Text encoder folder to use instead of the model's text_encoder/: a "
                                                   "Hugging Face CLIPTextModelWithProjection folder, or a full CLIPModel "
                                                   "folder (vision tower ignored), e.g. laion/CLIP-ViT-H-14-laion2B-"
                                                   "s32B-b79K as the official scripts load it. Prompts are still "
                                                   "tokenized with the model's tokenizer/.")
    lora: list[str] = field(default_factory=list, help="LoRA adapter to apply, PATH or PATH:SCALE (default scale 1; "
                                                         "repeat the flag to stack several): a PEFT folder "
                                                         "(adapter_model.safetensors + adapter_config.json), a diffusers "
                                                         "or official-trainer pytorch_lora_weights.safetensors, or a "
                                                         "meissonic-lora file. Applied without merging; the sidecars "
                                                         "record each adapter's path, sha256 and scale.")
    preset: Optional[str] = field(None, help="official: the settings of the official scripts (inference.py, "
                                             "inpaint.py) for every setting left at its default: 64 steps, guidance "
                                             "9, their default negative prompt, --exact (and 1024 px for edit).")
    overwrite: bool = field(False, help="Replace an existing grid.png and same-named files in --out that this command "
                                        "did not finish (default: refuse).")
    first_index: int = field(0, help="Number of the first image (names and default seeds count from it; the app "
                                     "numbers its requests on).", cli=False)

    def apply_preset(self) -> "SampleConfig":
        """Fill the settings of `preset` into every field still at its default (idempotent)."""
        if self.preset is None or self.preset == "":
            return self
        if self.preset not in PRESETS:
            raise InputError(f"unknown --preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        defaults = SampleConfig()
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == getattr(defaults, name):
                setattr(self, name, value)
        return self

    def validate(self) -> "SampleConfig":
        self.apply_preset()
        p = Problems(self)
        p.check(bool(self.model), "--model is required (a model folder, or a hub id such as MeissonFlow/Meissonic "
                                  "after `hf download MeissonFlow/Meissonic`)")
        p.check(self.variant in (None, *VARIANTS), f"unknown --variant {self.variant!r}; use {' or '.join(VARIANTS)}")
        p.check(bool(self.prompt) != bool(self.prompts), "give --prompt (repeatable) or --prompts FILE, not both and "
                                                         "not neither")
        self.check_schedule(p)
        p.check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        p.check(1 <= self.images_per_prompt <= MAX_IMAGES_PER_PROMPT,
                f"--images-per-prompt must be between 1 and {MAX_IMAGES_PER_PROMPT}, got {self.images_per_prompt}")
        p.check(self.prompts_format in (None, "", "txt", "jsonl"),
                f"--prompts-format must be txt or jsonl, got {self.prompts_format!r}")
        p.check(0 <= self.first_index <= MAX_SEED, f"first_index must be between 0 and {MAX_SEED}, got {self.first_index}")
        p.check(math.isfinite(self.cfg), f"--guidance-scale must be a finite number (e.g. 9), got {self.cfg}")
        p.check(0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        try:
            parse_resolution(self.resolution)
        except InputError as err:
            p.check(False, str(err))
        from meissonic_cli.sample.pipeline import DTYPES

        p.check(self.dtype.lower() in DTYPES, f"unknown --dtype {self.dtype!r}; use fp32, bf16 or fp16")
        self.check_lora(p)
        p.check(self.quantize in QUANTIZE_MODES, f"unknown --quantize {self.quantize!r}; use one of "
                                                 f"{', '.join(QUANTIZE_MODES)}")
        p.check(self.offload in OFFLOAD_MODES, f"unknown --offload {self.offload!r}; use one of {', '.join(OFFLOAD_MODES)}")
        p.raise_if_any()
        return self

    def check_lora(self, p: Problems) -> None:
        """Add to `p` what is wrong with the --lora specs (syntax, scale range, an adapter file in a layout meissonic
        reads), so a bad adapter fails before the model loads; whether it fits the model is checked once it has."""
        from meissonic_cli.model.lora_files import parse_lora_spec, read_adapter

        for text in self.lora:
            try:
                read_adapter(parse_lora_spec(text).path)
            except (InputError, ModelFormatError) as err:
                p.check(False, str(err))

    def check_schedule(self, p: Problems) -> None:
        """Add to `p` what is wrong with the decoding settings (--steps, --temperature, --token-temperature,
        --vq-decode): the checks `edit` shares, which has no prompts or output of this kind."""
        p.check(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        p.check(self.vq_decode in VQ_DECODE_MODES, f"unknown --vq-decode {self.vq_decode!r}; use one of {', '.join(VQ_DECODE_MODES)}")
        p.check(math.isfinite(self.token_temperature) and self.token_temperature > 0,
                f"--token-temperature must be > 0 (1 = the official sampler), got {self.token_temperature}")
        try:
            parse_temperature(self.temperature)
        except InputError as err:
            p.check(False, str(err))
        options = self.sampler_options(check=False)
        for problem in options.problems():
            p.check(False, problem)
        p.check(not (self.exact and options != type(options)()),
                f"--exact runs the official sampler only; drop it to sample with {options.label}")

    def sampler_options(self, check: bool = True) -> Any:
        """The `samplers.SamplerOptions` of these settings (the official sampler by default)."""
        from meissonic_cli.sample.samplers import SamplerOptions

        options = SamplerOptions(order=self.order, schedule=self.schedule or None, noise_reg=float(self.noise_reg),
                                 differential=float(self.differential), cache_refresh=self.cache_refresh)
        return options.validate() if check else options

    @property
    def sampler_label(self) -> str:
        """What the sidecars record as the sampler: exact, fast (the official sampler), or the options' label."""
        if self.exact:
            return "exact"
        options = self.sampler_options(check=False)
        return "fast" if options == type(options)() else options.label


@dataclass
class PromptItem:
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float

    @property
    def stem(self) -> str:
        return f"{self.index:05d}-{slugify(self.prompt)}"


@dataclass
class SampleResult:
    out_dir: Path
    model: str
    device: str
    dtype: str
    resolution: tuple[int, int]
    written: list[Path] = dataclasses.field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    steps_run: int = 0
    grid: Optional[Path] = None

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.written) if self.written else 0.0


# ----------------------------------------------------------------------------------------------
# Parsing


def slugify(text: str, max_len: int = 48) -> str:
    """A file-name-safe lowercase slug of a prompt ('prompt' when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "prompt"


def _check_type(value: Any, kind: type, key: str, where: str) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise InputError(f"{where}: {key!r} must be {'a number' if kind is float else kind.__name__}, got {value!r}")


def read_prompts(cfg: SampleConfig) -> list[PromptItem]:
    """The prompt list from --prompt flags or the --prompts file, with per-image settings filled in."""
    items: list[PromptItem] = []

    def add(prompt: str, negative: Optional[str] = None, seed: Optional[int] = None, steps: Optional[int] = None,
            cfg_scale: Optional[float] = None) -> None:
        for j in range(cfg.images_per_prompt):
            i = len(items)
            if i >= MAX_IMAGES:
                raise InputError(f"the prompts ask for over {MAX_IMAGES:,} images (prompts x --images-per-prompt): split them")
            image_seed = derive_seed(cfg.seed, i) if seed is None else derive_seed(seed, j)
            items.append(PromptItem(index=cfg.first_index + i, prompt=prompt,
                                    negative_prompt=cfg.negative_prompt if negative is None else negative,
                                    seed=image_seed, steps=cfg.steps if steps is None else steps,
                                    cfg=cfg.cfg if cfg_scale is None else cfg_scale))

    if cfg.prompt:
        for prompt in cfg.prompt:
            if not prompt.strip():
                raise InputError("--prompt must not be empty")
            add(prompt)
        return items

    path = str(cfg.prompts or "")
    suffix = "." + text_format(path, cfg.prompts_format, "--prompts", "--prompts-format")
    text = read_text(path, "--prompts")
    lines = txt_lines(text) if suffix == ".txt" else jsonl_lines(text)
    if path == "-":
        path = "(stdin)"
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if suffix == ".txt":
            if text and not text.startswith("#"):
                add(text)
            continue
        if not text:
            continue
        where = f"{path} line {number}"
        row = parse_json(text, where)
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with a \"prompt\", got {type(row).__name__}")
        unknown = sorted(set(row) - set(JSONL_FIELDS))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(JSONL_FIELDS)}")
        if "prompt" not in row:
            raise InputError(f"{where}: missing \"prompt\"")
        prompt = _check_type(row["prompt"], str, "prompt", where)
        if not prompt.strip():
            raise InputError(f"{where}: \"prompt\" is empty")
        negative = _check_type(row["negative_prompt"], str, "negative_prompt", where) if "negative_prompt" in row else None
        seed = check_seed(_check_type(row["seed"], int, "seed", where), where) if "seed" in row else None
        steps = check_number(row["steps"], f"{where}: steps", SampleConfig, "steps") if "steps" in row else None
        cfg_scale = float(check_number(row["cfg"], f"{where}: cfg", SampleConfig, "cfg")) if "cfg" in row else None
        add(prompt, negative, seed, steps, cfg_scale)
    if not items:
        what = "blank lines and # comments are skipped" if suffix == ".txt" else "blank lines are skipped"
        raise InputError(f"no prompts in {path} ({what})")
    return items


# ----------------------------------------------------------------------------------------------
# Output


def _warn(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _sidecar(item: PromptItem, cfg: SampleConfig, width: int, height: int, model: str, seconds: float,
             dtype: str, generator: str) -> dict[str, Any]:
    return {
        "index": item.index, "file": f"{item.stem}.png", "prompt": item.prompt, "negative_prompt": item.negative_prompt,
        "seed": item.seed, "steps": item.steps, "cfg": item.cfg, "resolution": f"{width}x{height}",
        "width": width, "height": height, "temperature": list(_as_list(parse_temperature(cfg.temperature))),
        "token_temperature": cfg.token_temperature,
        "sampler": cfg.sampler_label, "text_encoder": text_encoder_label(cfg.text_encoder), "model": model, "dtype": dtype,
        "generator": generator, "variant": cfg.variant, "quantize": cfg.quantize, "offload": cfg.offload, "vq_decode": cfg.vq_decode,
        "seconds": round(seconds, 4),
    }


def text_encoder_label(folder: Optional[str]) -> Optional[str]:
    """What sidecars record of --text-encoder: the resolved folder, or None (the model's own)."""
    return str(Path(folder).expanduser().resolve()) if folder else None


def _as_list(t: Any) -> Sequence[float]:
    return t if isinstance(t, (tuple, list)) else (t,)


def changed_settings(done: dict[str, Any], expected: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The `keys` whose value in a finished output's sidecar `done` differs from this run's `expected`
    (a key older sidecars lack counts as its `_SIDECAR_DEFAULTS` value)."""
    return [k for k in keys if done.get(k, _SIDECAR_DEFAULTS.get(k)) != expected.get(k)
            and (k in done or k not in _COMPARED_WHEN_RECORDED)]


def generator_device(exact: bool, device: Any) -> str:
    """The device type whose random generator draws the tokens (what a sidecar records as `generator`):
    the CPU under --exact, else the sampling device, so a rerun on another kind of device is not "done"."""
    import torch

    return "cpu" if exact else torch.device(device).type


def _check_done_matches(out: Path, item: PromptItem, expected: dict[str, Any],
                        model: Optional[dict[str, Any]] = None) -> None:
    path = out / f"{item.stem}.json"
    done = read_done_sidecar(path)
    differ = changed_settings(done, expected, _MUST_MATCH) + other_model(done, model)
    if differ:
        changes = ", ".join(f"{k} {done.get(k)!r} there, {expected.get(k)!r} now" for k in differ)
        raise OutputExistsError(f"{path.name} in {out} was made with other settings ({changes}); nothing was written: "
                                f"use another --out")


def make_grid(images: Sequence[Any], captions: Sequence[str], columns: Optional[int] = None) -> Any:
    """A PIL grid of equally sized images, each with its caption (wrapped) underneath.

    Images narrower than `MIN_GRID_TILE` are enlarged by a whole factor with nearest-neighbour
    sampling (every pixel as the model made it, only bigger), so that captions fit beneath them.
    """
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    scale = max(1, math.ceil(MIN_GRID_TILE / w))
    if scale > 1:
        images = [image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST) for image in images]
        w, h = w * scale, h * scale
    font = ImageFont.load_default()
    char_w = max(1, int(font.getlength("x"))) if hasattr(font, "getlength") else 6
    line_h = 12
    wrapped = [textwrap.wrap(c, width=max(8, w // char_w))[:4] or [""] for c in captions]
    caption_h = line_h * max(len(x) for x in wrapped) + 6
    grid = Image.new("RGB", (cols * w, rows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * w, (i // cols) * (h + caption_h)
        grid.paste(image.convert("RGB"), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 3, y + h + 3 + j * line_h), line, fill="black", font=font)
    return grid


# ----------------------------------------------------------------------------------------------
# The run


def _batches(items: Sequence[PromptItem], size: int) -> list[list[PromptItem]]:
    """Consecutive runs of items with equal steps and cfg, at most `size` each."""
    out: list[list[PromptItem]] = []
    for item in items:
        if out and len(out[-1]) < size and (out[-1][0].steps, out[-1][0].cfg) == (item.steps, item.cfg):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def load_pipeline(cfg: SampleConfig) -> Any:
    """The `MeissonicPipeline` of `cfg`'s model settings (the one loading path of sample, the app, ...)."""
    from meissonic_cli.sample.pipeline import MeissonicPipeline, resolve_model_folder

    root = resolve_model_folder(cfg.model, allow_download=cfg.allow_download)
    return MeissonicPipeline.from_pretrained(root, device=cfg.device, dtype=cfg.dtype, text_encoder=cfg.text_encoder,
                                             variant=cfg.variant, lora=cfg.lora, quantize=cfg.quantize,
                                             offload=cfg.offload, compile=cfg.compile)


def run_sample(cfg: SampleConfig, progress: bool = True, pipeline: Any = None,
               on_step: Optional[Callable[[int, int], None]] = None) -> SampleResult:
    """Sample every prompt of `cfg` into `cfg.out`, skipping images already written.

    Everything that can be checked is checked before the first file is written: the prompts, the
    flags, the model folder, the resolution and the sidecars of done images.
    `pipeline` may be a loaded `MeissonicPipeline` (the model flag then only labels the sidecars);
    `on_step(step, total)` is called after each decoding step (the app's progress bar).
    """
    cfg.validate()
    items = read_prompts(cfg)
    temperature = parse_temperature(cfg.temperature)
    size = parse_resolution(cfg.resolution)
    from meissonic_cli.sample.outputs import (
        check_output_folder,
        check_replaceable,
        is_done,
        make_output_folder,
        model_identity,
        write_grid,
        write_output,
    )
    from meissonic_cli.sample.pipeline import resolve_device, resolve_dtype

    resolve_dtype(cfg.dtype)
    resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder")
    check_output_folder(out)
    model_id = model_identity(pipeline, cfg.model, cfg.allow_download, lora=cfg.lora)
    # A finished image counts as done only when it is intact and records this model (`outputs.is_done`).
    done = {it.index: is_done(out / f"{it.stem}.png", out / f"{it.stem}.json", model_id, _warn) for it in items}
    fresh = [it for it in items if not (out / f"{it.stem}.png").exists()]  # damaged images of ours are redone
    if cfg.grid and not cfg.overwrite and (out / GRID_NAME).exists() and fresh:
        raise OutputExistsError(f"{out / GRID_NAME} exists; pass --overwrite to replace it or use another --out")
    for item in items:
        if not done[item.index]:
            check_replaceable(out / f"{item.stem}.png", cfg.overwrite)
            check_replaceable(out / f"{item.stem}.json", cfg.overwrite)
    if pipeline is None:
        pipeline = load_pipeline(cfg)
    check_pipeline_quantize(pipeline, cfg.quantize)
    model_label = model_id["model"]
    width, height = size if size is not None else (pipeline.default_resolution,) * 2
    pipeline.check_resolution(height, width)
    from meissonic_cli.sample.guidance import check_negative_prompts  # imports torch: not at CLI start

    check_negative_prompts([it.negative_prompt for it in items if not done[it.index]], pipeline.transformer)
    dtype_name = str(pipeline.dtype).replace("torch.", "")
    generator = generator_device(cfg.exact, pipeline.device)

    todo = []
    for item in items:
        if done[item.index]:
            expected = {**_sidecar(item, cfg, width, height, model_label, 0.0, dtype_name, generator),
                        "lora": model_id["lora"]}
            _check_done_matches(out, item, expected, model_id)
        else:
            todo.append(item)

    result = SampleResult(out_dir=out, model=model_label, device=str(pipeline.device), dtype=dtype_name,
                          resolution=(width, height), skipped=len(items) - len(todo))
    make_output_folder(out)
    if getattr(pipeline, "offloader", None) is not None and todo:
        # Every prompt's text features first: the text encoder then never comes back between batches.
        from meissonic_cli.sample.offload import remember_prompts

        remember_prompts(pipeline, [it.prompt for it in todo] + [it.negative_prompt for it in todo if it.cfg > 1.0])
    with make_progress(progress) as bar:
        images_task = bar.add_task("images", total=len(items), completed=result.skipped)
        steps_task = bar.add_task("steps", total=todo[0].steps, visible=False) if todo else None
        for batch in _batches(todo, cfg.batch_size):
            first, last = batch[0].index, batch[-1].index
            bar.update(steps_task, total=batch[0].steps, completed=0, visible=True,
                       description=f"steps (image {first})" if first == last else f"steps (images {first}-{last})")
            start = time.perf_counter()
            images = pipeline(
                [it.prompt for it in batch], negative_prompt=[it.negative_prompt for it in batch],
                steps=batch[0].steps, guidance_scale=batch[0].cfg, height=height, width=width, temperature=temperature,
                token_temperature=cfg.token_temperature, seed=[it.seed for it in batch], exact=cfg.exact,
                sampler=cfg.sampler_options(), vq_decode=cfg.vq_decode,
                callback=lambda step, total: _step_done(bar, steps_task, on_step, step, total),
            )
            seconds = time.perf_counter() - start
            for item, image in zip(batch, images):
                png, side = out / f"{item.stem}.png", out / f"{item.stem}.json"
                meta = {**_sidecar(item, cfg, width, height, model_label, seconds / len(batch), dtype_name,
                                   generator),
                        "model_digest": model_id["model_digest"], "lora": model_id["lora"]}
                write_output(png, side, image, meta)
                result.written.append(png)
            result.seconds += seconds
            result.steps_run += batch[0].steps
            bar.advance(images_task, len(batch))

    if cfg.grid:
        from PIL import Image

        tiles = []
        for item in items:
            with Image.open(out / f"{item.stem}.png") as im:
                tiles.append(im.convert("RGB"))
        grid = make_grid(tiles, [it.prompt for it in items])
        result.grid = out / GRID_NAME
        write_grid(result.grid, grid, cfg.overwrite)
    return result


def _step_done(bar: Any, task: Any, on_step: Optional[Callable[[int, int], None]], step: int, total: int) -> None:
    bar.update(task, completed=step)
    if on_step is not None:
        on_step(step, total)


def summary_table(result: SampleResult) -> Any:
    """A rich table summarising a sample run."""
    rows = [("output", str(result.out_dir)), ("model", result.model),
            ("images written / skipped (done)", f"{len(result.written)} / {result.skipped}"),
            ("resolution", f"{result.resolution[0]}x{result.resolution[1]} on {result.device} ({result.dtype})")]
    if result.written:
        rows.append(("time", f"{result.seconds:.1f} s, {result.seconds_per_image:.2f} s/image, "
                             f"{result.seconds / max(1, result.steps_run):.3f} s/step"))
    if result.grid is not None:
        rows.append(("grid", str(result.grid)))
    return key_value_table("sample", rows)


__all__ = ["PromptItem", "SampleConfig", "SampleResult", "make_grid", "parse_resolution", "parse_temperature",
           "load_pipeline", "read_prompts", "run_sample", "slugify", "summary_table"]
