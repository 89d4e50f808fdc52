"""`download --distributor multiprocessing|pyspark|ray`: the same shards whichever runs the download.

As img2dataset's own suite does (`test_distributors` in its tests/test_main.py), one test parametrised
over the distributors, each run locally — a `local[N]` Spark session, a local Ray instance — against
the loopback image server, compared with a multiprocessing reference made once per module.
img2dataset writes a shard's samples in the order its threads finish, so two runs (even two
multiprocessing runs) differ in member order and tar header mtimes; what must match is every
shard's set of members (names and bytes) and its metadata rows. Training reads each shard in key
order, so member order does not reach the model.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.download import DownloadConfig, download, java_version
from meissonic_cli.errors import ConfigError
from meissonic_cli.shapes.source import ImageServer, generate_source

ROWS = 40
SHARD = 16


def _config(source, out: Path, **kw) -> DownloadConfig:
    return DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(out), image_size=32, shard_size=SHARD,
                          threads=4, timeout=5, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The loopback server, its source and a multiprocessing download (one process) of it."""
    root = tmp_path_factory.mktemp("distributors")
    with ImageServer(root / "source") as server:
        source = generate_source(root / "source", rows=ROWS, base_url=server.url, seed=3)
        result = download(_config(source, root / "reference", processes=1))
        assert result.summary["complete"] and 0 < result.summary["successes"] < ROWS  # some URLs answer 404
        yield server, source, root / "reference"


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    return members


def _rows(parquet: Path) -> list[dict]:
    return sorted(pq.read_table(parquet).to_pylist(), key=lambda r: r["key"])


def _fake_program(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("distributor", ["multiprocessing", "pyspark", "ray"])
def test_distributors_write_the_same_shards(distributor, reference, tmp_path, monkeypatch):
    server, source, ref = reference
    # Spark used to start its workers with the `python3` on PATH: make that one unusable, and leave
    # PYSPARK_PYTHON unset (setenv first so the teardown restores whatever was there before).
    fake_bin = tmp_path / "bin"
    _fake_program(fake_bin, "python3", 'echo "not the interpreter running the tests" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    for name in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    requested = len(server.requested_paths)
    out = tmp_path / distributor
    result = download(_config(source, out, processes=2, distributor=distributor))
    assert len(server.requested_paths) - requested == ROWS  # every row fetched once, by whichever worker

    reference_summary = json.loads((ref / "_meissonic" / "download_summary.json").read_text())
    for key in ("shards", "count", "successes", "failed_to_download", "failures_by_reason", "tars", "complete"):
        assert result.summary[key] == reference_summary[key], key
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == sorted(p.name for p in ref.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    for name in tars:
        got, want = _members(out / name), _members(ref / name)
        assert sorted(got) == sorted(want), name
        assert all(got[m] == want[m] for m in want), name
        assert any(m.endswith(".jpg") for m in got)
        parquet = name.replace(".tar", ".parquet")
        assert _rows(out / parquet) == _rows(ref / parquet)


def _no_java_anywhere(tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)


def test_pyspark_without_java_is_one_clear_error_line(tmp_path, monkeypatch):
    pytest.importorskip("pyspark")  # without it the error is the missing package (tested in test_download.py)
    parquet = tmp_path / "in.parquet"
    parquet.write_bytes(b"never read: the distributor is checked first")
    _no_java_anywhere(tmp_path, monkeypatch)
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["download", str(parquet), "-o", str(out), "--distributor", "pyspark"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --distributor pyspark runs on Java and found no `java` "
                                                   "on PATH: install Java"), res.output
    assert "apt-get install openjdk-17-jre-headless" in lines[0] and "--distributor multiprocessing" in lines[0]
    assert not out.exists()


def test_pyspark_with_too_old_java_names_the_version_needed(tmp_path, monkeypatch):
    pytest.importorskip("pyspark")
    from importlib.metadata import version

    home = tmp_path / "jdk8"
    _fake_program(home / "bin", "java", 'echo \'openjdk version "1.8.0_392"\' >&2')
    _no_java_anywhere(tmp_path, monkeypatch)
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert java_version(str(home / "bin" / "java")) == 8
    cfg = DownloadConfig(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "o"), distributor="pyspark")
    if int(version("pyspark").split(".")[0]) >= 4:
        with pytest.raises(ConfigError, match=r"needs Java 17 or newer and found Java 8 \(.*jdk8/bin/java\)"):
            download(cfg)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="JAVA_HOME=.*nowhere holds no bin/java"):
        download(cfg)
    _fake_program(home / "bin", "java", "echo 'openjdk version \"21.0.2\" 2024-01-16' >&2")
    assert java_version(str(home / "bin" / "java")) == 21


def test_unreachable_ray_address_is_refused_at_once(tmp_path):
    import socket

    pytest.importorskip("ray")
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp_path / "in.parquet")
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(app, ["download", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "o"),
                                   "--distributor", "ray", "--ray-address", f"127.0.0.1:{port}"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: --ray-address / RAY_ADDRESS 127.0.0.1:{port}: nothing answers there (Connection refused); start "
        "the cluster (`ray start --head` on the head node) or fix the address"]
    assert not list((tmp_path / "o").glob("*.tar"))
