"""`meissonic edit`: inpaint, outpaint and mask-free editing by masking tokens (see `meissonic_cli.sample.edit`).

Flags: every `EditConfig` field, then the sampler options shared with `sample` and `eval`.
"""

from __future__ import annotations

import typer

from meissonic_cli.sample.edit import EditConfig
from meissonic_cli.sample.sample import SampleConfig

from ._options import Group, Options, command
from ._report import JSON_OPTION, report
from .sample import sampler_group

# Sampler options that edit does not take: --resolution is EditConfig's own (resize the input); the
# other orders, schedules, tricks and the cache (`sample.samplers`) are not wired into edit.
NOT_IN_EDIT = ("resolution", "order", "schedule", "noise_reg", "differential", "cache_refresh")


def register(app: typer.Typer) -> None:
    groups = [
        Group(EditConfig, key="edit"),
        Group(SampleConfig, key="download", only=("allow_download",)),
        sampler_group(exclude=NOT_IN_EDIT),
    ]

    @command(app, "edit", groups, extra=[JSON_OPTION], no_args_is_help=True)
    def edit_command(opts: Options, json_out: bool = False) -> None:
        """Edit images without training: inpaint (--mask/--box), outpaint (--extend/--target), or mask-free (--strength).

        Writes NAME.png + NAME.json (with the source path, for `meissonic eval`) to --out; reruns skip finished cases.
        """
        from meissonic_cli.sample.edit import run_edit, summary_table

        config = opts.build("edit")
        config.sample = SampleConfig(model=config.model, **opts.given("download"), **opts.given("sampler"))
        with report(json_out) as out:
            result = run_edit(config)
            out.show(summary_table(result))
            out.data = result
