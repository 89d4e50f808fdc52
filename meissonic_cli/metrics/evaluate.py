"""`meissonic eval`: score generated or edited images the way the paper does, with weights the user brings.

Suites (`--suite`, comma-separated):
- `clip`: CLIP-T for every image (CLIPScore, 100 x cos with its prompt); for edits (a sidecar with
  `source`) also CLIP-I (cos with the source image), L1 (mean absolute pixel difference to the source,
  in [0, 1]) and, when the sidecar has `source_prompt`, CLIP-dir. Tables 7-9.
- `hps`: HPS v2 (Table 2): 100 x cos(image, prompt) under the HPS v2 checkpoint of open_clip ViT-H-14.
- `dino`: DINO ViT-S/16 CLS cosine between edit and source (Table 7).
- `fid`: FID against `--reference` (a folder of images or pytorch-fid `.npz` statistics).
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
from meissonic_cli.config import Problems, field, read_json_object
from meissonic_cli.errors import ConfigError, InputError, OutputExistsError
from meissonic_cli.metrics.report import (  # noqa: F401  (re-exported: evaluate is the suite's entry point)
    GRID_TILE,
    HPS_CATEGORIES,
    METRIC_LABELS,
    _markdown,
    report_table,
    summarize_metrics,
    write_grid,
)
from meissonic_cli.metrics.report import open_rgb as _open_rgb
from meissonic_cli.metrics.weights import (  # noqa: F401
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

    `start(items)` -> state (checks every item first); `score(state, item, image)` -> the image's report row
    fields; `finish(state)` -> what `write(result, out)` gets; `write` saves extra files and returns the
    report.json entry. `prompts()` (optional) gives the suite's own prompt set for `--prompts NAME`.
    """

    name: str
    start: Callable[[Sequence[Any]], Any]
    score: Callable[[Any, Any, Any], dict[str, Any]]
    finish: Callable[[Any], Any]
    write: Callable[[Any, Path], Any]
    prompts: Optional[Callable[[], list[Any]]] = None


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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GRID_PNG = "grid.png"




@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=lambda: ["clip"],
                              help="Metric suites, comma-separated: clip (CLIP-T; for edits also CLIP-I, L1, CLIP-dir), "
                                   "hps (HPS v2), dino (DINO similarity to the edit's source), fid (against "
                                   "--reference), shapes (the weight-free shapes benchmark).", flag="--suite", short="-s")
    images: Optional[str] = field(None, help="Folder of images with NAME.json sidecars from `sample` or `edit` "
                                             "('prompt', optional 'category', 'source' for edits).", short="-i")
    prompts: Optional[str] = field(None, help="Instead of --images: prompts to sample with --model first: .txt, .jsonl or "
                                              ".json ({prompt, category}), a folder of CATEGORY.json/.txt files (the HPS "
                                              "v2 benchmark layout), or 'shapes' for the shapes benchmark prompts.")
    model: Optional[str] = field(None, help="Model folder that samples --prompts.", short="-m")
    out: Optional[str] = field(None, help="Report folder (report.json, report.md, grid.png); with --prompts the samples "
                                          "go to OUT/images. Default with --images: DIR-eval beside it.", short="-o")
    reference: Optional[str] = field(None, help="FID reference: a folder of real images, or a .npz with mu and sigma "
                                                "(pytorch-fid statistics).")
    clip_model: str = field("ViT-H-14", help="open_clip architecture for the clip suite: a config name or a model "
                                             "config .json.")
    clip_checkpoint: Optional[str] = field(None, help="Local open_clip checkpoint for the clip suite "
                                                      "(open_clip_pytorch_model.bin of laion CLIP-ViT-H-14-laion2B-s32B-b79K).")
    hps_model: str = field("ViT-H-14", help="open_clip architecture the HPS v2 checkpoint belongs to.")
    hps_checkpoint: Optional[str] = field(None, help="Local HPS v2 checkpoint (HPS_v2_compressed.pt from xswu/HPSv2).")
    dino_model: str = field("vits16", help="DINO ViT: vits16, vits8, vitb16, vitb8, or a .json of timm VisionTransformer "
                                           "arguments.")
    dino_checkpoint: Optional[str] = field(None, help="Local DINO checkpoint (dino_deitsmall16_pretrain.pth, or timm "
                                                      "vit_small_patch16_224.dino model.safetensors).")
    inception_checkpoint: Optional[str] = field(None, help="Local FID Inception weights "
                                                           "(pt_inception-2015-12-05-6726825d.pth).")
    weights_config: Optional[str] = field(None, help="YAML/JSON file mapping clip, hps, dino, inception (and clip_model, "
                                                     "hps_model, dino_model) to local paths; flags win over it.")
    allow_download: bool = field(False, help="Download missing weights from their published location (not when "
                                             "HF_HUB_OFFLINE is set). Off: nothing is fetched.")
    device: str = field("auto", help="Device for the metric networks: auto, cpu, cuda, cuda:N.")
    overwrite: bool = field(False, help="Replace report.json, report.md and grid.png of an existing report in --out "
                                        "(default: refuse).")
    batch_size: int = field(16, help="Images per batch through the metric networks.")
    images_per_prompt: int = field(1, help="With --prompts: images sampled per prompt (seeds differ).")
    grid: int = field(16, help="Images shown in the report's grid.png (0: no grid).", flag="--grid-size",
                      aliases=("--grid",))
    sample: SampleConfig = field(default_factory=SampleConfig,
                                 help="Sampler settings for --prompts (the `sample` command's settings).")

    def validate(self) -> "EvalConfig":
        p = Problems()
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
        p.check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        p.check(self.images_per_prompt >= 1, f"--images-per-prompt must be >= 1, got {self.images_per_prompt}")
        p.check(self.grid >= 0, f"--grid-size must be >= 0, got {self.grid}")
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


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _resolve_source(value: Any, sidecar: Path) -> Path:
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return path
    beside = sidecar.parent / path
    return beside if beside.exists() else path


def load_items(folder: str | os.PathLike) -> list[EvalItem]:
    """Every image in `folder` with its sidecar's prompt, category and source (if any).

    An image without a sidecar gets an empty one (suites that need a prompt then say so), except a
    sampler grid (`grid.png`), which is not a sample. An unreadable sidecar is an error.
    """
    from meissonic_cli.sample.sample import GRID_NAME

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--images {root} is not a folder; expected NAME.png + NAME.json files from `sample` or `edit`")
    items = []
    for path in _image_files(root):
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            if path.name != GRID_NAME:
                items.append(EvalItem(path))
            continue
        meta = read_json_object(sidecar, error=InputError, hint="sidecars are written by `sample`/`edit`")
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


def _entries_from_json(data: Any, where: str, category: Optional[str] = None) -> list[PromptEntry]:
    if isinstance(data, dict):
        # {"anime": [...], "photo": [...]}: one list per category
        return [e for cat, rows in data.items() for e in _entries_from_json(rows, f"{where}[{cat}]", str(cat))]
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list of prompts (strings or objects with 'prompt')")
    out = []
    for i, row in enumerate(data):
        out.append(_entry(row, f"{where} item {i + 1}", category))
    return out


def _entry(row: Any, where: str, category: Optional[str]) -> PromptEntry:
    if isinstance(row, str) and row.strip():
        return PromptEntry(row.strip(), category)
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        cat = row.get("category", category)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "category")}
        return PromptEntry(row["prompt"].strip(), None if cat is None else str(cat), extra)
    raise InputError(f"{where}: expected a non-empty prompt string or an object with a 'prompt'")


def read_eval_prompts(spec: str) -> list[PromptEntry]:
    """Prompts (with categories) from a file, a folder of CATEGORY files, or 'shapes'."""
    if spec in _PLUGINS and _PLUGINS[spec].prompts is not None:
        return _PLUGINS[spec].prompts()
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".txt", ".jsonl"))
        if not files:
            raise InputError(f"--prompts {path}: no CATEGORY.json/.txt/.jsonl files (the HPS v2 benchmark layout)")
        return [PromptEntry(e.prompt, e.category or f.stem, e.extra) for f in files for e in _read_prompt_file(f)]
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file; give a .txt/.jsonl/.json file, a folder of them, or 'shapes'")
    return _read_prompt_file(path)


def _read_prompt_file(path: Path) -> list[PromptEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from None
    suffix = path.suffix.lower()
    entries: list[PromptEntry] = []
    if suffix == ".json":
        try:
            entries = _entries_from_json(json.loads(text), str(path))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    elif suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path} line {number}: not valid JSON ({err.msg})") from None
                entries.append(_entry(row, f"{path} line {number}", None))
    elif suffix == ".txt":
        entries = [PromptEntry(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    else:
        raise InputError(f"--prompts {path}: expected .txt (one prompt per line), .jsonl or .json")
    if not entries:
        raise InputError(f"--prompts {path}: no prompts")
    return entries




def sample_prompts(cfg: EvalConfig, progress: bool = True, pipeline: Any = None) -> list[EvalItem]:
    """Sample `cfg.prompts` with `cfg.model` into OUT/images (resumable) and return the items to score.

    Sampling goes through `sample.run_sample`; the categories (and shapes expectations) of the prompt
    file are added to each sidecar so that a later `eval --images OUT/images` sees them too.
    """
    from meissonic_cli.sample.sample import read_prompts, run_sample

    entries = [e for e in read_eval_prompts(str(cfg.prompts)) for _ in range(cfg.images_per_prompt)]
    images_dir = cfg.out_dir / "images"
    sample_cfg = dataclasses.replace(cfg.sample, model=str(cfg.model), prompt=[e.prompt for e in entries],
                                     prompts=None, out=str(images_dir), grid=False)
    run_sample(sample_cfg, progress=progress, pipeline=pipeline)
    items = []
    for entry, prompt_item in zip(entries, read_prompts(sample_cfg)):
        png, sidecar = images_dir / f"{prompt_item.stem}.png", images_dir / f"{prompt_item.stem}.json"
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        extra = {k: v for k, v in {"category": entry.category, **entry.extra}.items()
                 if v is not None and k not in meta}
        if extra:
            meta.update(extra)
            write_text(sidecar, json.dumps(meta, indent=2) + "\n")
        items.append(EvalItem(png, entry.prompt, entry.category, meta=meta))
    return items


# ----------------------------------------------------------------------------------------------
# Scoring


def _batches(items: Sequence[EvalItem], size: int) -> list[Sequence[EvalItem]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def pixel_l1(image: Any, source: Any) -> float:
    """Mean absolute pixel difference in [0, 1]; the source is resized to the image's size first."""
    import numpy as np
    from PIL import Image

    if source.size != image.size:
        source = source.resize(image.size, Image.BICUBIC)
    a = np.asarray(image, dtype=np.float32) / 255.0
    b = np.asarray(source, dtype=np.float32) / 255.0
    return float(np.abs(a - b).mean())


class _Scorer:
    """Runs the suites over the items, one metric network at a time, filling `rows`."""

    def __init__(self, cfg: EvalConfig, items: Sequence[EvalItem], weights: dict[str, Path], models: dict[str, str],
                 device: Any, progress: Any):
        self.cfg, self.items, self.weights, self.models = cfg, items, weights, models
        self.device, self.progress = device, progress
        self.rows: list[dict[str, Any]] = [{"file": it.path.name, "prompt": it.prompt, "category": it.category,
                                            **({"source": str(it.source)} if it.source else {})} for it in items]
        self.extra: dict[str, Any] = {}

    def _loop(self, label: str, fn: Callable[[Sequence[EvalItem], list[dict[str, Any]]], None]) -> None:
        task = self.progress.add_task(label, total=len(self.items))
        for start in range(0, len(self.items), self.cfg.batch_size):
            batch = self.items[start:start + self.cfg.batch_size]
            fn(batch, self.rows[start:start + len(batch)])
            self.progress.advance(task, len(batch))

    @staticmethod
    def _free(*objects: Any) -> None:
        import torch

        del objects
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clip(self) -> None:
        from meissonic_cli.metrics.clip import clip_direction, cosine_rows, load_clip

        model = load_clip(self.models["clip_model"], self.weights["clip"], self.device, "open_clip")

        def run(batch: Sequence[EvalItem], rows: list[dict[str, Any]]) -> None:
            images = [_open_rgb(it.path) for it in batch]
            img = model.image_features(images)
            txt = model.text_features([it.prompt or "" for it in batch])
            for row, cos in zip(rows, cosine_rows(img, txt)):
                row["clip_t"] = 100.0 * max(cos, 0.0)
            edited = [k for k, it in enumerate(batch) if it.source is not None]
            if not edited:
                return
            sources = [_open_rgb(batch[k].source) for k in edited]
            src = model.image_features(sources)
            for j, k in enumerate(edited):
                rows[k]["clip_i"] = cosine_rows(img[k:k + 1], src[j:j + 1])[0]
                rows[k]["l1"] = pixel_l1(images[k], sources[j])
            directed = [j for j, k in enumerate(edited) if batch[k].source_prompt]
            if directed:
                ks = [edited[j] for j in directed]
                src_txt = model.text_features([batch[k].source_prompt or "" for k in ks])
                values = clip_direction(img[ks], src[directed], txt[ks], src_txt)
                for k, value in zip(ks, values):
                    rows[k]["clip_dir"] = value

        self._loop("CLIP", run)
        self._free(model)

    def hps(self) -> None:
        from meissonic_cli.metrics.clip import cosine_rows, load_clip

        model = load_clip(self.models["hps_model"], self.weights["hps"], self.device, "HPS v2")

        def run(batch: Sequence[EvalItem], rows: list[dict[str, Any]]) -> None:
            img = model.image_features([_open_rgb(it.path) for it in batch])
            txt = model.text_features([it.prompt or "" for it in batch])
            for row, cos in zip(rows, cosine_rows(img, txt)):
                row["hps"] = 100.0 * cos

        self._loop("HPS v2", run)
        self._free(model)

    def dino(self) -> None:
        from meissonic_cli.metrics.clip import cosine_rows
        from meissonic_cli.metrics.dino import load_dino

        model = load_dino(self.models["dino_model"], self.weights["dino"], self.device)

        def run(batch: Sequence[EvalItem], rows: list[dict[str, Any]]) -> None:
            a = model.features([_open_rgb(it.path) for it in batch])
            b = model.features([_open_rgb(it.source) for it in batch])  # type: ignore[arg-type]
            for row, cos in zip(rows, cosine_rows(a, b)):
                row["dino"] = cos

        self._loop("DINO", run)
        self._free(model)

    def fid(self) -> None:
        import numpy as np

        from meissonic_cli.metrics.fid import (
            feature_stats,
            fid_from_features,
            frechet_distance,
            inception_features,
            load_inception,
            load_reference_stats,
        )

        model = load_inception(self.weights["inception"], self.device)
        feats: list[Any] = []
        self._loop("FID features", lambda batch, rows: feats.append(
            inception_features(model, [_open_rgb(it.path) for it in batch], self.device)))
        generated = np.concatenate(feats)
        reference = Path(str(self.cfg.reference))
        if reference.is_file():
            mu, sigma = load_reference_stats(reference)
            value = frechet_distance(*feature_stats(generated), mu, sigma)
            n_ref: Optional[int] = None
        else:
            ref_paths = _image_files(reference)
            if len(ref_paths) < 2:
                raise InputError(f"--reference {reference}: FID needs at least 2 reference images, found {len(ref_paths)}")
            if reference.resolve() == self.items[0].path.parent.resolve() and len(ref_paths) == len(self.items):
                ref = generated  # the same folder: its features are already computed
            else:
                ref_items = [EvalItem(p) for p in ref_paths]
                ref_feats: list[Any] = []
                task = self.progress.add_task("FID reference", total=len(ref_items))
                for batch in _batches(ref_items, self.cfg.batch_size):
                    ref_feats.append(inception_features(model, [_open_rgb(it.path) for it in batch], self.device))
                    self.progress.advance(task, len(batch))
                ref = np.concatenate(ref_feats)
            value = fid_from_features(generated, ref)
            n_ref = len(ref_paths)
        self.extra["fid"] = {"value": value, "images": len(self.items), "reference": str(reference),
                             "reference_images": n_ref}
        self._free(model)

    def plugin(self, name: str) -> None:
        """A suite registered with `register_suite` (e.g. `shapes`, by `meissonic_cli.shapes.bench`)."""
        suite = plugin_suite(name)
        state = suite.start(self.items)

        def run(batch: Sequence[EvalItem], rows: list[dict[str, Any]]) -> None:
            for it, row in zip(batch, rows):
                row.update(suite.score(state, it, _open_rgb(it.path)))

        self._loop(name, run)
        self.extra[name] = suite.finish(state)


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
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder")
    check_output_folder(out)
    if (out / REPORT_JSON).exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out / REPORT_JSON} exists; pass --overwrite to replace the report, or use another --out")
    if cfg.images is not None:
        items = load_items(cfg.images)
        check_items(items, cfg.suites)
    else:
        read_eval_prompts(str(cfg.prompts))  # a bad prompt file fails before the model loads
        items = sample_prompts(cfg, progress=progress, pipeline=pipeline)
        check_items(items, cfg.suites)
    if "fid" in cfg.suites and len(items) < 2:
        raise InputError(f"--suite fid needs at least 2 images, found {len(items)}")

    with make_progress(progress, remaining=False) as bar:
        scorer = _Scorer(cfg, items, weights, models, device, bar)
        for suite in cfg.suites:
            if suite in _PLUGINS:
                scorer.plugin(suite)
            else:
                getattr(scorer, suite)()

    report: dict[str, Any] = {
        "suites": list(cfg.suites),
        "images": str(items[0].path.parent),
        "count": len(items),
        "settings": {
            "device": str(device),
            "weights": {k: str(v) for k, v in weights.items()},
            "models": {k: v for k, v in models.items()
                       if {"clip_model": "clip", "hps_model": "hps", "dino_model": "dino"}[k] in cfg.suites},
            **({"model": cfg.model, "prompts": cfg.prompts, "images_per_prompt": cfg.images_per_prompt,
                "sampler": {k: getattr(cfg.sample, k) for k in ("steps", "cfg", "seed", "resolution", "temperature",
                                                                 "token_temperature", "negative_prompt", "dtype",
                                                                 "exact", "quantize")}}
               if cfg.prompts else {}),
        },
        "metrics": summarize_metrics(scorer.rows),
    }
    if "fid" in scorer.extra:
        report["fid"] = scorer.extra["fid"]
    for name in cfg.suites:
        if name in _PLUGINS:
            report[name] = _PLUGINS[name].write(scorer.extra[name], out)
    report["per_image"] = scorer.rows

    make_output_folder(out)
    grid = write_grid(items, scorer.rows, out / GRID_PNG, cfg.grid)
    report["grid"] = str(grid) if grid else None
    write_text(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    write_text(out / REPORT_MD, _markdown(report, grid.name if grid else None))
    return report


__all__ = ["EvalConfig", "EvalItem", "GRID_PNG", "METRIC_LABELS", "PluginSuite", "PromptEntry", "REPORT_JSON", "REPORT_MD", "SUITES",
           "WEIGHTS", "check_items", "load_items", "parse_suites", "pixel_l1", "read_eval_prompts", "report_table",
           "register_suite", "resolve_weights", "run_eval", "sample_prompts", "summarize_metrics", "write_grid"]
