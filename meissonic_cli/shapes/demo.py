"""`meissonic demo`: the whole chain on synthetic data, on a CPU, in about ten minutes.

A new user has no LAION copy, no GPU and no weights. The demo makes all three up and runs the real
chain end to end, through the same library functions (and config objects) the subcommands call:

    model     a tiny released-layout model folder (`scaffold.build_model_folder`): a small transformer
              and a small open_clip text tower, both with fixed random weights, and in `vqvae/` a
              patch VQ fitted on rendered shapes scenes in seconds (`shapes.tokenizer.fit_demo_vq`)
    synth     a LAION-style source of shapes scenes with dirty parquet metadata (`synthetic`),
              served over HTTP on 127.0.0.1 at an ephemeral port
    curate    DuckDB filtering of that metadata (watermark, NSFW, size, aspect ratio, dedup)
    download  img2dataset over the loopback server into webdataset shards
    tokenize  VQ code grids + text features + micro-conditions
    train     masked image modeling; the text encoder stays frozen and random, so everything the
              model learns about captions it learns from the data
    sample    a few prompts into a grid with their captions
    eval      the weight-free shapes benchmark (`shapes_bench`): per-attribute accuracies

It writes `OUT/report.json` (accuracies, chance levels, VQ PSNR, per-stage wall time) and ends with
a one-screen summary. `pipelines/demo.sh` runs the same chain with the individual subcommands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from meissonic_cli.atomic import atomic_write, write_text
from meissonic_cli.config import Problems, field
from meissonic_cli.device import DEVICE_CHOICES, resolve_device, valid_device_name
from meissonic_cli.errors import MeissonicError, OutputExistsError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from meissonic_cli.model.text_encoder import TextEncoderConfig
    from meissonic_cli.model.transformer import TransformerConfig
    from meissonic_cli.train.config import TrainConfig

REPORT_NAME = "report.json"
GRID_NAME = "samples.png"
# Everything the demo writes under OUT; --overwrite removes exactly these and nothing else.
OUTPUTS = ("model", "source", "curated", "images", "tokens", "run", "samples", "eval", GRID_NAME, REPORT_NAME)
IMAGE_SIZE = 64
PATCH_SIZE = 8  # the demo VQ's patch: 64 px images become 8 x 8 token grids
VQ_CODEBOOK = 1024
# Sides of the served images: the training size, so downloaded images keep the renderer's crisp
# edges. Shrunk images (any larger side) get antialiased edges, each a VQ code of its own next to
# the crisp ones: twice the edge codes to learn, and samples that mix both edge kinds in one object.
SOURCE_SIDES = (64,)
# Share of the VQ's fitting scenes that are drawn large and shrunk: none, as no served image is.
VQ_SOFT_FRACTION = 0.0
# Shown in the sample grid: one or two prompts of every benchmark category.
SHOWCASE_PROMPTS = (
    "a red circle",
    "a blue square",
    "a yellow triangle on the left",
    "a green circle at the top",
    "a purple square on the right",
    "an orange triangle at the bottom",
    "two blue circles",
    "three red squares",
    "a red circle on the left and a blue square on the right",
    "a yellow square at the top and a green triangle at the bottom",
    "a purple circle in the center",
    "two orange triangles",
)


@dataclass(frozen=True)
class DemoBudget:
    """How big each stage of the demo is. `full` is the README's ten minutes on two CPU cores."""

    rows: int  # synthetic metadata rows; about half survive curate and download
    width: int  # transformer hidden width (= pooled text size)
    heads: int
    layers: int  # multi-modal blocks
    single_layers: int  # single-modal blocks
    text_width: int
    text_layers: int
    context_length: int  # caption tokens; every shapes caption fits in 24
    train_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    sample_steps: int
    cfg: float
    temperature: str
    token_temperature: float  # below 1: sharper token draws, fewer ragged edges from a briefly trained model
    eval_images_per_prompt: int
    vq_images: int
    vq_seconds: float


BUDGETS: dict[str, DemoBudget] = {
    # Measured choices (64 px, 8x8 tokens): one multi-modal and two single-modal blocks at width 128
    # learn faster per CPU second than 2+4 blocks, and far faster than a 16x16 grid with 2x2
    # compression; batch 32 beats batch 16 at equal samples; lr 4e-3 diverges where 2e-3 does not; width 160 and a
    # 16-token context lost at equal steps. 18000 rows (~8,400 images) beat 6000 at equal steps (fewer repeats).
    # Token temperature 0.25 (checked on captions apart from the benchmark's): +0.18 shape on the same checkpoint.
    "full": DemoBudget(rows=18000, width=128, heads=4, layers=1, single_layers=2, text_width=64, text_layers=2,
                       context_length=24, train_steps=1800, batch_size=32, lr=2e-3, warmup_steps=50,
                       sample_steps=16, cfg=1.5, temperature="1,0", token_temperature=0.25, eval_images_per_prompt=2,
                       vq_images=3000, vq_seconds=30.0),
    # small (the CI test): the loss plateaus near 2.0 until the model starts using the captions at
    # step ~350-450, and the data order varies run to run (img2dataset writes in download order), so
    # 600 steps sometimes ended at chance; 900 clears it.
    "small": DemoBudget(rows=3000, width=128, heads=4, layers=1, single_layers=2, text_width=64, text_layers=2,
                        context_length=24, train_steps=900, batch_size=32, lr=2e-3, warmup_steps=30,
                        sample_steps=16, cfg=1.5, temperature="1,0", token_temperature=0.25, eval_images_per_prompt=1,
                        vq_images=1500, vq_seconds=15.0),
}


@dataclass
class DemoConfig:
    """Everything `meissonic demo` does; field help is the CLI help."""

    out: str = field("demo-out", help="Folder for everything the demo writes (model, data, run, samples, report.json).", flag="--out",
                     short="-o")
    budget: str = field("full", help="full: about 10 minutes on 2 CPU cores (colour, position and shape learned, count "
                                     "in part); small: about 5 minutes (colour and position well above chance).")
    overwrite: bool = field(False, help="Replace the outputs of an earlier demo in --out (other files there are left alone).")
    seed: int = field(0, help="Seed of the synthetic data, the model's initial weights and the sampler.")
    device: str = field("cpu", help="Device for tokenize, train, sample and eval: cpu (the demo's target; its budgets are tuned for 2 CPU cores), auto, cuda, cuda:N or mps.")
    model_only: bool = field(False, help="Only build the demo's model folder (OUT/model: random transformer and text "
                                         "encoder, fitted patch VQ) and stop; pipelines/demo.sh starts with this.")

    def validate(self) -> "DemoConfig":
        p = Problems(self)
        p.check(bool(self.out), "--out is required (the demo's output folder)")
        p.check(self.budget in BUDGETS, f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        p.check(valid_device_name(self.device), f"--device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        p.raise_if_any()
        return self


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str


@dataclass
class DemoResult:
    """What a demo run wrote: `report` is report.json's content."""

    out: Path
    report: dict[str, Any]
    stages: list[StageResult]
    grid: Path | None
    checkpoint: Path | None


# ----------------------------------------------------------------------------------------------
# The pieces, as the subcommands' config objects


def demo_model_configs(budget: DemoBudget) -> tuple["TransformerConfig", "TextEncoderConfig"]:
    """The tiny transformer (no feature compression: an 8 x 8 grid is small already) and text tower."""
    from meissonic_cli.model.text_encoder import TextEncoderConfig
    from meissonic_cli.model.transformer import TransformerConfig

    head_dim = budget.width // budget.heads
    # Rotary channels over (0, row, col): the constant axis needs few, rows and columns share the rest.
    side = (head_dim * 3 // 8) // 2 * 2
    transformer = TransformerConfig(
        patch_size=1, in_channels=budget.width, num_layers=budget.layers, num_single_layers=budget.single_layers,
        attention_head_dim=head_dim, num_attention_heads=budget.heads, joint_attention_dim=budget.text_width,
        pooled_projection_dim=budget.width, guidance_embeds=False, axes_dims_rope=(head_dim - 2 * side, side, side),
        vocab_size=VQ_CODEBOOK + 1, codebook_size=VQ_CODEBOOK, downsample=False, upsample=False,
    ).validate()
    text = TextEncoderConfig(width=budget.text_width, layers=budget.text_layers, heads=max(1, budget.text_width // 32),
                             intermediate_size=4 * budget.text_width, context_length=budget.context_length,
                             embed_dim=budget.width)
    text.validate()
    return transformer, text


def demo_curate_config(source_metadata: str | Path, output: str | Path, seed: int = 0) -> Any:
    """The demo's curation: the paper's watermark filter plus NSFW, size and aspect-ratio filters and dedup.

    No aesthetic threshold: the synthetic scores are noise, and keeping more rows keeps the demo short.
    """
    from meissonic_cli.data.curate import CurateConfig

    return CurateConfig(inputs=[str(source_metadata)], output=str(output), max_watermark=0.5, max_unsafe=0.5,
                        min_side=IMAGE_SIZE, max_aspect_ratio=2.0, min_caption_words=2, seed=seed)


def demo_download_config(curated: str | Path, output: str | Path) -> Any:
    from meissonic_cli.data.download import DownloadConfig

    # PNG (compression level 1) keeps the flat colours exact; JPEG would smear every edge.
    return DownloadConfig(inputs=[str(curated)], output=str(output), image_size=IMAGE_SIZE, resize_mode="keep_ratio",
                          encode_format="png", encode_quality=1, processes=1, threads=8, shard_size=2000, timeout=10)


def demo_tokenize_config(images: str | Path, output: str | Path, model: str | Path, device: str = "cpu") -> Any:
    from meissonic_cli.data.tokenize import TokenizeConfig

    return TokenizeConfig(input=str(images), out=str(output), model=str(model), resolution=IMAGE_SIZE,
                          text_features="full", batch_size=64, device=device, workers=1)


def demo_train_config(budget: DemoBudget, data: str | Path, output: str | Path, model: str | Path,
                      seed: int = 0, device: str = "cpu") -> "TrainConfig":
    """The demo's training run; `pipelines/demo_train.yaml` holds the same settings for the full budget."""
    from meissonic_cli.train.config import TrainConfig

    return TrainConfig(
        data=str(data), output=str(output), resolution=IMAGE_SIZE, vq_factor=PATCH_SIZE, model=str(model),
        base_model=str(model), device=device, batch_size=budget.batch_size, max_steps=budget.train_steps,
        lr=budget.lr, lr_schedule="cosine", warmup_steps=budget.warmup_steps, weight_decay=0.01,
        cond_dropout=0.1, checkpoint_every=budget.train_steps, keep_last=1, log_every=25, seed=seed,
    ).validate()


def demo_sample_config(budget: DemoBudget, model: str | Path, out: str | Path, seed: int = 0,
                       device: str = "cpu") -> Any:
    from meissonic_cli.sample.sample import SampleConfig

    return SampleConfig(model=str(model), prompt=list(SHOWCASE_PROMPTS), out=str(out), steps=budget.sample_steps,
                        cfg=budget.cfg, resolution=str(IMAGE_SIZE), seed=seed, batch_size=len(SHOWCASE_PROMPTS),
                        device=device, temperature=budget.temperature, token_temperature=budget.token_temperature,
                        grid=True)


def demo_eval_config(budget: DemoBudget, model: str | Path, out: str | Path, seed: int = 0, device: str = "cpu") -> Any:
    from meissonic_cli.metrics.evaluate import EvalConfig
    from meissonic_cli.sample.sample import SampleConfig

    sampler = SampleConfig(steps=budget.sample_steps, cfg=budget.cfg, resolution=str(IMAGE_SIZE), seed=seed,
                           batch_size=64, device=device, temperature=budget.temperature,
                           token_temperature=budget.token_temperature)
    return EvalConfig(suites=["shapes"], prompts="shapes", model=str(model), out=str(out), device=device,
                      images_per_prompt=budget.eval_images_per_prompt, grid=24, sample=sampler)


# ----------------------------------------------------------------------------------------------
# Running it


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier demo (or anything else) unless --overwrite; then clear the demo's outputs."""
    from meissonic_cli.data.inputs import check_output_parent

    check_output_parent(out, "--out")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder")
    present = [name for name in OUTPUTS if (out / name).exists()]
    others = [p.name for p in out.iterdir() if p.name not in OUTPUTS] if out.is_dir() else []
    if present and not overwrite:
        raise OutputExistsError(f"{out} already holds a demo ({', '.join(present)}); pass --overwrite to replace it "
                                "or choose another --out")
    if others and not present:
        raise OutputExistsError(f"{out} is not empty and holds no demo ({', '.join(sorted(others)[:5])}); "
                                "choose an empty or new --out")
    for name in present:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


class _Stages:
    """Times each stage, prints its header, and keeps one summary line per stage."""

    def __init__(self, console: "Console") -> None:
        self.console = console
        self.done: list[StageResult] = []

    def run(self, name: str, what: str, work: Callable[[], tuple[Any, str]]) -> Any:
        self.console.rule(f"[bold]{name}[/bold]: {what}")
        start = time.perf_counter()
        value, summary = work()
        seconds = time.perf_counter() - start
        self.done.append(StageResult(name, seconds, summary))
        self.console.print(f"[green]{name}[/green] done in {seconds:.1f} s: {summary}", highlight=False)
        return value

    @property
    def seconds(self) -> dict[str, float]:
        return {s.name: round(s.seconds, 2) for s in self.done}


def build_demo_model(out: str | Path, budget: DemoBudget, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write the demo's model folder at `out`: random transformer and text tower, and the fitted patch VQ in vqvae/.

    Returns the VQ fit report of `shapes.tokenizer.fit_demo_vq` (held-out PSNR, codebook size, seconds).
    """
    from meissonic_cli.model.scaffold import build_model_folder
    from meissonic_cli.model.vq.vqgan import tiny_vq_config
    from meissonic_cli.shapes.tokenizer import fit_demo_vq

    transformer, text = demo_model_configs(budget)
    # The scaffold writes a stand-in VQModel of the right codebook size; the fitted patch VQ replaces it.
    build_model_folder(out, transformer, text, tiny_vq_config(codebook_size=VQ_CODEBOOK, levels=4, channels=8),
                       seed=seed, overwrite=overwrite)
    return fit_demo_vq(Path(out) / "vqvae", image_size=IMAGE_SIZE, seed=seed, num_images=budget.vq_images,
                       time_budget_s=budget.vq_seconds, patch_size=PATCH_SIZE, codebook_size=VQ_CODEBOOK,
                       soft_fraction=VQ_SOFT_FRACTION, overwrite=True)


def run_demo(cfg: DemoConfig, console: "Console | None" = None) -> DemoResult:
    """Run the whole chain into `cfg.out` and return the report (also written to OUT/report.json)."""
    from rich.console import Console

    cfg.validate()
    resolve_device(cfg.device, per_rank=True)  # tokenize/train/sample's check, before synth writes anything
    console = console or Console()
    budget = BUDGETS[cfg.budget]
    out = Path(cfg.out)
    _prepare_out(out, cfg.overwrite)
    paths = {name: out / name for name in OUTPUTS}
    stages = _Stages(console)
    started = time.perf_counter()

    def model_stage() -> tuple[dict[str, Any], str]:
        info = build_demo_model(paths["model"], budget, seed=cfg.seed)
        transformer, text = demo_model_configs(budget)
        return info, (f"transformer width {transformer.inner_dim}, {transformer.num_layers}+"
                      f"{transformer.num_single_layers} blocks; text encoder width {text.width} (random, frozen); "
                      f"patch VQ {info['codebook_size']} codes, {info['grid'][0]}x{info['grid'][1]} grid, "
                      f"held-out PSNR {info['psnr']:.1f} dB")

    vq_info = stages.run("model", "tiny model folder and a patch VQ fitted on shapes scenes", model_stage)
    if cfg.model_only:
        report = {"budget": cfg.budget, "vq_psnr": vq_info["psnr"], "vq_psnr_resized": vq_info["psnr_resized"],
                  "stages": stages.seconds, "model": str(paths["model"])}
        return DemoResult(out, report, stages.done, None, None)

    from meissonic_cli.shapes.source import ImageServer

    with ImageServer(paths["source"]) as server:
        source = stages.run("synth", f"LAION-style source served at {server.url}",
                            lambda: _synth(paths["source"], budget, cfg.seed, server.url))
        curated = stages.run("curate", "filter the metadata with DuckDB",
                             lambda: _curate(paths["source"] / "metadata", paths["curated"], cfg.seed))
        downloaded = stages.run("download", "img2dataset over the loopback server",
                                lambda: _download(paths["curated"], paths["images"]))
    tokenized = stages.run("tokenize", "VQ codes + text features + micro-conditions",
                           lambda: _tokenize(paths["images"], paths["tokens"], paths["model"], cfg.device))
    trained = stages.run("train", f"{budget.train_steps} steps of masked image modeling",
                         lambda: _train(budget, paths["tokens"], paths["run"], paths["model"], cfg.seed, cfg.device))
    checkpoint = trained.last_checkpoint
    sampled = stages.run("sample", f"{len(SHOWCASE_PROMPTS)} showcase prompts",
                         lambda: _sample(budget, checkpoint, paths["samples"], out / GRID_NAME, cfg.seed, cfg.device))
    shapes_summary = stages.run("eval", "the shapes benchmark (pixel scorer, no weights)",
                                lambda: _eval(budget, checkpoint, paths["eval"], cfg.seed, cfg.device))

    total = time.perf_counter() - started
    report: dict[str, Any] = {
        **{k: shapes_summary[k] for k in ("color", "shape", "position", "count", "overall")},
        "chance": shapes_summary["chance"],
        "by_category": shapes_summary["by_category"],
        "images_scored": shapes_summary["images"],
        "vq_psnr": vq_info["psnr"],
        "vq_psnr_resized": vq_info["psnr_resized"],
        "stages": stages.seconds,
        "total_seconds": round(total, 2),
        "budget": cfg.budget,
        "settings": dataclasses.asdict(budget),
        "data": {"source_rows": source.rows, "curated_rows": curated.stats["rows_out"],
                 "downloaded": downloaded.summary["successes"], "tokenized": tokenized.images},
        "train": {"steps": trained.steps, "final_loss": _final_loss(trained.losses),
                  "seconds": round(trained.seconds, 2)},
        "checkpoint": str(checkpoint),
        "grid": str(sampled),
        "eval_report": str(paths["eval"] / "report.json"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    _write_json(out / REPORT_NAME, report)
    return DemoResult(out, report, stages.done, sampled, checkpoint)


def _synth(root: Path, budget: DemoBudget, seed: int, url: str) -> tuple[Any, str]:
    from meissonic_cli.shapes.source import generate_source

    source = generate_source(root, rows=budget.rows, seed=seed, base_url=url, sides=SOURCE_SIDES)
    return source, f"{source.rows:,} metadata rows, {source.images:,} images (with duplicates, 404s, NULLs)"


def _curate(metadata: Path, output: Path, seed: int) -> tuple[Any, str]:
    from meissonic_cli.data.curate import curate

    result = curate(demo_curate_config(metadata, output, seed))
    return result, f"{result.stats['rows_in']:,} -> {result.stats['rows_out']:,} rows"


def _download(curated: Path, output: Path) -> tuple[Any, str]:
    from meissonic_cli.data.download import download

    result = download(demo_download_config(curated, output))
    s = result.summary
    if not s["complete"] or not s["successes"]:
        raise MeissonicError(f"download finished {s['shards']} of {s['expected_shards']} shards with "
                             f"{s['successes']} images in {output}; see its _meissonic/download_summary.json")
    failures = ", ".join(f"{n} {reason}" for reason, n in s["failures_by_reason"].items()) or "none"
    return result, f"{s['successes']:,} of {s['count']:,} images (failures: {failures})"


def _tokenize(images: Path, output: Path, model: Path, device: str) -> tuple[Any, str]:
    from meissonic_cli.data.tokenize import tokenize

    result = tokenize(demo_tokenize_config(images, output, model, device))
    return result, (f"{result.images:,} images -> {result.grid[0]}x{result.grid[1]} code grids "
                    f"({result.failed} failed), {result.images_per_second:.0f} images/s")


def _train(budget: DemoBudget, data: Path, output: Path, model: Path, seed: int, device: str) -> tuple[Any, str]:
    from meissonic_cli.train.trainer import train

    result = train(demo_train_config(budget, data, output, model, seed, device))
    return result, (f"{result.steps} steps x {budget.batch_size}, loss {_first_loss(result.losses):.2f} -> "
                    f"{_final_loss(result.losses):.2f}, {result.tokens_per_second:,.0f} tokens/s")


def _sample(budget: DemoBudget, checkpoint: Path, out: Path, grid_path: Path, seed: int,
            device: str) -> tuple[Path, str]:
    from meissonic_cli.sample.sample import run_sample

    result = run_sample(demo_sample_config(budget, checkpoint, out, seed, device))
    if result.grid is None:
        raise MeissonicError(f"sample wrote no grid.png in {out}")
    # The sampler's grid (64 px tiles enlarged pixel for pixel, prompts beneath), also at OUT/samples.png.
    atomic_write(grid_path, lambda tmp: shutil.copyfile(result.grid, tmp))
    return grid_path, f"{len(result.written)} images in {result.seconds:.1f} s -> {grid_path}"


def _eval(budget: DemoBudget, checkpoint: Path, out: Path, seed: int, device: str) -> tuple[dict[str, Any], str]:
    import meissonic_cli.shapes.bench  # noqa: F401  (registers the shapes suite)
    from meissonic_cli.metrics.evaluate import run_eval

    report = run_eval(demo_eval_config(budget, checkpoint, out, seed, device))
    s = report["shapes"]
    return s, " ".join(f"{k} {s[k]:.2f}" for k in ("color", "shape", "position", "count", "overall")) + \
        f" over {s['images']} images"


def _first_loss(losses: dict[int, float], n: int = 10) -> float:
    values = [v for _, v in sorted(losses.items())][:n]
    return sum(values) / len(values) if values else float("nan")


def _final_loss(losses: dict[int, float], n: int = 20) -> float:
    values = [v for _, v in sorted(losses.items())][-n:]
    return round(sum(values) / len(values), 4) if values else float("nan")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def summary_table(result: DemoResult) -> "Table":
    """Stage, wall time and key numbers; then the benchmark against chance."""
    from rich.table import Table

    table = Table(title=f"meissonic demo ({result.report.get('budget')} budget): {result.out}")
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("result")
    for stage in result.stages:
        table.add_row(stage.name, f"{stage.seconds:.1f} s", stage.summary)
    report = result.report
    table.add_section()
    table.add_row("total", f"{sum(s.seconds for s in result.stages):.1f} s", "", style="bold")
    if "color" in report:
        chance = report["chance"]
        table.add_section()
        for key in ("color", "shape", "position", "count", "overall"):
            value, base = report.get(key), chance.get(key)
            table.add_row(f"accuracy: {key}", "", f"{value:.3f}  (chance {base:.3f})" if value is not None else "-",
                          style="bold" if key == "overall" else None)
    return table


__all__ = [
    "BUDGETS",
    "SHOWCASE_PROMPTS",
    "DemoBudget",
    "DemoConfig",
    "DemoResult",
    "build_demo_model",
    "demo_curate_config",
    "demo_download_config",
    "demo_eval_config",
    "demo_model_configs",
    "demo_sample_config",
    "demo_tokenize_config",
    "demo_train_config",
    "run_demo",
    "summary_table",
]
