"""Atomic writes: every output file and folder appears complete under its final name or not at all.

A writer gets a temporary path in the destination folder (same file system, so `os.replace` is an
atomic rename); on any failure the temporary is removed and the old output, if any, is kept. The
temporary name carries the pid (and thread id for files) so concurrent writers (torchrun ranks,
download threads) never share one. A whole output folder is built with `atomic_directory` (or
moved into place with `replace_directory`); temporary folders of processes that died (kill -9) are
removed the next time the same output is written.

Outputs get the permissions any new file gets (0644 / 0755 under the usual umask 022), so
teammates sharing a cluster can read samples and checkpoints: nothing here uses `mkstemp` or
`mkdtemp`, which create owner-only files (0600) and folders (0700).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

_counter = itertools.count()
# `.NAME.tmp-PID` / `.NAME.tmp-PID-N` (folders being built) and `.NAME.old-PID` (an output set aside).
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-\d+)?$")


def _reserve_temp_file(path: Path) -> Path:
    """Create an empty, unique temporary file next to `path` with the default (umask) permissions."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{next(_counter)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and rename the result onto `path`; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(_reserve_temp_file(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write utf-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """Atomically write `data` as indented JSON with a trailing newline."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write raw bytes."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def replace_directory(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the finished folder `new` to `final`; returns `final`.

    An existing `final` (folder or file) is renamed aside first and deleted only once `new` is in
    place (and put back if the move fails), so a failure never leaves neither.
    """
    new, final = Path(new), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return final


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders/files an interrupted writer of `final` left next to it; returns them.

    Only leftovers of processes that are no longer running are removed, so a concurrent writer's
    work in progress is never touched (process ids are those of this machine).
    """
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for path in final.parent.iterdir():
        m = _TEMP_DIR.match(path.name)
        if not m or m.group("name") != final.name or _pid_alive(int(m.group("pid"))):
            continue
        if ".old-" in path.name and not final.exists() and not final.is_symlink():
            # Killed between setting the old output aside and moving the new one in: put it back.
            os.replace(path, final)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `final` that replaces `final` when the block succeeds.

    On an exception the temporary folder is deleted and `final` is left as it was. An existing
    `final` is replaced only once the new folder is complete (see `replace_directory`). Leftovers of
    earlier writers of `final` that died are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{next(_counter)}")
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
