"""Atomic writes as behaviour (issue 15): a writer that fails midway leaves the old file and no
temporary; leftovers of dead writers go, live ones stay; folders are swapped with no gap."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from meissonic_cli import atomic


def test_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.json"
    atomic.write_json(target, {"old": True})
    old = target.read_bytes()

    def half_then_fail(tmp: str) -> None:
        assert Path(tmp).parent == target.parent and Path(tmp) != target
        Path(tmp).write_text('{"new": tr', encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.atomic_write(target, half_then_fail)
    assert target.read_bytes() == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]

    # A writer that succeeds replaces the file and leaves nothing else behind.
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    atomic.write_text(tmp_path / "fresh" / "deeper" / "a.txt", "x")  # missing parents are created
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    assert (tmp_path / "fresh" / "deeper" / "a.txt").read_text() == "x"


def test_write_json_formats_with_a_trailing_newline(tmp_path: Path) -> None:
    path = atomic.write_json(tmp_path / "a.json", {"b": 1, "a": "é"}, sort_keys=True)
    assert path == tmp_path / "a.json"
    assert path.read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'
    atomic.write_json(path, {"b": 1, "a": 2})
    assert path.read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": 2\n}\n'


def test_replace_directory_swaps_folders_and_restores_the_old_one_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "new.txt").write_text("new")
    assert atomic.replace_directory(new, final) == final
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone, nothing aside

    # The move fails (the new folder is missing): the old folder is put back, nothing left aside.
    with pytest.raises(FileNotFoundError):
        atomic.replace_directory(tmp_path / "missing", final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # A file in the way is replaced too.
    (tmp_path / "file").write_text("f")
    other = tmp_path / "other"
    other.mkdir()
    atomic.replace_directory(other, tmp_path / "file")
    assert (tmp_path / "file").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]
    # A destination whose parents do not exist yet gets them.
    nested = tmp_path / "n"
    nested.mkdir()
    atomic.replace_directory(nested, tmp_path / "deep" / "er" / "est")
    assert (tmp_path / "deep" / "er" / "est").is_dir()


def test_temporary_name_is_per_process_and_thread(tmp_path: Path) -> None:
    names = []
    atomic.atomic_write(tmp_path / "f.bin", lambda tmp: (names.append(Path(tmp).name), Path(tmp).write_bytes(b"1")))
    assert names[0].startswith(f".f.bin.{os.getpid()}-") and names[0].endswith(".tmp")


def test_an_existing_temporary_name_is_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_counter", itertools.count(7))
    taken = tmp_path / f".f.bin.{os.getpid()}-{threading.get_ident()}-7.tmp"
    taken.write_text("another writer's work")
    used = []

    def write(tmp: str) -> None:
        used.append(Path(tmp))
        Path(tmp).write_bytes(b"mine")

    atomic.atomic_write(tmp_path / "f.bin", write)
    assert used[0].parent == tmp_path and used[0].name == f".f.bin.{os.getpid()}-{threading.get_ident()}-8.tmp"
    assert (tmp_path / "f.bin").read_bytes() == b"mine"
    assert taken.read_text() == "another writer's work"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f.bin", taken.name])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_leftovers_are_removed_and_reported(tmp_path: Path) -> None:
    dead = _dead_pid()
    final = tmp_path / "out"
    aside = tmp_path / f".out.old-{dead}"  # an output set aside by a killed writer: put back
    aside.mkdir()
    (aside / "keep").write_text("old")
    folder = tmp_path / f".out.tmp-{dead}-2"
    folder.mkdir()
    (folder / "partial").write_text("x")
    loose = tmp_path / f".out.tmp-{dead}"  # a file, not a folder
    loose.write_text("x")
    mine = tmp_path / f".out.tmp-{os.getpid()}"  # this process is alive: kept
    mine.mkdir()
    removed = atomic.remove_stale_temporaries(final)
    assert sorted(removed) == sorted([folder, loose])
    assert (final / "keep").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name])
    # With the output present, a leftover folder is removed, not moved onto it.
    stale = tmp_path / f".out.tmp-{dead}"
    stale.mkdir()
    assert atomic.remove_stale_temporaries(final) == [stale] and (final / "keep").exists()
    assert atomic.remove_stale_temporaries(tmp_path / "no" / "such") == []


def test_stale_temporary_without_an_output_is_not_moved_into_place(tmp_path: Path) -> None:
    stale = tmp_path / f".out.tmp-{_dead_pid()}"
    stale.mkdir()
    assert atomic.remove_stale_temporaries(tmp_path / "out") == [stale]
    assert sorted(tmp_path.iterdir()) == []


def test_a_process_we_may_not_signal_counts_as_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leftover = tmp_path / ".out.tmp-4242"
    leftover.mkdir()

    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    assert atomic.remove_stale_temporaries(tmp_path / "out") == []
    assert leftover.exists()


def test_replace_directory_clears_an_own_leftover_set_aside_folder(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "v1").write_text("1")
    leftover = tmp_path / f".out.old-{os.getpid()}"  # left by an earlier failed replace of this process
    leftover.mkdir()
    (leftover / "junk").write_text("x")
    new = tmp_path / "new"
    new.mkdir()
    (new / "v2").write_text("2")
    atomic.replace_directory(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_after_putting_one_set_aside_output_back_the_other_leftovers_still_go(tmp_path: Path) -> None:
    first, second = _dead_pid(), _dead_pid()
    for pid in (first, second):
        (tmp_path / f".out.old-{pid}").mkdir()
        (tmp_path / f".out.old-{pid}" / "v").write_text(str(pid))
    removed = atomic.remove_stale_temporaries(tmp_path / "out")
    assert len(removed) == 1 and removed[0].name in (f".out.old-{first}", f".out.old-{second}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "v").read_text() in (str(first), str(second))
