"""`meissonic curate`: filter LAION-style parquet metadata (see `meissonic_cli.data.curate`).

Every `CurateConfig` field is a flag (`_options.py`); the inputs are the positional arguments.
"""

from __future__ import annotations

from typing import Optional

import typer

from meissonic_cli.data.curate import CurateConfig

from ._options import Group, Options, command
from ._report import JSON_OPTION, report


def _panel(name: str) -> Optional[str]:
    """Column-naming flags get their own --help section."""
    return "Columns" if name.endswith("_col") or name == "keep_cols" else None


def register(app: typer.Typer) -> None:
    groups = [Group(CurateConfig, key="curate", arguments=("inputs",), required=("inputs",), panel_of=_panel)]

    @command(app, "curate", groups, extra=[JSON_OPTION], no_args_is_help=True)
    def curate_command(opts: Options, json_out: bool = False) -> None:
        """Filter LAION-style parquet metadata with DuckDB into parquet shards ready for `download`."""
        from meissonic_cli.data.curate import STATS_NAME, curate, stats_table

        cfg = opts.build("curate")
        with report(json_out) as out:
            result = curate(cfg)
            out.data = {"output": result.output, "shards": result.shards, "stats": result.stats,
                        **({"sql": result.sql} if cfg.dry_run else {})}
            if cfg.dry_run:
                out.show(result.sql, markup=False, highlight=False)
            out.show(stats_table(result.stats))
            if result.output is not None:
                out.show(f"wrote {len(result.shards)} shard(s), {result.stats['rows_out']:,} rows, to "
                         f"{result.output} (stats in {result.output / STATS_NAME})", markup=False)
