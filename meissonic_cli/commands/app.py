"""`meissonic app`: a Gradio page over one model folder (see `meissonic_cli.sample.app`).

Flags: every `AppConfig` field, then the sampler options shared with `sample` (the model settings
and the defaults the page starts with); the `[app]` extra provides Gradio.
"""

from __future__ import annotations

import typer

from meissonic_cli.sample.app import AppConfig
from meissonic_cli.sample.sample import SampleConfig

from ._options import Group, Options, command
from .sample import sampler_group


def register(app: typer.Typer) -> None:
    groups = [
        Group(AppConfig, key="app"),
        Group(SampleConfig, key="download", only=("allow_download",)),
        sampler_group(),
    ]

    @command(app, "app", groups, no_args_is_help=True)
    def app_command(opts: Options) -> None:
        """Serve a web page (and API) for text to image and editing with one model (needs the `app` extra).

        Every image is saved as PNG + JSON sidecar under --out (generate/, edit/), as `sample` and `edit` save them.
        """
        from meissonic_cli.sample.app import launch

        config = opts.build("app")
        config.sample = SampleConfig(model=config.model, **opts.given("download"), **opts.given("sampler"))
        config.validate()  # every flag checked before the model loads
        typer.echo(f"Loading {config.model} ...", err=True)
        launch(config)
