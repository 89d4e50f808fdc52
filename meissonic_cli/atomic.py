"""Atomic file writes: every output file appears complete under its final name or not at all.

A writer gets a temporary path in the destination folder (same file system, so `os.replace` is an
atomic rename); on any failure the temporary file is removed and the old file, if any, is kept.
The temporary name carries the pid and thread id so concurrent writers (torchrun ranks, download
threads) never share one. A whole output folder is built under a temporary name and moved into
place with `replace_directory`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and rename the result onto `path`; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-{threading.get_ident()}.",
                               suffix=".tmp")
    os.close(fd)
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
