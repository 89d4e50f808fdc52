"""`meissonic demo`: the whole chain on synthetic data, on a CPU (see `meissonic_cli.shapes.demo`)."""

from __future__ import annotations

import os

import typer

from meissonic_cli.config import help_of
from meissonic_cli.shapes.demo import DemoConfig
from ._common import handle_errors


def _h(name: str) -> str:
    return help_of(DemoConfig, name)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @handle_errors
    def demo_command(
        out: str = typer.Option("demo-out", "--out", "-o", help=_h("out")),
        budget: str = typer.Option("full", "--budget", help=_h("budget")),
        overwrite: bool = typer.Option(False, "--overwrite", help=_h("overwrite")),
        seed: int = typer.Option(0, "--seed", help=_h("seed")),
        device: str = typer.Option("cpu", "--device", help=_h("device")),
        model_only: bool = typer.Option(False, "--model-only", help=_h("model_only")),
    ) -> None:
        """Run the whole chain on synthetic data on a CPU and show that the model learned.

        Synth, curate, download, tokenize, train, sample and the shapes benchmark, in about 10 minutes on
        2 CPU cores (--budget full). Writes OUT/report.json (accuracies, chance levels, VQ PSNR, stage
        times) and OUT/samples.png (samples with their prompts).
        """
        # OpenMP threads that spin while they wait for work make torch several times slower on a CPU
        # that is busy with anything else (a laptop, a shared CI box); yielding costs little when it is
        # idle. Only effective before torch starts its thread pool, hence here, before any import of it.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from rich.console import Console

        from meissonic_cli.shapes.demo import run_demo, summary_table

        cfg = DemoConfig(out=out, budget=budget, overwrite=overwrite, seed=seed, device=device, model_only=model_only)
        console = Console()
        result = run_demo(cfg.validate(), console)
        console.print(summary_table(result))
        if result.grid is not None:
            console.print(f"samples with their prompts: {result.grid}", highlight=False)
        console.print(f"report: {result.out / 'report.json'}", highlight=False)
