"""The `meissonic` command: a thin Typer app over the library.

Every subcommand lives in its own module under `meissonic_cli/commands/` and registers itself
here. Only typer/click are imported at start-up so that `meissonic --help` answers quickly.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

from meissonic_cli.commands._options import RootGroup

app = typer.Typer(
    name="meissonic",
    cls=RootGroup,
    help="Curate data for, train, sample, edit and evaluate Meissonic masked image transformers.",
    no_args_is_help=True,
    add_completion=True,
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
    "distill",
    "sample",
    "edit",
    "eval",
    "app",
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


def _modules_to_register() -> list[str]:
    """Every command module, or only the one being run when this process is `meissonic CMD ...`.

    Importing every command (and so every library module's config) costs ~0.2 s of CPU at each
    start, which `meissonic curate` over a few million rows should not pay
    (`benchmarks/curate_speed.py` times the whole process). Imported any other way (tests, an
    application, `meissonic --help`, an unknown command), the app has all commands.
    """
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    started = argv0.name == "meissonic" or argv0.parts[-2:] == ("meissonic_cli", "__main__.py")
    if started and len(sys.argv) > 1 and sys.argv[1] in _COMMAND_MODULES:
        return [sys.argv[1]]
    return _COMMAND_MODULES


for _name in _modules_to_register():
    importlib.import_module(f"meissonic_cli.commands.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
