"""What every command shares: turning library errors into one clear line and a non-zero exit."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from ..errors import MeissonicError


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so a `MeissonicError` prints `Error: <message>` and exits with code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MeissonicError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; completed work is kept, rerun the same command to resume") from None

    return wrapper
