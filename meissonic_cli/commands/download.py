"""`meissonic download`: curated parquet -> webdataset image shards (see `meissonic_cli.data.download`)."""

from __future__ import annotations

from typing import List, Optional

import typer

from meissonic_cli.config import help_of
from meissonic_cli.data.download import DownloadConfig
from ._common import handle_errors


def _h(name: str) -> str:
    return help_of(DownloadConfig, name)


def register(app: typer.Typer) -> None:
    @app.command("download", no_args_is_help=True)
    @handle_errors
    def download_command(
        inputs: List[str] = typer.Argument(..., help=_h("inputs"), show_default=False),
        output: str = typer.Option(..., "--output", "-o", help=_h("output")),
        image_size: int = typer.Option(512, help=_h("image_size")),
        resize_mode: str = typer.Option("keep_ratio", help=_h("resize_mode")),
        resize_only_if_bigger: bool = typer.Option(True, "--resize-only-if-bigger/--upscale",
                                                   help=_h("resize_only_if_bigger")),
        min_image_size: int = typer.Option(0, help=_h("min_image_size")),
        max_aspect_ratio: Optional[float] = typer.Option(None, help=_h("max_aspect_ratio")),
        encode_format: str = typer.Option("jpg", help=_h("encode_format")),
        encode_quality: Optional[int] = typer.Option(None, help=_h("encode_quality"), show_default=False),
        processes: int = typer.Option(1, help=_h("processes")),
        threads: int = typer.Option(32, help=_h("threads")),
        shard_size: int = typer.Option(10_000, help=_h("shard_size")),
        distributor: str = typer.Option("multiprocessing", help=_h("distributor")),
        timeout: int = typer.Option(10, help=_h("timeout")),
        retries: int = typer.Option(0, help=_h("retries")),
        url_col: Optional[str] = typer.Option(None, help=_h("url_col")),
        caption_col: Optional[str] = typer.Option(None, help=_h("caption_col")),
        overwrite: bool = typer.Option(False, "--overwrite", help=_h("overwrite")),
    ) -> None:
        """Download the images of curated parquet into webdataset shards with img2dataset (resumable)."""
        from rich.console import Console

        from meissonic_cli.data.download import download, summary_table
        from meissonic_cli.errors import MeissonicError

        cfg = DownloadConfig(**{k: v for k, v in locals().items() if k in DownloadConfig.__dataclass_fields__})
        result = download(cfg)
        Console().print(summary_table(result.summary))
        summary = result.summary
        if not summary["complete"]:
            raise MeissonicError(f"{summary['shards']} of {summary['expected_shards']} shards complete in "
                                 f"{result.output}; rerun the same command to retry the others")
