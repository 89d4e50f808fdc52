"""Image shards -> token shards: VQ code grids, CLIP text features and micro-conditions.

Precomputing codes and text features once is what makes training cheap: the trainer never runs
the VQ encoder (the official training script re-encodes every image at every step).

Input is webdataset image shards as img2dataset writes them (`NNNNN.tar` holding
`<key>.jpg|png|webp`, `<key>.txt`, `<key>.json`), a folder of images with same-stem `.txt`
captions (and optionally same-stem `.json` metadata, whose `caption` / `text` / `--caption-col` key
is the caption when there is no `.txt`), or a table of image paths or URLs plus captions (reading
them: `sources.py`, `tables.py`). Each input shard becomes one output shard (`tokens-NNNNN.tar`, see `shards.py` for
the format); a folder is cut into shards of `shard_size` images, a table into shards of
`shard_size` rows (keys `rowNNNNNNNNN`). That one-to-one mapping is the resume unit: a rerun skips
output shards whose stats file exists and redoes the others. A missing file, a failed fetch or an
undecodable image is one failed sample, listed in its shard's stats file.

Every image is prepared exactly as training expects (the official `process_image`): EXIF
orientation applied, RGB, shorter side resized to R (bilinear, antialiased), an R x R crop (centre,
or random with `random_crop`), scaled to [0, 1]. Micro-conditions are
`[original width, original height, crop top, crop left, score]`: the original size comes from
the metadata (`original_width/height` as img2dataset records it before resizing, else the LAION
`WIDTH/HEIGHT` columns or `source_width/height` as `meissonic download` names them), else from the
decoded image; the crop offsets are in the resized image;
the score is the metadata's `score_key` (default `aesthetic`), else `default_score`.

Under torchrun every rank (RANK / WORLD_SIZE) takes every WORLD_SIZE-th input shard; no process
group is needed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from meissonic_cli.config import MAX_BATCH, MAX_SCORE, Problems, field
from meissonic_cli.data.inputs import check_output_parent
from meissonic_cli.data.shards import (
    DATASET_INFO,
    DATASET_SCHEMA,
    FORMAT_NAME,
    FORMAT_VERSION,
    MICRO_FIELDS,
    TEXT_MODES,
    TokenSample,
    TokenShardWriter,
    is_complete,
    read_shard_stats,
    remove_stale_temp_files,
    shard_name,
    stats_path,
    verify_shard,
    write_dataset_info,
)
from meissonic_cli.data.sources import IMAGE_EXTS, RawSample, WorkUnit, discover_units  # noqa: F401 (re-exported)
from meissonic_cli.device import DTYPE_NAMES, resolve_device
from meissonic_cli.errors import ConfigError
from meissonic_cli.imaging import load_rgb8
from meissonic_cli.model.hub import ALLOW_DOWNLOAD_HELP, VARIANT_HELP, VARIANTS, model_variant, resolve_model_folder
from meissonic_cli.progress import key_value_table, make_progress
from meissonic_cli.safety import MAX_RESOLUTION, MAX_SEED

if TYPE_CHECKING:  # numpy is imported where used: `meissonic --help` imports this module
    import numpy as np

DTYPES = DTYPE_NAMES
# Settings that must match between runs writing into the same output directory.
_SETTINGS_THAT_MUST_MATCH = ("resolution", "grid", "text_features", "text_dim", "pooled_dim", "codebook_size", "crop")


@dataclass
class TokenizeConfig:
    input: str = field("", help="Image shards (a directory of img2dataset .tar files, one .tar, or a glob), a folder "
                                "of images with same-stem .txt captions (or .json with a caption key), or a table "
                                "(.parquet, .csv, .tsv, .jsonl) of image paths or http(s) URLs plus captions.")
    out: str = field("", help="Output directory for token shards (tokens-NNNNN.tar + .stats.json) and dataset.json.",
                     short="-o")
    model: str | None = field(None, help="Released-layout model folder providing vqvae/ and text_encoder/ (+ tokenizer/), "
                                         "or a Hugging Face repo id (owner/name) in the local Hugging Face cache.")
    allow_download: bool = field(False, help=ALLOW_DOWNLOAD_HELP)
    variant: str | None = field(None, help=VARIANT_HELP)
    vq: str | None = field(None, help="VQ folder (diffusers VQModel: config.json + diffusion_pytorch_model.safetensors); "
                                      "overrides the model folder's vqvae/.")
    text_encoder: str | None = field(None, help="Text encoder folder (CLIPTextModelWithProjection, or a full CLIPModel "
                                                "such as laion's CLIP-ViT-H-14); overrides the model folder's "
                                                "text_encoder/ (captions keep the model's tokenizer/).")
    resolution: int = field(256, help="Training resolution R: shorter side resized to R, then an R x R crop. Must be a "
                                      "multiple of the VQ's downsample factor (16 for the released VQ).")
    random_crop: bool = field(False, help="Random crop (seeded per sample key) instead of the centre crop; the offsets "
                                          "are stored as micro-conditions either way.",
                             flag="--random-crop/--center-crop")
    seed: int = field(0, help="Seed of --random-crop.")
    text_features: str = field("full", help="CLIP features to store: full (77xD sequence + pooled; ~154 KB/sample at "
                                            "D=1024), pooled (pooled only), none (train encodes captions online).")
    score_key: str = field("aesthetic", help="Metadata key (case-insensitive) of the aesthetic/preference score "
                                             "micro-condition.")
    score: float = field(6.0, bounds=(-MAX_SCORE, MAX_SCORE), help="Score micro-condition for samples whose metadata has none (the pipeline default).")
    batch_size: int = field(32, bounds=(1, MAX_BATCH), help="Images encoded per forward pass.")
    device: str = field("auto", help="Device: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda, cuda:N.")
    dtype: str = field("fp32", help="Text encoder precision: fp32, bf16 or fp16. The VQ stays in fp32 when its config "
                                    "sets force_upcast (the released one does).")
    shard_size: int = field(1000, help="Images per output shard when the input is an image folder or a table.")
    workers: int = field(2, help="Threads decoding and resizing images (and fetching a table's URLs) while the models "
                                 "run.")
    image_col: str | None = field(None, help="Table input: the column holding each image's path (relative to the "
                                             "table's folder), http(s) URL or bytes (default: detected: image, path, "
                                             "file_name, url, ...).")
    caption_col: str | None = field(None, help="Table input: the caption column; image folder: the caption key of the "
                                               ".json sidecars (default: detected: caption, text, ...).")
    url_timeout: float = field(10.0, help="Table input: seconds before fetching one image URL gives up (one try; "
                                          "for many URLs run `meissonic download` first).")

    def validate(self) -> "TokenizeConfig":
        p = Problems(self)
        p.check(bool(self.input), "--input is required (image shards or an image folder)")
        p.check(bool(self.out), "--out is required (the token shard directory)")
        p.check(0 < self.resolution <= MAX_RESOLUTION,
                f"--resolution must be between 1 and {MAX_RESOLUTION} pixels, got {self.resolution}")
        p.check(0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        p.check(self.text_features in TEXT_MODES,
                f"--text-features must be one of {', '.join(TEXT_MODES)}, got {self.text_features!r}")
        p.check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        p.check(self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}")
        p.check(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        p.check(self.url_timeout > 0, f"--url-timeout must be > 0 seconds, got {self.url_timeout}")
        p.check(self.dtype in DTYPES, f"--dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        p.check(bool(self.model or self.vq), "give --model (a released-layout folder) or --vq")
        p.check(self.variant in (None, *VARIANTS), f"unknown --variant {self.variant!r}; use {' or '.join(VARIANTS)}")
        if self.text_features != "none":
            p.check(bool(self.model or self.text_encoder),
                    f"--text-features {self.text_features} needs --model or --text-encoder (or use --text-features none)")
        if self.input and self.out:
            given, out = Path(self.input).resolve(), Path(self.out).resolve()
            p.check(given != out and out not in given.parents and not (Path(self.input).is_dir() and given in out.parents),
                    "--out must differ from --input, and neither may hold the other")
        p.raise_if_any()
        return self


@dataclass
class TokenizeResult:
    out_dir: Path
    rank: int
    world_size: int
    text_features: str
    resolution: int
    grid: tuple[int, int]
    device: str
    dtype: str
    shards_assigned: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    images: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = dc_field(default_factory=list)
    seconds: float = 0.0
    dataset_samples: int = 0
    dataset_bytes: int = 0
    feature_bytes: dict[str, int] = dc_field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_sample(self) -> float:
        return self.dataset_bytes / self.dataset_samples if self.dataset_samples else 0.0


# ---------------------------------------------------------------------------------------------
# Image preparation


@dataclass
class Prepared:
    key: str
    pixels: np.ndarray  # uint8 (R, R, 3)
    micro: np.ndarray  # float32 (5,)
    caption: str
    meta: dict[str, Any]
    score_defaulted: bool
    size_from_image: bool


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _lookup(meta: dict[str, Any], key: str) -> Any:
    if key in meta:
        return meta[key]
    lowered = key.lower()
    for k, v in meta.items():
        if isinstance(k, str) and k.lower() == lowered:
            return v
    return None


def original_size(meta: dict[str, Any], image_size: tuple[int, int]) -> tuple[int, int, bool]:
    """(width, height, taken_from_image): metadata's pre-resize size when present, else the image's."""
    # img2dataset's own "width"/"height" are the size after its resize, so they are not used here.
    # `source_width/height` is what `meissonic download` calls the LAION WIDTH/HEIGHT columns.
    for wk, hk in (("original_width", "original_height"), ("WIDTH", "HEIGHT"), ("source_width", "source_height")):
        w, h = _number(meta.get(wk)), _number(meta.get(hk))
        if w and h and w > 0 and h > 0:
            return int(round(w)), int(round(h)), False
    return image_size[0], image_size[1], True


def crop_offsets(size: tuple[int, int], resolution: int, random_crop: bool, rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of the R x R crop in an image of `size` = (width, height) already resized."""
    w, h = size
    if random_crop and rng is not None:
        return rng.randint(0, h - resolution), rng.randint(0, w - resolution)
    # torchvision's center_crop rounding
    return int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))


def prepare_image(raw: RawSample, cfg: TokenizeConfig) -> Prepared:
    """Decode, resize, crop and compute micro-conditions; raises on undecodable images."""
    import numpy as np
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if raw.error:
        raise ValueError(raw.error)
    data = raw.load() if raw.image is None and raw.load is not None else raw.image
    if not data:
        raise ValueError("empty image")
    image = load_rgb8(bytes(data), f"image of sample {raw.key}")
    orig_w, orig_h, from_image = original_size(raw.meta, image.size)
    r = cfg.resolution
    resized = TF.resize(image, r, interpolation=InterpolationMode.BILINEAR)
    rng = random.Random(f"{cfg.seed}/{raw.key}") if cfg.random_crop else None
    top, left = crop_offsets(resized.size, r, cfg.random_crop, rng)
    cropped = TF.crop(resized, top, left, r, r)
    score = _number(_lookup(raw.meta, cfg.score_key))
    pixels = np.asarray(cropped, dtype=np.uint8)
    if pixels.shape != (r, r, 3):
        raise ValueError(f"prepared image has shape {pixels.shape}, expected {(r, r, 3)}")
    micro = np.array([orig_w, orig_h, top, left, cfg.score if score is None else score], dtype=np.float32)
    return Prepared(raw.key, pixels, micro, raw.caption, raw.meta, score is None, from_image)


def _prepare_or_error(raw: RawSample, cfg: TokenizeConfig) -> Prepared | tuple[str, str]:
    try:
        return prepare_image(raw, cfg)
    except Exception as err:  # PIL raises many types for corrupt files; each only skips this sample
        # PIL names the BytesIO object in its message; that address means nothing to the reader.
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
        return raw.key, f"{type(err).__name__}: {message}"


# ---------------------------------------------------------------------------------------------
# Models


def load_models(cfg: TokenizeConfig, device: Any) -> tuple[Any, Any | None]:
    """(VQ tokenizer, TextEncoder or None) on `device`; the VQ is a diffusers VQModel or a PatchVQ."""
    import torch

    from meissonic_cli.model.text_encoder import TextEncoder
    from meissonic_cli.model.vq import load_vq

    dtype = getattr(torch, DTYPES[cfg.dtype])
    variant = model_variant(cfg.model, cfg.variant) if cfg.model else cfg.variant
    vq = load_vq(cfg.vq or cfg.model, dtype=dtype, variant=variant).to(device).eval()
    text = None
    if cfg.text_features != "none":
        text = TextEncoder.for_model(cfg.model, cfg.text_encoder, dtype=dtype, variant=variant).to(device).eval()
    return vq, text


def feature_bytes(grid: tuple[int, int], text_dim: int | None, pooled_dim: int | None, context_length: int = 77) -> dict[str, int]:
    """Payload bytes of each stored array (tar headers and captions come on top)."""
    out = {"codes": grid[0] * grid[1] * 2, "micro": 5 * 4}
    if text_dim:
        out["text"] = context_length * text_dim * 2
    if pooled_dim:
        out["pooled"] = pooled_dim * 2
    return out


def _dataset_info(cfg: TokenizeConfig, vq: Any, text: Any | None) -> dict[str, Any]:
    f = vq.downsample_factor
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "resolution": cfg.resolution,
        "grid": [cfg.resolution // f, cfg.resolution // f],
        "downsample_factor": f,
        "codebook_size": vq.codebook_size,
        "text_features": cfg.text_features,
        "text_dim": text.width if text is not None and cfg.text_features == "full" else None,
        "pooled_dim": text.pooled_dim if text is not None else None,
        "context_length": text.config.context_length if text is not None else 77,
        "crop": "random" if cfg.random_crop else "center",
        "micro_conditions": list(MICRO_FIELDS),
        "models": {
            "vq": str(Path(cfg.vq or cfg.model).resolve()),
            "text_encoder": str(Path(cfg.text_encoder or cfg.model).resolve()) if text is not None else None,
        },
    }


def _check_output_dir(out: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """The `dataset.json` already in `out` (None when there is none), refusing one made with other
    settings and a folder that is not a token dataset. Reads only."""
    from meissonic_cli.readers import read_json_object

    existing = out / DATASET_INFO
    if existing.is_file():
        try:
            old = read_json_object(existing, "token dataset settings", DATASET_SCHEMA, error=ConfigError)
        except ConfigError as err:
            raise ConfigError(f"{err}; choose a new --out") from None
        diffs = [f"{k} {old.get(k)!r} -> {info[k]!r}" for k in _SETTINGS_THAT_MUST_MATCH if old.get(k) != info[k]]
        if diffs:
            raise ConfigError(
                f"--out {out} holds a token dataset made with other settings ({'; '.join(diffs)}); "
                "rerun with the same settings to resume, or choose a new --out"
            )
        return old
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise ConfigError(f"--out {out} exists and is not a token dataset (no {DATASET_INFO}); choose an empty or new directory")
    return None


def _plan_units(out: Path, units: list[WorkUnit]) -> tuple[list[WorkUnit], int, list[tuple[Path, str]]]:
    """(units to run, complete shards skipped, damaged shards to redo with why). A complete shard made
    from another input stops the run; one that does not hold what its stats file claims is redone.
    Reads only: the run writes nothing before every shard has been checked."""
    todo, skipped, damaged = [], 0, []
    for unit in units:
        path = out / shard_name(unit.index)
        if not is_complete(path):
            todo.append(unit)
            continue
        done = read_shard_stats(path)
        done_source = done.get("source")
        if done_source not in (None, "", unit.source) and not _same_source(done_source, unit.source):
            raise ConfigError(
                f"{path.name} was made from {done_source}, but this input maps {unit.source} to it; "
                "the input changed since the last run: use a new --out"
            )
        if unit.fingerprint and done.get("input_fingerprint") not in (None, unit.fingerprint):
            raise ConfigError(f"{path.name} was made from other files or rows than {unit.source} holds now; the "
                              "input changed since the last run: use a new --out")
        why = verify_shard(path)
        if why:
            damaged.append((path, why))
            todo.append(unit)
        else:
            skipped += 1
    return todo, skipped, damaged


def _same_source(recorded: str, now: str) -> bool:
    """Whether two recorded sources ('PATH' or 'PATH [a:b]') name the same input once resolved (an
    older run may have recorded a path relative to its working directory)."""
    def split(text: str) -> tuple[str, str]:
        m = re.fullmatch(r"(.*?)( \[\d+:\d+\])?", text)
        return (m.group(1), m.group(2) or "") if m else (text, "")

    (a, ra), (b, rb) = split(str(recorded)), split(str(now))
    return ra == rb and Path(a).resolve() == Path(b).resolve()


# ---------------------------------------------------------------------------------------------
# The run


def _batches(items: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    batch: list[RawSample] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(prepared: list[Prepared], vq: Any, text: Any | None, mode: str) -> list[TokenSample]:
    import numpy as np
    import torch

    with torch.inference_mode():
        pixels = torch.from_numpy(np.stack([p.pixels for p in prepared])).permute(0, 3, 1, 2)
        images = pixels.to(vq.device, non_blocking=True).float().div_(255.0)
        codes = vq.encode(images).to(torch.int32).cpu().numpy().astype(np.uint16)
        seq = pooled = None
        if text is not None and mode != "none":
            s, p = text.encode([x.caption for x in prepared])
            pooled = p.to(torch.float16).cpu().numpy()
            seq = s.to(torch.float16).cpu().numpy() if mode == "full" else None
    return [
        TokenSample(key=p.key, codes=codes[i], micro=p.micro, caption=p.caption,
                    text=None if seq is None else seq[i], pooled=None if pooled is None else pooled[i], meta=p.meta)
        for i, p in enumerate(prepared)
    ]


def _run_unit(unit: WorkUnit, cfg: TokenizeConfig, out: Path, vq: Any, text: Any | None,
              pool: ThreadPoolExecutor | None, on_images: Callable[[int], None]) -> dict[str, Any]:
    import numpy as np

    remove_stale_temp_files(out, unit.index)
    counters = {"score_defaulted": 0, "size_from_image": 0, "no_caption": 0}

    def submit(batch: list[RawSample]) -> list[Future | Any]:
        if pool is None:
            return [_prepare_or_error(r, cfg) for r in batch]
        return [pool.submit(_prepare_or_error, r, cfg) for r in batch]

    with TokenShardWriter(out, unit.index, source=unit.source) as writer:
        batches = _batches(unit.samples(), cfg.batch_size)
        pending = next(batches, None)
        queued = submit(pending) if pending is not None else None
        while queued is not None:
            current = queued
            nxt = next(batches, None)
            # Queue the next batch's decoding before running the models on this one.
            queued = submit(nxt) if nxt is not None else None
            results = [r.result() if isinstance(r, Future) else r for r in current]
            good: list[Prepared] = []
            for r in results:
                if isinstance(r, Prepared):
                    good.append(r)
                else:
                    writer.add_failure(*r)
            if good:
                for sample in _encode_batch(good, vq, text, cfg.text_features):
                    bad = [name for name, value in (("text", sample.text), ("pooled", sample.pooled))
                           if value is not None and not np.isfinite(value).all()]
                    if bad:  # e.g. float16 overflow of the text encoder's states: never written, listed as failed
                        writer.add_failure(sample.key, f"the text encoder gave non-finite {' and '.join(bad)} features "
                                                       "(beyond float16's range)")
                        continue
                    writer.write(sample)
                for p in good:
                    counters["score_defaulted"] += p.score_defaulted
                    counters["size_from_image"] += p.size_from_image
                    counters["no_caption"] += bool(p.meta.get("no_caption"))
            on_images(len(results))
        extra = {**counters, "resolution": cfg.resolution, "text_features": cfg.text_features}
        if unit.fingerprint:
            extra["input_fingerprint"] = unit.fingerprint
        return writer.close(extra_stats=extra)


def tokenize(cfg: TokenizeConfig, rank: int | None = None, world_size: int | None = None,
             show_progress: bool = True) -> TokenizeResult:
    """Tokenize `cfg.input` into token shards under `cfg.out`; returns this rank's result."""
    cfg.validate()
    if cfg.model:  # a hub id becomes its cached snapshot folder (dataset.json then records that folder)
        cfg = dataclasses.replace(cfg, model=str(resolve_model_folder(cfg.model, cfg.allow_download)))
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, WORLD_SIZE={world_size})")
    out = Path(cfg.out)
    check_output_parent(out, "--out")
    kind, units = discover_units(cfg.input, cfg.shard_size, image_col=cfg.image_col, caption_col=cfg.caption_col,
                                 url_timeout=cfg.url_timeout)
    device = resolve_device(cfg.device, per_rank=True)
    vq, text = load_models(cfg, device)
    f = vq.downsample_factor
    if cfg.resolution % f:
        raise ConfigError(
            f"--resolution {cfg.resolution} is not a multiple of the VQ's downsample factor {f} "
            f"(try {max(f, cfg.resolution // f * f)})"
        )
    if vq.codebook_size > 65536:
        raise ConfigError(f"the VQ has {vq.codebook_size} codes; token shards store uint16 codes (at most 65536)")
    info = _dataset_info(cfg, vq, text)
    existing = _check_output_dir(out, info)
    mine = units[rank::world_size]
    grid = (cfg.resolution // f, cfg.resolution // f)
    result = TokenizeResult(out, rank, world_size, cfg.text_features, cfg.resolution, grid, str(device), cfg.dtype,
                            shards_assigned=len(mine))
    todo, result.shards_skipped, damaged = _plan_units(out, mine)

    # Everything is checked: only now is anything written (a finished dataset reruns with no write).
    if existing is None:
        out.mkdir(parents=True, exist_ok=True)
        write_dataset_info(out, {**info, "input": os.path.abspath(cfg.input), "input_kind": kind})
    for path, why in damaged:
        print(f"Warning: {why}; redoing it", file=sys.stderr)
        stats_path(path).unlink(missing_ok=True)  # the shard is incomplete until it is rewritten

    progress = make_progress(show_progress and rank == 0, unit="images")
    total_images = sum(u.expected or 0 for u in todo) if all(u.expected is not None for u in todo) else None
    started = time.perf_counter()
    with progress:
        task = progress.add_task("tokenize", total=total_images)
        pool = ThreadPoolExecutor(max_workers=cfg.workers) if cfg.workers > 0 else None
        try:
            for unit in todo:
                stats = _run_unit(unit, cfg, out, vq, text, pool,
                                  lambda n: progress.advance(task, n))
                result.shards_written += 1
                result.images += stats["count"]
                result.failed += stats["failed"]
                result.failures.extend({"shard": stats["shard"], **f} for f in stats["failures"])
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    result.seconds = time.perf_counter() - started

    for path in sorted(out.glob("tokens-*.tar")):
        if stats_path(path).is_file():
            stats = read_shard_stats(path)
            result.dataset_samples += int(stats.get("count", 0))
            result.dataset_bytes += int(stats.get("bytes", 0))
    result.feature_bytes = feature_bytes(grid, info["text_dim"], info["pooled_dim"], info["context_length"])
    return result


def summary_table(result: TokenizeResult) -> Any:
    """A rich table summarising a tokenize run."""
    title = "tokenize" + (f" (rank {result.rank} of {result.world_size})" if result.world_size > 1 else "")
    return key_value_table(title, [
        ("output", str(result.out_dir)),
        ("resolution / code grid", f"{result.resolution} px / {result.grid[0]}x{result.grid[1]}"),
        ("shards written / skipped (complete)", f"{result.shards_written} / {result.shards_skipped}"),
        ("images tokenized", f"{result.images:,}"),
        ("images skipped (undecodable)", f"{result.failed:,}"),
        ("throughput", f"{result.images_per_second:,.1f} images/s on {result.device} ({result.dtype})"),
        (f"bytes per sample (--text-features {result.text_features})", f"{result.bytes_per_sample:,.0f}"),
        ("  payload: " + ", ".join(result.feature_bytes), " + ".join(f"{v:,}" for v in result.feature_bytes.values())),
        ("dataset total", f"{result.dataset_samples:,} samples, {result.dataset_bytes / 1e6:,.1f} MB"),
    ])

