"""`meissonic download`: curated parquet -> webdataset image shards (see `meissonic_cli.data.download`).

Every `DownloadConfig` field is a flag (`_options.py`); the inputs are the positional arguments.
"""

from __future__ import annotations

import typer

from meissonic_cli.data.download import DownloadConfig

from ._options import Group, Options, command
from ._report import JSON_OPTION, report


def register(app: typer.Typer) -> None:
    groups = [Group(DownloadConfig, key="download", arguments=("inputs",), required=("inputs",))]

    @command(app, "download", groups, extra=[JSON_OPTION], no_args_is_help=True)
    def download_command(opts: Options, json_out: bool = False) -> None:
        """Download the images of curated parquet into webdataset shards with img2dataset (resumable)."""
        from meissonic_cli.data.download import download, summary_table
        from meissonic_cli.errors import MeissonicError

        with report(json_out) as out:
            result = download(opts.build("download"))
            out.show(summary_table(result.summary))
            out.data = {"output": result.output, **result.summary}
        summary = result.summary
        if not summary["complete"]:
            raise MeissonicError(f"{summary['shards']} of {summary['expected_shards']} shards complete in "
                                 f"{result.output}; rerun the same command to retry the others")
