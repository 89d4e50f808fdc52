"""atomic.py: outputs respect the umask, whole folders appear at once, and leftovers of dead writers go."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from meissonic_cli import atomic


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_and_folders_get_the_umask_permissions(tmp_path, umask, mask):
    umask(mask)
    text = atomic.write_text(tmp_path / "a.txt", "x")
    data = atomic.write_bytes(tmp_path / "b.bin", b"x")
    via_writer = atomic.atomic_write(tmp_path / "c.png", lambda tmp: open(tmp, "wb").write(b"png"))
    assert {_mode(p) for p in (text, data, via_writer)} == {0o666 & ~mask}
    with atomic.atomic_directory(tmp_path / "out") as tmp:
        assert _mode(tmp) == 0o777 & ~mask
        atomic.write_json(tmp / "inner.json", {"a": 1})
    assert _mode(tmp_path / "out") == 0o777 & ~mask
    assert _mode(tmp_path / "out" / "inner.json") == 0o666 & ~mask


def test_atomic_directory_replaces_only_on_success(tmp_path):
    final = tmp_path / "run"
    with atomic.atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
        assert not final.exists()  # nothing under the final name while it is being built
    assert (final / "v").read_text() == "1"

    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(final) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("writer failed")
    assert (final / "v").read_text() == "1"  # the old output is untouched
    with atomic.atomic_directory(final) as tmp:
        (tmp / "w").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["w"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporaries left


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    final = tmp_path / "out"
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.tmp-{dead}"
    stale_numbered = tmp_path / f".out.tmp-{dead}-3"
    busy = tmp_path / f".out.tmp-{live}"
    other = tmp_path / f".other.tmp-{dead}"
    for folder in (stale, stale_numbered, busy, other):
        folder.mkdir()
        (folder / "partial").write_text("x")
    with atomic.atomic_directory(final) as tmp:
        (tmp / "done").write_text("y")
    assert not stale.exists() and not stale_numbered.exists()
    assert busy.exists() and other.exists()  # another process still writing, and another output's temporary
    assert (final / "done").read_text() == "y"


def test_an_output_set_aside_by_a_killed_writer_is_put_back(tmp_path):
    # Killed between moving the old output aside and moving the new one in: the old one is restored.
    aside = tmp_path / f".out.old-{_dead_pid()}"
    aside.mkdir()
    (aside / "keep").write_text("old")
    assert atomic.remove_stale_temporaries(tmp_path / "out") == []
    assert (tmp_path / "out" / "keep").read_text() == "old" and not aside.exists()
