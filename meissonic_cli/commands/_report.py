"""Where a command's results go: the human summary (rich tables) or, with `--json`, one JSON document.

    @command(app, "sample", groups, extra=[JSON_OPTION])
    def sample_command(opts, json_out: bool) -> None:
        with report(json_out) as out:
            result = run_sample(cfg)
            out.show(summary_table(result))
            out.data = result

With `--json` everything meant for a person (progress bars, tables, notes, even what a library prints)
goes to stderr while the command runs, and the one JSON document (`out.data`, dataclasses and paths
made plain) is the only thing on stdout, written when the command ends; a failing command prints
its `Error:` line on stderr and exits as it would without `--json` (a document set before the
failure, e.g. download's partial summary, is still written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import PurePath
from typing import Any, Iterator, Optional

import typer

from meissonic_cli.errors import MeissonicError

from ._options import extra_option

JSON_OPTION = extra_option("json_out", bool, typer.Option(
    False, "--json", metavar="", help="Print one JSON document with the results on stdout (paths, counts, figures); progress and "
                          "tables go to stderr."))


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: dataclasses -> objects, paths -> strings, tuples -> lists, NaN -> null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return plain(value.item())
    return str(value)


class Report:
    """What one command run shows: `show()` a rich renderable for people; `data` for `--json`."""

    def __init__(self, json_mode: bool) -> None:
        from rich.console import Console

        self.json_mode = json_mode
        self.data: Any = None
        # stderr=True: with --json the tables join the progress bars on stderr.
        self.console = Console(stderr=json_mode)

    def show(self, renderable: Any, **kwargs: Any) -> None:
        self.console.print(renderable, **kwargs)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send stdout to stderr (Python's sys.stdout, and file descriptor 1 when stdout is a real
    file, so child processes follow); yields the original stdout for the JSON."""
    original = sys.stdout
    saved_fd: Optional[int] = None
    try:
        fd = original.fileno()
        original.flush()
        saved_fd = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
    except (AttributeError, OSError, ValueError):  # a test runner's in-memory stdout: Python level only
        saved_fd = None
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = original
        if saved_fd is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, original.fileno())
            os.close(saved_fd)


def rank_zero() -> bool:
    """Under torchrun only rank 0 prints the JSON document (one document per command run)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def report(json_mode: bool) -> Iterator[Report]:
    """The one place a command's output is routed (see the module docstring)."""
    if not json_mode:
        yield Report(False)
        return
    out = Report(True)
    failed = True
    try:
        with _stdout_to_stderr():
            yield out
        failed = False
    finally:  # stdout is itself again: the document goes there, even when the command then fails
        if out.data is not None:
            _write_document(out.data, quiet=failed)


def _write_document(data: Any, quiet: bool) -> None:
    """Print the JSON document on stdout; one error when stdout cannot take it (closed: `>&-`, a full
    disk), unless `quiet` (the command already failed: its own error is the one to show)."""
    text = json.dumps(plain(data), indent=2, ensure_ascii=False) + "\n"
    try:
        if sys.stdout is None:  # Python's stdout when file descriptor 1 was closed
            raise OSError("standard output is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as err:  # ValueError: a closed file object
        if not quiet:
            reason = getattr(err, "strerror", None) or str(err)
            raise MeissonicError(f"cannot write the JSON document to standard output ({reason})") from None


__all__ = ["JSON_OPTION", "Report", "plain", "rank_zero", "report"]
