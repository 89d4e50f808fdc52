"""`meissonic eval`: CLIP-T/CLIP-I, HPS v2, DINO, FID and the shapes benchmark (see `meissonic_cli.metrics.evaluate`)."""

from __future__ import annotations

from typing import Optional

import typer

from meissonic_cli.config import help_of
from meissonic_cli.metrics.evaluate import EvalConfig
from meissonic_cli.sample.sample import SampleConfig
from ._common import handle_errors


def _h(name: str) -> str:
    return help_of(EvalConfig, name)


def _s(name: str) -> str:
    return help_of(SampleConfig, name) + " (with --prompts)"


def register(app: typer.Typer) -> None:
    @app.command("eval", no_args_is_help=True)
    @handle_errors
    def eval_command(
        suite: str = typer.Option("clip", "--suite", "-s", help=_h("suites")),
        images: Optional[str] = typer.Option(None, "--images", "-i", help=_h("images"), show_default=False),
        prompts: Optional[str] = typer.Option(None, "--prompts", help=_h("prompts"), show_default=False),
        model: Optional[str] = typer.Option(None, "--model", "-m", help=_h("model"), show_default=False),
        out: Optional[str] = typer.Option(None, "--out", "-o", help=_h("out"), show_default=False),
        reference: Optional[str] = typer.Option(None, "--reference", help=_h("reference"), show_default=False),
        clip_model: str = typer.Option("ViT-H-14", "--clip-model", help=_h("clip_model")),
        clip_checkpoint: Optional[str] = typer.Option(None, "--clip-checkpoint", help=_h("clip_checkpoint"), show_default=False),
        hps_model: str = typer.Option("ViT-H-14", "--hps-model", help=_h("hps_model")),
        hps_checkpoint: Optional[str] = typer.Option(None, "--hps-checkpoint", help=_h("hps_checkpoint"), show_default=False),
        dino_model: str = typer.Option("vits16", "--dino-model", help=_h("dino_model")),
        dino_checkpoint: Optional[str] = typer.Option(None, "--dino-checkpoint", help=_h("dino_checkpoint"), show_default=False),
        inception_checkpoint: Optional[str] = typer.Option(None, "--inception-checkpoint", help=_h("inception_checkpoint"),
                                                           show_default=False),
        weights_config: Optional[str] = typer.Option(None, "--weights-config", help=_h("weights_config"), show_default=False),
        allow_download: bool = typer.Option(False, "--allow-download", help=_h("allow_download")),
        device: str = typer.Option("auto", "--device", help=_h("device")),
        batch_size: int = typer.Option(16, "--batch-size", help=_h("batch_size")),
        images_per_prompt: int = typer.Option(1, "--images-per-prompt", help=_h("images_per_prompt")),
        grid: int = typer.Option(16, "--grid", help=_h("grid")),
        steps: int = typer.Option(48, "--steps", help=_s("steps")),
        cfg: float = typer.Option(9.0, "--cfg", help=_s("cfg")),
        seed: int = typer.Option(0, "--seed", help=_s("seed")),
        resolution: Optional[str] = typer.Option(None, "--resolution", help=_s("resolution"), show_default=False),
        negative_prompt: str = typer.Option("", "--negative-prompt", help=_s("negative_prompt")),
        temperature: str = typer.Option("2,0", "--temperature", help=_s("temperature")),
        token_temperature: float = typer.Option(1.0, "--token-temperature", help=_s("token_temperature")),
        sample_batch_size: int = typer.Option(1, "--sample-batch-size", help=_s("batch_size")),
        dtype: str = typer.Option("fp32", "--dtype", help=_s("dtype")),
        exact: bool = typer.Option(False, "--exact", help=_s("exact")),
    ) -> None:
        """Score images with the paper's metrics (weights from local files) or the weight-free shapes benchmark.

        Scores a folder from `sample`/`edit` (--images), or samples a prompt file first (--prompts, --model).
        Writes report.json, report.md and grid.png to --out.
        """
        from rich.console import Console

        import meissonic_cli.shapes.bench  # noqa: F401  (registers the shapes suite)
        from meissonic_cli.metrics.evaluate import parse_suites, report_table, run_eval

        sample_cfg = SampleConfig(steps=steps, cfg=cfg, seed=seed, resolution=resolution, negative_prompt=negative_prompt,
                                  temperature=temperature, token_temperature=token_temperature, batch_size=sample_batch_size, device=device, dtype=dtype,
                                  exact=exact)
        config = EvalConfig(
            suites=parse_suites(suite), images=images, prompts=prompts, model=model, out=out, reference=reference,
            clip_model=clip_model, clip_checkpoint=clip_checkpoint, hps_model=hps_model, hps_checkpoint=hps_checkpoint,
            dino_model=dino_model, dino_checkpoint=dino_checkpoint, inception_checkpoint=inception_checkpoint,
            weights_config=weights_config, allow_download=allow_download, device=device, batch_size=batch_size,
            images_per_prompt=images_per_prompt, grid=grid, sample=sample_cfg,
        )
        report = run_eval(config)
        console = Console()
        console.print(report_table(report))
        if "shapes" in report:
            from meissonic_cli.shapes.bench import print_report

            print_report(report["shapes"], console)
        out_dir = config.out_dir
        console.print(f"report: {out_dir / 'report.json'}, {out_dir / 'report.md'}"
                      + (f", grid {report['grid']}" if report.get("grid") else ""), highlight=False)
