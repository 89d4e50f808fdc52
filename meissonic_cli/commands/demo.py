"""`meissonic demo`: the whole chain on synthetic data, on a CPU (see `meissonic_cli.shapes.demo`).

Every `DemoConfig` field is a flag (`_options.py`).
"""

from __future__ import annotations

import os

import typer

from meissonic_cli.shapes.demo import DemoConfig

from ._options import Group, Options, command


def register(app: typer.Typer) -> None:
    @command(app, "demo", [Group(DemoConfig, key="demo")])
    def demo_command(opts: Options) -> None:
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

        cfg = opts.build("demo")
        console = Console()
        result = run_demo(cfg.validate(), console)
        console.print(summary_table(result))
        if result.grid is not None:
            console.print(f"samples with their prompts: {result.grid}", highlight=False)
        console.print(f"report: {result.out / 'report.json'}", highlight=False)
