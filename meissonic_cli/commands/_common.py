"""What every command shares: turning library errors into one clear line and a non-zero exit."""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer

from meissonic_cli.errors import MeissonicError


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print `Error: <message>` on stderr and return the Exit to raise (exit code `code`)."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code=code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so a `MeissonicError` prints `Error: <message>` and exits with code 1.

    Typer ships its own copy of click, so raising `click.ClickException` from here would not be
    caught by it; printing and raising `typer.Exit` works with every Typer version.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MeissonicError as err:
            raise fail(str(err)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; completed work is kept, rerun the same command to resume", 130) from None

    return wrapper
