"""What every command shares: turning library errors into one clear line and a non-zero exit."""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable

import typer

from meissonic_cli.errors import MeissonicError


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print `Error: <message>` on stderr and return the Exit to raise (exit code `code`)."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code=code)


def _pass_through() -> tuple[type[BaseException], ...]:
    """Exceptions Typer/click use to exit or report usage errors: never turned into an `Error:` line here."""
    import importlib

    kinds: list[type[BaseException]] = [typer.Exit, typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        kinds += [getattr(module, k) for k in ("ClickException", "Exit", "Abort") if hasattr(module, k)]
    return tuple(kinds)


_PASS_THROUGH = _pass_through()


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
        except _PASS_THROUGH:
            raise
        except Exception as err:  # last resort: one line, never a traceback (unless MEISSONIC_DEBUG=1)
            if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
                raise
            raise fail(unexpected_message(err)) from None

    return wrapper


DEBUG_ENV = "MEISSONIC_DEBUG"


def unexpected_message(err: BaseException) -> str:
    """One line for an error no library check caught: the file and the system's reason for an
    OSError (the machine's state: disk, permissions), else `internal error (Type): ... please report
    this`: an exception that reaches here is a bug, and its line must not read as a handled error."""
    hint = f"(set {DEBUG_ENV}=1 for the traceback)"
    if isinstance(err, MemoryError):
        return f"out of memory; use smaller inputs or settings {hint}"
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
        reason = err.strerror or str(err) or type(err).__name__
        return f"{where}: {reason} {hint}" if where else f"{reason} {hint}"
    text = " ".join(str(err).split())
    # torch's unpickling errors advise `weights_only=False`, which would run code from the file: never repeat it.
    text = re.sub(r"[^.;]*weights_only=False[^.;]*[.;]?", "", text).strip()
    return f"internal error ({type(err).__name__}): {text or 'no message'} - please report this {hint}"
