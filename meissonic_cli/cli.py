"""The `meissonic` command: a thin Typer app over the library.

Every subcommand lives in its own module under `meissonic_cli/commands/` and registers itself
here. Only typer/click are imported at start-up so that `meissonic --help` answers quickly.
"""

from __future__ import annotations

import importlib

import typer

from meissonic_cli.commands._options import RootGroup

app = typer.Typer(
    name="meissonic",
    cls=RootGroup,
    help="Curate data for, train, sample, edit and evaluate Meissonic masked image transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Order here is the order in `meissonic --help`: the pipeline order.
_COMMAND_MODULES = [
    "demo",
    "synth",
    "curate",
    "download",
    "tokenize",
    "train",
    "sample",
    "edit",
    "eval",
    "info",
]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"meissonic {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                 help="Print the version and exit."),
) -> None:
    """Curate data for, train, sample, edit and evaluate Meissonic masked image transformers."""


for _name in _COMMAND_MODULES:
    importlib.import_module(f"meissonic_cli.commands.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
