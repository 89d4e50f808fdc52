"""`meissonic curate`: filter LAION-style parquet metadata (see `meissonic_cli.data.curate`)."""

from __future__ import annotations

from typing import List, Optional

import typer

from meissonic_cli.config import help_of
from meissonic_cli.data.curate import CurateConfig
from ._common import handle_errors


def _h(name: str) -> str:
    return help_of(CurateConfig, name)


def register(app: typer.Typer) -> None:
    @app.command("curate", no_args_is_help=True)
    @handle_errors
    def curate_command(
        inputs: List[str] = typer.Argument(..., help=_h("inputs"), show_default=False),
        output: Optional[str] = typer.Option(None, "--output", "-o", help=_h("output")),
        preset: Optional[str] = typer.Option(None, "--preset", help=_h("preset")),
        min_aesthetic: Optional[float] = typer.Option(None, help=_h("min_aesthetic")),
        max_watermark: Optional[float] = typer.Option(None, help=_h("max_watermark")),
        max_unsafe: Optional[float] = typer.Option(None, help=_h("max_unsafe")),
        min_similarity: Optional[float] = typer.Option(None, help=_h("min_similarity")),
        min_side: Optional[int] = typer.Option(None, help=_h("min_side")),
        min_width: Optional[int] = typer.Option(None, help=_h("min_width")),
        min_height: Optional[int] = typer.Option(None, help=_h("min_height")),
        max_aspect_ratio: Optional[float] = typer.Option(None, help=_h("max_aspect_ratio")),
        min_caption_words: Optional[int] = typer.Option(None, help=_h("min_caption_words")),
        max_caption_words: Optional[int] = typer.Option(None, help=_h("max_caption_words")),
        dedup_url: bool = typer.Option(True, "--dedup-url/--no-dedup-url", help=_h("dedup_url")),
        dedup_hash: bool = typer.Option(True, "--dedup-hash/--no-dedup-hash", help=_h("dedup_hash")),
        sample_fraction: Optional[float] = typer.Option(None, help=_h("sample_fraction")),
        limit: Optional[int] = typer.Option(None, help=_h("limit")),
        seed: int = typer.Option(0, help=_h("seed")),
        shard_rows: int = typer.Option(1_000_000, help=_h("shard_rows")),
        overwrite: bool = typer.Option(False, "--overwrite", help=_h("overwrite")),
        dry_run: bool = typer.Option(False, "--dry-run", help=_h("dry_run")),
        keep_cols: List[str] = typer.Option([], "--keep-col", help=_h("keep_cols"), rich_help_panel="Columns"),
        url_col: Optional[str] = typer.Option(None, help=_h("url_col"), rich_help_panel="Columns"),
        caption_col: Optional[str] = typer.Option(None, help=_h("caption_col"), rich_help_panel="Columns"),
        aesthetic_col: Optional[str] = typer.Option(None, help=_h("aesthetic_col"), rich_help_panel="Columns"),
        watermark_col: Optional[str] = typer.Option(None, help=_h("watermark_col"), rich_help_panel="Columns"),
        unsafe_col: Optional[str] = typer.Option(None, help=_h("unsafe_col"), rich_help_panel="Columns"),
        similarity_col: Optional[str] = typer.Option(None, help=_h("similarity_col"), rich_help_panel="Columns"),
        width_col: Optional[str] = typer.Option(None, help=_h("width_col"), rich_help_panel="Columns"),
        height_col: Optional[str] = typer.Option(None, help=_h("height_col"), rich_help_panel="Columns"),
        hash_col: Optional[str] = typer.Option(None, help=_h("hash_col"), rich_help_panel="Columns"),
    ) -> None:
        """Filter LAION-style parquet metadata with DuckDB into parquet shards ready for `download`."""
        from rich.console import Console

        from meissonic_cli.data.curate import STATS_NAME, curate, stats_table

        cfg = CurateConfig(**{k: v for k, v in locals().items() if k in CurateConfig.__dataclass_fields__})
        result = curate(cfg)
        console = Console()
        if dry_run:
            console.print(result.sql, markup=False, highlight=False)
        console.print(stats_table(result.stats))
        if result.output is not None:
            console.print(f"wrote {len(result.shards)} shard(s), {result.stats['rows_out']:,} rows, to "
                          f"{result.output} (stats in {result.output / STATS_NAME})", markup=False)
