"""`meissonic sample`: prompts -> images with a released-layout model (see `meissonic_cli.sample.sample`)."""

from __future__ import annotations

from typing import List, Optional

import typer

from meissonic_cli.config import help_of
from meissonic_cli.sample.sample import SampleConfig
from ._common import handle_errors


def _h(name: str) -> str:
    return help_of(SampleConfig, name)


def register(app: typer.Typer) -> None:
    @app.command("sample", no_args_is_help=True)
    @handle_errors
    def sample_command(
        model: str = typer.Option(..., "--model", "-m", help=_h("model"), show_default=False),
        prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help=_h("prompt"), show_default=False),
        prompts: Optional[str] = typer.Option(None, "--prompts", help=_h("prompts"), show_default=False),
        out: str = typer.Option("samples", "--out", "-o", help=_h("out")),
        negative_prompt: str = typer.Option("", "--negative-prompt", help=_h("negative_prompt")),
        steps: int = typer.Option(48, "--steps", help=_h("steps")),
        cfg: float = typer.Option(9.0, "--cfg", help=_h("cfg")),
        resolution: Optional[str] = typer.Option(None, "--resolution", help=_h("resolution"), show_default=False),
        seed: int = typer.Option(0, "--seed", help=_h("seed")),
        batch_size: int = typer.Option(1, "--batch-size", help=_h("batch_size")),
        device: str = typer.Option("auto", "--device", help=_h("device")),
        dtype: str = typer.Option("fp32", "--dtype", help=_h("dtype")),
        temperature: str = typer.Option("2,0", "--temperature", help=_h("temperature")),
        token_temperature: float = typer.Option(1.0, "--token-temperature", help=_h("token_temperature")),
        grid: bool = typer.Option(False, "--grid", help=_h("grid")),
        exact: bool = typer.Option(False, "--exact", help=_h("exact")),
        allow_download: bool = typer.Option(False, "--allow-download", help=_h("allow_download")),
    ) -> None:
        """Generate images from text prompts: one PNG + JSON sidecar per image in --out.

        Reruns skip images already written; with --grid a grid.png with the prompts is added.
        """
        from rich.console import Console

        from meissonic_cli.sample.sample import run_sample, summary_table

        values = dict(locals())
        values["prompt"] = list(prompt or [])
        cfg = SampleConfig(**{k: v for k, v in values.items() if k in SampleConfig.__dataclass_fields__})
        result = run_sample(cfg)
        Console().print(summary_table(result))
