"""`meissonic tokenize`: image shards -> token shards (see `meissonic_cli.data.tokenize`)."""

from __future__ import annotations

from typing import Optional

import typer

from meissonic_cli.config import help_of
from meissonic_cli.data.tokenize import TokenizeConfig
from ._common import handle_errors


def _h(name: str) -> str:
    return help_of(TokenizeConfig, name)


def register(app: typer.Typer) -> None:
    @app.command("tokenize", no_args_is_help=True)
    @handle_errors
    def tokenize_command(
        input: str = typer.Argument(..., help=_h("input"), show_default=False),
        out: str = typer.Option(..., "--out", "-o", help=_h("out"), show_default=False),
        model: Optional[str] = typer.Option(None, "--model", help=_h("model")),
        vq: Optional[str] = typer.Option(None, "--vq", help=_h("vq")),
        text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help=_h("text_encoder")),
        resolution: int = typer.Option(256, "--resolution", help=_h("resolution")),
        random_crop: bool = typer.Option(False, "--random-crop/--center-crop", help=_h("random_crop")),
        seed: int = typer.Option(0, "--seed", help=_h("seed")),
        text_features: str = typer.Option("full", "--text-features", help=_h("text_features")),
        score_key: str = typer.Option("aesthetic", "--score-key", help=_h("score_key")),
        score: float = typer.Option(6.0, "--score", help=_h("score")),
        batch_size: int = typer.Option(32, "--batch-size", help=_h("batch_size")),
        device: str = typer.Option("auto", "--device", help=_h("device")),
        dtype: str = typer.Option("fp32", "--dtype", help=_h("dtype")),
        shard_size: int = typer.Option(1000, "--shard-size", help=_h("shard_size")),
        workers: int = typer.Option(2, "--workers", help=_h("workers")),
    ) -> None:
        """Encode images to VQ code grids + CLIP text features, as webdataset token shards for `train`.

        Reruns skip complete shards and redo partial ones. Under torchrun each rank takes its share of
        the input shards.
        """
        from rich.console import Console

        from meissonic_cli.data.tokenize import summary_table, tokenize

        cfg = TokenizeConfig(**{k: v for k, v in locals().items() if k in TokenizeConfig.__dataclass_fields__})
        result = tokenize(cfg)
        if result.rank == 0:
            console = Console()
            console.print(summary_table(result))
            if result.failures:
                shown = result.failures[:5]
                console.print(f"{result.failed} image(s) skipped; listed under \"failures\" in each shard's "
                              f".stats.json. First {len(shown)}:", markup=False)
                for f in shown:
                    console.print(f"  {f['shard']} {f['key']}: {f['error']}", markup=False, highlight=False)
