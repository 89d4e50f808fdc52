"""`meissonic tokenize`: image shards -> token shards (see `meissonic_cli.data.tokenize`).

Every `TokenizeConfig` field is a flag (`_options.py`); the input is the positional argument.
"""

from __future__ import annotations

import typer

from meissonic_cli.data.tokenize import TokenizeConfig

from ._options import Group, Options, command
from ._report import JSON_OPTION, rank_zero, report


def register(app: typer.Typer) -> None:
    groups = [Group(TokenizeConfig, key="tokenize", arguments=("input",), required=("input", "out"))]

    @command(app, "tokenize", groups, extra=[JSON_OPTION], no_args_is_help=True)
    def tokenize_command(opts: Options, json_out: bool = False) -> None:
        """Encode images to VQ code grids + CLIP text features, as webdataset token shards for `train`.

        Reruns skip complete shards and redo partial ones. Under torchrun each rank takes its share of
        the input shards.
        """
        from meissonic_cli.data.tokenize import summary_table, tokenize

        with report(json_out and rank_zero()) as out:
            result = tokenize(opts.build("tokenize"))
            if result.rank == 0:
                out.data = {**vars(result), "images_per_second": result.images_per_second,
                            "bytes_per_sample": result.bytes_per_sample}
                out.show(summary_table(result))
                if result.failures:
                    shown = result.failures[:5]
                    out.show(f"{result.failed} image(s) skipped; listed under \"failures\" in each shard's "
                             f".stats.json. First {len(shown)}:", markup=False)
                    for f in shown:
                        out.show(f"  {f['shard']} {f['key']}: {f['error']}", markup=False, highlight=False)

