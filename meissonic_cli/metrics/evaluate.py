"""`meissonic eval`: score generated or edited images the way the paper does, with weights the user brings.

Suites (`--suite`, comma-separated):
- `clip`: CLIP-T for every image (torchmetrics' CLIPScore: rows are 100 x cos with the prompt, the set's
  score is max(mean, 0)); for edits (a sidecar with `source`) also CLIP-I (cos with the source image), L1
  (mean absolute pixel difference to the source, in [0, 1]) and, when the sidecar has `source_prompt`,
  CLIP-dir. Tables 7-9.
- `hps`: HPS v2 / v2.1 (`--hps-version`, Table 2) exactly as the `hpsv2` package scores (`hps.py`).
- `dino`: DINO ViT-S/16 CLS cosine between edit and source (Table 7).
- `fid`: FID against `--reference` (a folder of images or `.npz` statistics), as pytorch-fid or clean-fid
  computes it (`--fid-mode`, `fid_suite.py`).

Which files of a folder are scored is one rule (`images.scored_images`) for both FID sides.
- `shapes`: the weight-free shapes benchmark (`shapes_bench`), GenEval-style accuracies.

Inputs: `--images DIR` holding `NAME.png` + `NAME.json` sidecars (written by `sample` and `edit`:
`prompt`, optional `category`, and `source` for edits), or `--prompts FILE --model DIR`, which samples
the prompts first (through `sample.run_sample`, into `OUT/images`, resumable) and then scores them.

Weights only come from local files: flags (`--clip-checkpoint`, ...) or a `--weights-config` YAML/JSON
mapping `clip`, `hps`, `dino`, `inception` (and optionally `clip_model`, `hps_model`, `dino_model`) to
paths. Every missing file is named, with where to get it, before any model is loaded or image sampled.
Nothing is downloaded unless `--allow-download` is given (and HF_HUB_OFFLINE is unset).

Outputs in `--out`: `report.json` (settings, per-metric mean/std/n and per-category means, FID,
shapes accuracies, per-image rows), `report.md` (the same as tables, with the grid) and `grid.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from meissonic_cli.atomic import write_text
from meissonic_cli.config import MAX_BATCH, MAX_STEPS, Problems, field, read_json_object
from meissonic_cli.errors import ConfigError, InputError, OutputExistsError
from meissonic_cli.metrics.images import IMAGE_SUFFIXES, scored_images
from meissonic_cli.metrics.report import (  # noqa: F401  (re-exported: evaluate is the suite's entry point)
    GRID_TILE,
    HPS_CATEGORIES,
    METRIC_LABELS,
    _markdown,
    conventions,
    report_table,
    run_warnings,
    summarize_metrics,
    write_grid,
)
from meissonic_cli.metrics.scorer import Scorer, pixel_l1
from meissonic_cli.metrics.weights import (  # noqa: F401
    HPS_FILES,
    MODEL_KEYS,
    SUITE_WEIGHTS,
    WEIGHTS,
    WeightSpec,
    resolve_weights,
)
from meissonic_cli.progress import make_progress
from meissonic_cli.sample.outputs import check_output_folder, make_output_folder
from meissonic_cli.sample.sample import SampleConfig

SUITES: tuple[str, ...] = ("clip", "hps", "dino", "fid", "shapes")
# Suites implemented above this package (the shapes benchmark lives with the shapes world): they
# register themselves here, so metrics never imports them.
PLUGIN_PROVIDERS = {"shapes": "meissonic_cli.shapes.bench"}


@dataclass(frozen=True)
class PluginSuite:
    """A metric suite registered from outside this module.

    `start(items)` -> state (checks every item first, loading nothing: with --prompts it is also called on
    the planned items before anything is sampled); `score(state, item, image)` -> the image's report row
    fields; `finish(state)` -> what `write(result, out)` gets; `write` saves `outputs` (file names in
    --out, checked against overwriting before any work) and returns the report.json entry. `prompts()`
    (optional) gives the suite's own prompt set for `--prompts NAME`.
    """

    name: str
    start: Callable[[Sequence[Any]], Any]
    score: Callable[[Any, Any, Any], dict[str, Any]]
    finish: Callable[[Any], Any]
    write: Callable[[Any, Path], Any]
    prompts: Optional[Callable[[], list[Any]]] = None
    outputs: tuple[str, ...] = ()


_PLUGINS: dict[str, PluginSuite] = {}


def register_suite(suite: PluginSuite) -> None:
    """Make `suite.name` runnable by `run_eval` (and its prompts available to `--prompts NAME`)."""
    _PLUGINS[suite.name] = suite


def plugin_suite(name: str) -> PluginSuite:
    """The registered suite `name`, or an error naming the module that provides it."""
    if name not in _PLUGINS:
        provider = PLUGIN_PROVIDERS.get(name, "its module")
        raise ConfigError(f"suite {name!r} is not registered; import {provider} first "
                          f"(the `meissonic eval` command does this)")
    return _PLUGINS[name]


REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GRID_PNG = "grid.png"


@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=lambda: ["clip"],
                              help="Metric suites, comma-separated: clip (CLIP-T; for edits also CLIP-I, L1, CLIP-dir), "
                                   "hps (HPS v2/v2.1, see --hps-version), dino (DINO similarity to the edit's source), fid (against "
                                   "--reference), shapes (the weight-free shapes benchmark).", flag="--suite", short="-s")
    images: Optional[str] = field(None, help="Folder of images with NAME.json sidecars from `sample` or `edit` "
                                             "('prompt', optional 'category', 'source' for edits).", short="-i")
    prompts: Optional[str] = field(None, help="Instead of --images: prompts to sample with --model first: .txt, .jsonl or "
                                              ".json ({prompt, category}), - for standard input, a folder of "
                                              "CATEGORY.json/.txt files (the HPS v2 benchmark layout), or 'shapes' for "
                                              "the shapes benchmark prompts.")
    prompts_format: Optional[str] = field(None, help="Format of --prompts: txt, jsonl or json. Default: the file's ending; "
                                                     "standard input (-) and names without an ending (<(...)) are txt.")
    model: Optional[str] = field(None, help="Model folder that samples --prompts.", short="-m")
    out: Optional[str] = field(None, help="Report folder (report.json, report.md, grid.png); with --prompts the samples "
                                          "go to OUT/images. Default with --images: DIR-eval beside it.", short="-o")
    reference: Optional[str] = field(None, help="FID reference: a folder of real images, or a .npz with mu and sigma "
                                                "(pytorch-fid statistics).")
    clip_model: str = field("ViT-H-14", help="open_clip architecture for the clip suite: a config name or a model "
                                             "config .json. CLIP-T is torchmetrics' CLIPScore: 100 x cos(image, prompt) "
                                             "per image, the set's mean clamped at 0; prompts past 77 tokens are cut and "
                                             "counted. MagicBrush/EMU-Edit tables use ViT-B-32: numbers from another "
                                             "model are not comparable with theirs.")
    clip_checkpoint: Optional[str] = field(None, help="Local open_clip checkpoint for the clip suite "
                                                      "(open_clip_pytorch_model.bin of laion CLIP-ViT-H-14-laion2B-s32B-b79K).")
    hps_model: str = field("ViT-H-14", help="open_clip architecture the HPS checkpoint belongs to.")
    hps_checkpoint: Optional[str] = field(None, help="Local HPS checkpoint from xswu/HPSv2: HPS_v2_compressed.pt "
                                                     "(--hps-version 2.0) or HPS_v2.1_compressed.pt (2.1).")
    hps_version: str = field("2.0", help="HPS version: 2.0 (the paper's Table 2) or 2.1 (what recent papers "
                                         "report). Scored as the hpsv2 package does: longest side to 224, "
                                         "padded; 100 x cos.")
    dino_model: str = field("vits16", help="DINO ViT: vits16, vits8, vitb16, vitb8, or a .json of timm VisionTransformer "
                                           "arguments.")
    dino_checkpoint: Optional[str] = field(None, help="Local DINO checkpoint (dino_deitsmall16_pretrain.pth, or timm "
                                                      "vit_small_patch16_224.dino model.safetensors).")
    inception_checkpoint: Optional[str] = field(None, help="Local FID Inception weights "
                                                           "(pt_inception-2015-12-05-6726825d.pth).")
    fid_mode: str = field("pytorch-fid", help="FID convention: pytorch-fid (its calculate_fid_given_paths: bilinear "
                                              "resize to 299) or clean (clean-fid's mode='clean': PIL bicubic resize). "
                                              "FIDs of two modes are not comparable.")
    weights_config: Optional[str] = field(None, help="YAML/JSON file mapping clip, hps, dino, inception (and clip_model, "
                                                     "hps_model, dino_model) to local paths; flags win over it.")
    allow_download: bool = field(False, help="Download missing weights from their published location, and a --model "
                                             "hub id (owner/name) not in the local Hugging Face cache (not when "
                                             "HF_HUB_OFFLINE is set). Off: nothing is fetched.")
    device: str = field("auto", help="Device for the metric networks: auto, cpu, cuda, cuda:N.")
    overwrite: bool = field(False, help="Replace the files of an existing report in --out (report.json, report.md, "
                                        "grid.png, shapes_bench.json, fid_reference_stats.npz; default: refuse if "
                                        "any exists).")
    batch_size: int = field(32, bounds=(1, MAX_BATCH), help="Images per batch through the metric networks (FID, CLIP, "
                                                            "HPS, DINO); does not change a score.")
    images_per_prompt: int = field(1, bounds=(1, MAX_STEPS), help="With --prompts: images sampled per prompt (seeds differ).")
    grid: int = field(16, help="Images shown in the report's grid.png (0: no grid).", flag="--grid-size",
                      aliases=("--grid",))
    sample: SampleConfig = field(default_factory=SampleConfig,
                                 help="Sampler settings for --prompts (the `sample` command's settings).")

    def validate(self) -> "EvalConfig":
        from meissonic_cli.metrics.fid import FID_MODES  # torch: not at import time (keeps --help fast)

        p = Problems(self)
        unknown = [s for s in self.suites if s not in SUITES]
        p.check(bool(self.suites) and not unknown,
                f"--suite must list some of {', '.join(SUITES)}, got {','.join(self.suites) or 'nothing'}")
        p.check((self.images is None) != (self.prompts is None and self.model is None),
                "give --images DIR, or --prompts FILE with --model DIR (not both)")
        p.check(self.prompts is None or self.model is not None, "--prompts needs --model (the model that samples them)")
        p.check(self.model is None or self.prompts is not None,
                "--model samples --prompts: give --prompts FILE (or --prompts shapes)")
        p.check(self.images is None or Path(self.images).is_dir(), f"--images {self.images} is not a folder")
        p.check(self.prompts is None or self.out is not None, "--out is required with --prompts (samples go to OUT/images)")
        p.check("fid" not in self.suites or self.reference is not None,
                "--suite fid needs --reference (a folder of real images or a .npz with mu and sigma)")
        p.check(self.reference is None or Path(self.reference).exists(), f"--reference {self.reference} does not exist")
        p.check(1 <= self.batch_size <= 4096, f"--batch-size must be in 1..4096, got {self.batch_size}")
        p.check(self.fid_mode in FID_MODES, f"--fid-mode must be one of {', '.join(FID_MODES)}, got {self.fid_mode!r}")
        p.check(self.hps_version in HPS_FILES,
                f"--hps-version must be one of {', '.join(HPS_FILES)}, got {self.hps_version!r}")
        p.check(self.images_per_prompt >= 1, f"--images-per-prompt must be >= 1, got {self.images_per_prompt}")
        p.check(self.grid >= 0, f"--grid-size must be >= 0, got {self.grid}")
        p.check(self.prompts_format in (None, "", *PROMPT_FORMATS),
                f"--prompts-format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompts_format!r}")
        p.check(self.weights_config is None or Path(self.weights_config).is_file(),
                f"--weights-config {self.weights_config} is not a file")
        p.raise_if_any()
        return self

    @property
    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        images = Path(self.images or ".").resolve()
        return images.with_name(images.name + "-eval")


def parse_suites(text: str) -> list[str]:
    """'clip, hps' -> ['clip', 'hps'] (order kept, duplicates dropped)."""
    out: list[str] = []
    for part in str(text).split(","):
        name = part.strip().lower()
        if name and name not in out:
            out.append(name)
    return out


def eval_outputs(cfg: EvalConfig) -> list[str]:
    """The names of the files `run_eval` writes in --out (OUT/images, sampled resumably with --prompts, aside):
    the one list both the overwrite check (`check_outputs`) and the writers in `run_eval` go by."""
    from meissonic_cli.metrics.fid_suite import REFERENCE_STATS

    names = [REPORT_JSON, REPORT_MD] + ([GRID_PNG] if cfg.grid > 0 else [])
    if "fid" in cfg.suites and cfg.reference is not None and not Path(cfg.reference).is_file():
        names.append(REFERENCE_STATS)  # a reference folder's statistics, for the next run
    for suite in cfg.suites:
        if suite in _PLUGINS:
            names.extend(_PLUGINS[suite].outputs)
    return names


def check_outputs(cfg: EvalConfig) -> None:
    """Refuse (OutputExistsError) when a file `run_eval` would write exists in --out, unless --overwrite;
    a folder in the way is refused even then."""
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder")
    check_output_folder(out)
    present = [out / name for name in eval_outputs(cfg) if (out / name).exists() or (out / name).is_symlink()]
    folders = [p for p in present if p.is_dir()]
    if folders:
        raise OutputExistsError(f"{folders[0]} is a folder, where eval writes a file; move it or use another --out")
    if present and not cfg.overwrite:
        raise OutputExistsError(f"{', '.join(map(str, present))} exist{'s' if len(present) == 1 else ''}; "
                                f"pass --overwrite to replace {'it' if len(present) == 1 else 'them'}, or use another --out")


# ----------------------------------------------------------------------------------------------
# Images and sidecars


@dataclass
class EvalItem:
    """One image to score with what its sidecar says about it."""

    path: Path
    prompt: Optional[str] = None
    category: Optional[str] = None
    source: Optional[Path] = None
    source_prompt: Optional[str] = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _resolve_source(value: Any, sidecar: Path) -> Path:
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return path
    beside = sidecar.parent / path
    return beside if beside.exists() else path


def load_items(folder: str | os.PathLike) -> list[EvalItem]:
    """Every image in `folder` with its sidecar's prompt, category and source (if any).

    The images are those `images.scored_images` keeps (grids are not samples). An image without a
    sidecar gets an empty one (suites that need a prompt then say so). An unreadable sidecar is an error.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--images {root} is not a folder; expected NAME.png + NAME.json files from `sample` or `edit`")
    items = []
    for path in scored_images(root)[0]:
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            items.append(EvalItem(path))
            continue
        from meissonic_cli.readers import SIDECAR_SCHEMA

        meta = read_json_object(sidecar, error=InputError, hint="sidecars are written by `sample`/`edit`", schema=SIDECAR_SCHEMA)
        prompt = meta.get("prompt") if isinstance(meta.get("prompt"), str) else None
        category = meta.get("category") if isinstance(meta.get("category"), str) else None
        source = _resolve_source(meta["source"], sidecar) if meta.get("source") else None
        source_prompt = meta.get("source_prompt") if isinstance(meta.get("source_prompt"), str) else None
        items.append(EvalItem(path, prompt, category, source, source_prompt, meta))
    if not items:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}); run `meissonic sample` or `meissonic edit` "
                         f"into it first")
    return items


def check_items(items: Sequence[EvalItem], suites: Sequence[str]) -> None:
    """Raise InputError if some image lacks what a requested suite needs (prompt, source)."""
    problems = []

    def need(ok: Callable[[EvalItem], bool], what: str, suite: str) -> None:
        bad = [it for it in items if not ok(it)]
        if bad:
            problems.append(f"--suite {suite} needs {what} in every sidecar; {len(bad)} of {len(items)} images lack it "
                            f"(first: {bad[0].path.name})")

    if "clip" in suites or "hps" in suites or "shapes" in suites:
        need(lambda it: bool(it.prompt), "a 'prompt'", ",".join(s for s in suites if s in ("clip", "hps", "shapes")))
    if "dino" in suites:
        need(lambda it: it.source is not None, "a 'source' image (written by `meissonic edit`)", "dino")
    missing = [it for it in items if it.source is not None and not it.source.is_file()]
    if missing:
        problems.append(f"{len(missing)} source image(s) named by sidecars do not exist (first: {missing[0].source} "
                        f"for {missing[0].path.name})")
    if problems:
        raise InputError("; ".join(problems))


@dataclass
class PromptEntry:
    prompt: str
    category: Optional[str] = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# The keys a row of a user's prompt file may have (the HPS v2 benchmark's CATEGORY.json files are lists of
# strings; a built-in set such as 'shapes' adds its own checked keys, e.g. `expects`, in code).
PROMPT_KEYS = ("prompt", "category")


def _entries_from_json(data: Any, where: str) -> list[PromptEntry]:
    if isinstance(data, dict):  # {"anime": [...], "photo": [...]}: one list per category
        return [e for cat, rows in data.items() for e in _entry_list(rows, f"{where}[{cat!r}]", str(cat))]
    return _entry_list(data, where, None)


def _entry_list(data: Any, where: str, category: Optional[str]) -> list[PromptEntry]:
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list of prompts (strings or objects with 'prompt'), "
                         f"got {type(data).__name__}")
    return [_entry(row, f"{where} item {i + 1}", category) for i, row in enumerate(data)]


def _entry(row: Any, where: str, category: Optional[str]) -> PromptEntry:
    """One prompt: a non-empty string, or an object with only `PROMPT_KEYS` whose values are text."""
    if isinstance(row, str):
        if not row.strip():
            raise InputError(f"{where}: the prompt is empty")
        return PromptEntry(row.strip(), category)
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a non-empty prompt string or an object with a 'prompt', got "
                         f"{type(row).__name__}: {row!r}"[:300])
    unknown = sorted(set(row) - set(PROMPT_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(PROMPT_KEYS)}"[:300])
    if "prompt" not in row:
        raise InputError(f"{where}: missing 'prompt'")
    for key in PROMPT_KEYS:
        if key in row and not isinstance(row[key], str):
            raise InputError(f"{where}: {key!r} must be text, got {row[key]!r}"[:300])
    if not row["prompt"].strip():
        raise InputError(f"{where}: 'prompt' is empty")
    if "category" in row and not row["category"].strip():
        raise InputError(f"{where}: 'category' is empty (leave it out for none)")
    return PromptEntry(row["prompt"].strip(), row["category"].strip() if "category" in row else category)


PROMPT_FORMATS = ("txt", "jsonl", "json")


def read_eval_prompts(spec: str, fmt: Optional[str] = None) -> list[PromptEntry]:
    """Prompts (with categories) from a file, standard input (-), a pipe, a folder of CATEGORY files, or
    'shapes'. `fmt` (--prompts-format) names a file's format; by default its ending, txt without one."""
    from meissonic_cli.textfiles import STDIN

    if spec in _PLUGINS and _PLUGINS[spec].prompts is not None:
        return _PLUGINS[spec].prompts()
    path = Path(spec)
    if spec != STDIN and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".txt", ".jsonl"))
        if not files:
            raise InputError(f"--prompts {path}: no CATEGORY.json/.txt/.jsonl files (the HPS v2 benchmark layout)")
        return [PromptEntry(e.prompt, e.category or f.stem, e.extra) for f in files for e in _read_prompt_file(f)]
    if spec != STDIN and not path.exists():
        raise InputError(f"--prompts {path}: no such file; give a .txt/.jsonl/.json file, - for standard input, a folder "
                         "of them, or 'shapes'")
    return _read_prompt_file(path if spec != STDIN else None, fmt)


def _read_prompt_file(path: Optional[Path], fmt: Optional[str] = None) -> list[PromptEntry]:
    """The entries of one prompt file (`path` None: standard input), in format `fmt` or the file's ending."""
    from meissonic_cli.readers import parse_json
    from meissonic_cli.textfiles import STDIN, jsonl_lines, read_text, txt_lines

    text = read_text(STDIN if path is None else str(path), "--prompts")
    name = "(stdin)" if path is None else str(path)
    suffix = fmt or ("" if path is None else path.suffix.lower().lstrip(".")) or "txt"
    entries: list[PromptEntry] = []
    if suffix == "json":  # bounded: nesting and huge numbers are one error; NaN/Infinity are refused below
        entries = _entries_from_json(parse_json(text, name), name)
    elif suffix == "jsonl":
        for number, line in enumerate(jsonl_lines(text), start=1):
            if line.strip():
                where = f"{name} line {number}"
                entries.append(_entry(parse_json(line, where), where, None))
    elif suffix == "txt":
        entries = [PromptEntry(line.strip()) for line in txt_lines(text) if line.strip() and not line.strip().startswith("#")]
    else:
        raise InputError(f"--prompts {name}: expected .txt (one prompt per line), .jsonl or .json, or name the format "
                         "with --prompts-format txt|jsonl|json")
    if not entries:
        raise InputError(f"--prompts {name}: no prompts")
    return entries


def _entry_meta(entry: PromptEntry) -> dict[str, Any]:
    """What the prompt file adds to an image's sidecar: its category and a built-in set's own keys."""
    return {k: v for k, v in {"category": entry.category, **entry.extra}.items() if v is not None}


def _sample_plan(cfg: EvalConfig, prompts: list[PromptEntry]) -> tuple[SampleConfig, list[PromptEntry], list[EvalItem]]:
    """The `sample` settings for `prompts`, one entry per image, and the items the images will be."""
    from meissonic_cli.sample.sample import read_prompts

    entries = [e for e in prompts for _ in range(cfg.images_per_prompt)]
    images_dir = cfg.out_dir / "images"
    sample_cfg = dataclasses.replace(cfg.sample, model=str(cfg.model), prompt=[e.prompt for e in entries],
                                     prompts=None, out=str(images_dir), grid=False, allow_download=cfg.allow_download)
    planned = [EvalItem(images_dir / f"{p.stem}.png", e.prompt, e.category,
                        meta={"prompt": e.prompt, **_entry_meta(e)})
               for e, p in zip(entries, read_prompts(sample_cfg))]
    return sample_cfg, entries, planned


def check_prompts(cfg: EvalConfig, planned: list[EvalItem]) -> None:
    """Raise InputError if some planned image cannot serve a requested suite (a shapes suite and a prompt that
    is not a shapes-world caption, dino without a source image...); `sample_prompts` calls it before sampling."""
    check_items(planned, cfg.suites)
    for suite in cfg.suites:
        if suite in _PLUGINS:
            plugin_suite(suite).start(planned)  # checks every item; the state is dropped


def sample_prompts(cfg: EvalConfig, progress: bool = True, pipeline: Any = None,
                   prompts: Optional[list[PromptEntry]] = None) -> list[EvalItem]:
    """Sample `cfg.prompts` (or the `prompts` already read from it: standard input reads once) with
    `cfg.model` into OUT/images (resumable) and return the items to score.

    Sampling goes through `sample.run_sample`; the categories (and shapes expectations) of the prompt
    file are added to each sidecar so that a later `eval --images OUT/images` sees them too.
    """
    from meissonic_cli.readers import read_json_object
    from meissonic_cli.sample.sample import run_sample

    if prompts is None:
        prompts = read_eval_prompts(str(cfg.prompts), cfg.prompts_format or None)
    sample_cfg, entries, planned = _sample_plan(cfg, prompts)
    check_prompts(cfg, planned)  # a prompt no requested suite can score fails before anything is sampled
    run_sample(sample_cfg, progress=progress, pipeline=pipeline)
    items = []
    for entry, item in zip(entries, planned):
        sidecar = item.path.with_suffix(".json")
        meta = read_json_object(sidecar, "sidecar")
        extra = {k: v for k, v in _entry_meta(entry).items() if k not in meta}
        if extra:
            meta.update(extra)
            write_text(sidecar, json.dumps(meta, indent=2, allow_nan=False) + "\n")
        items.append(EvalItem(item.path, entry.prompt, entry.category, meta=meta))
    return items


# ----------------------------------------------------------------------------------------------
# Scoring


def run_eval(cfg: EvalConfig, progress: bool = True, pipeline: Any = None) -> dict[str, Any]:
    """Score images (sampling them first with --prompts), write the reports and return report.json's content.

    Weights and inputs are all checked before anything is sampled or any metric network is loaded.
    `pipeline` may be a loaded `MeissonicPipeline` for --prompts (the CLI loads it from --model).
    """
    cfg.validate()
    weights, models = resolve_weights(cfg)
    from meissonic_cli.sample.pipeline import resolve_device

    device = resolve_device(cfg.device)
    out = cfg.out_dir
    outputs = eval_outputs(cfg)
    check_outputs(cfg)
    if cfg.images is not None:
        items = load_items(cfg.images)
        check_items(items, cfg.suites)
    else:
        prompts = read_eval_prompts(str(cfg.prompts), cfg.prompts_format or None)  # bad prompts fail before sampling
        items = sample_prompts(cfg, progress=progress, pipeline=pipeline, prompts=prompts)
        check_items(items, cfg.suites)
    if "fid" in cfg.suites and len(items) < 2:
        raise InputError(f"--suite fid needs at least 2 images, found {len(items)}")

    with make_progress(progress, remaining=False) as bar:
        scorer = Scorer(cfg, items, weights, models, device, bar)
        for suite in cfg.suites:
            if suite in _PLUGINS:
                scorer.plugin(plugin_suite(suite))
            elif suite == "fid":
                scorer.fid(out)
            else:
                getattr(scorer, suite)()

    report: dict[str, Any] = {
        "suites": list(cfg.suites),
        "images": str(items[0].path.parent),
        "count": len(items),
        "settings": {
            "device": str(device),
            "weights": {k: str(v) for k, v in weights.items()},
            **({"hps_version": cfg.hps_version} if "hps" in cfg.suites else {}),
            **({"fid_mode": cfg.fid_mode} if "fid" in cfg.suites else {}),
            "models": {k: v for k, v in models.items()
                       if {"clip_model": "clip", "hps_model": "hps", "dino_model": "dino"}[k] in cfg.suites},
            **({"model": cfg.model, "prompts": cfg.prompts, "images_per_prompt": cfg.images_per_prompt,
                "sampler": {k: getattr(cfg.sample, k) for k in ("steps", "cfg", "seed", "resolution", "temperature",
                                                                 "token_temperature", "negative_prompt", "dtype",
                                                                 "exact", "quantize", "vq_decode")}}
               if cfg.prompts else {}),
        },
        "metrics": summarize_metrics(scorer.rows, labels={"hps": f"HPS v{cfg.hps_version} (100 cos)"}),
        "conventions": conventions(cfg, models),
    }
    if "fid" in scorer.extra:
        report["fid"] = scorer.extra["fid"]
    truncated = {k.split("_")[0]: scorer.extra[k] for k in ("clip_truncated", "hps_truncated") if k in scorer.extra}
    if truncated:
        report["truncated_prompts"] = truncated
    report["warnings"] = run_warnings(report, models)
    for name in cfg.suites:
        if name in _PLUGINS:
            report[name] = _PLUGINS[name].write(scorer.extra[name], out)
    report["per_image"] = scorer.rows

    make_output_folder(out)
    grid = write_grid(items, scorer.rows, out / GRID_PNG, cfg.grid) if GRID_PNG in outputs else None
    report["grid"] = str(grid) if grid else None
    write_text(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    write_text(out / REPORT_MD, _markdown(report, grid.name if grid else None))
    return report


__all__ = ["EvalConfig", "EvalItem", "GRID_PNG", "IMAGE_SUFFIXES", "METRIC_LABELS", "PluginSuite", "PromptEntry", "REPORT_JSON", "REPORT_MD", "SUITES",
           "WEIGHTS", "check_items", "check_outputs", "check_prompts", "eval_outputs", "load_items", "parse_suites", "pixel_l1", "read_eval_prompts", "report_table",
           "register_suite", "resolve_weights", "run_eval", "sample_prompts", "summarize_metrics", "write_grid"]
