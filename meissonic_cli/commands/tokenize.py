"""`meissonic tokenize`: image shards -> token shards (see `meissonic_cli.data.tokenize`).

Every `TokenizeConfig` field is a flag (`_options.py`); the input is the positional argument.
"""

from __future__ import annotations

import typer

from meissonic_cli.data.tokenize import TokenizeConfig

from ._options import Group, Options, command


def register(app: typer.Typer) -> None:
    groups = [Group(TokenizeConfig, key="tokenize", arguments=("input",), required=("input", "out"))]

    @command(app, "tokenize", groups, no_args_is_help=True)
    def tokenize_command(opts: Options) -> None:
        """Encode images to VQ code grids + CLIP text features, as webdataset token shards for `train`.

        Reruns skip complete shards and redo partial ones. Under torchrun each rank takes its share of
        the input shards.
        """
        from rich.console import Console

        from meissonic_cli.data.tokenize import summary_table, tokenize

        result = tokenize(opts.build("tokenize"))
        if result.rank == 0:
            console = Console()
            console.print(summary_table(result))
            if result.failures:
                shown = result.failures[:5]
                console.print(f"{result.failed} image(s) skipped; listed under \"failures\" in each shard's "
                              f".stats.json. First {len(shown)}:", markup=False)
                for f in shown:
                    console.print(f"  {f['shard']} {f['key']}: {f['error']}", markup=False, highlight=False)
