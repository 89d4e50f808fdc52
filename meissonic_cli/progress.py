"""Progress bars for long work: one rich `Progress` layout shared by every command, and a no-op
stand-in when the bar is off (tests, non-zero ranks, `progress=False` from Python); and the
two-column summary table commands print when they finish (`key_value_table`).

    with make_progress(show, unit="images") as bar:
        task = bar.add_task("tokenize", total=n)
        bar.advance(task, 8)

The standard columns: the task's description (bold), the bar, done/total, an optional unit word,
elapsed time and, unless `remaining=False`, the estimated time left; `extra` columns go last.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


class NoProgress:
    """Takes every call a rich `Progress` is given here, and shows nothing."""

    def __init__(self) -> None:
        self._tasks = 0

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        self._tasks += 1
        return self._tasks - 1

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None

    def remove_task(self, *args: Any, **kwargs: Any) -> None:
        return None


def make_progress(enabled: bool = True, *, unit: Optional[str] = None, remaining: bool = True,
                  extra: Sequence[Any] = (), transient: bool = False, console: Any = None) -> Any:
    """A rich `Progress` with the standard columns, or a `NoProgress` when not `enabled`.

    unit: a word shown after done/total ("images"); remaining: show the time-left estimate;
    extra: more rich columns (e.g. `TextColumn("{task.fields[stats]}")`); transient: clear the bar
    when done; console: the rich Console to draw on.
    """
    if not enabled:
        return NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    columns.extend(extra)
    return Progress(*columns, transient=transient, console=console)


def key_value_table(title: str, rows: Sequence[tuple[str, str]]) -> Any:
    """The end-of-run summary the commands print: a headerless rich table of (what, value) rows."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in rows:
        table.add_row(what, value)
    return table


__all__ = ["NoProgress", "key_value_table", "make_progress"]
