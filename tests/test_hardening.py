"""Security and robustness guards (issue 12): output names, tar limits, URL schemes, pixel limits, the
synth server, the last-resort error line, and processes/temporaries left by kill -9.

The command-level cases (one `Error:` line, old output kept) are in `test_bad_input.py`; these tests
check the library functions behind them directly.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from meissonic_cli import safety
from meissonic_cli.errors import InputError


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Output names stay inside --out


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "..", ".", ".hidden", "a/b", "a\\b", "nul\x00byte", "", " ",
                                  "x" * 300])
def test_unsafe_output_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="plain file name"):
        safety.safe_output_name(name, "--name")


@pytest.mark.parametrize("name", ["cat", "00001-inpaint-a-cat", "édition", "a b", "x.y"])
def test_plain_output_names_are_kept(name: str, tmp_path: Path) -> None:
    assert safety.safe_output_name(name, "--name") == name
    assert safety.is_inside(tmp_path, tmp_path / f"{name}.png")


def test_edit_cases_name_outside_out_writes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The whole command: a cases file naming `../victim` fails before anything is written."""
    from PIL import Image

    from meissonic_cli.cli import app

    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"image": "in.png", "prompt": "a cat", "box": [0, 0, 8, 8], "name": "../victim"}]))
    result = CliRunner().invoke(app, ["edit", "-m", str(tiny_model_dir), "--cases", str(cases), "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "plain file name" in result.output
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Tars: bounded members, no compressed streams unless asked


def test_gzip_tar_is_refused_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meissonic_cli.data.shards import iter_tar_groups

    path = tmp_path / "x.tar"
    path.write_bytes(gzip.compress(_tar_bytes({"a.txt": b"hello", "a.json": b"{}"})))
    with pytest.raises(InputError, match="gzip-compressed"):
        list(iter_tar_groups(path))
    assert list(iter_tar_groups(path, allow_compressed=True)) == [("a", {"txt": b"hello", "json": b"{}"})]
    monkeypatch.setenv(safety.COMPRESSED_ENV, "1")
    assert [k for k, _ in iter_tar_groups(path)] == ["a"]


def test_gzip_bomb_member_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A small gzip that expands to a large member: refused by its declared size, even when allowed."""
    from meissonic_cli.data.shards import iter_tar_groups

    path = tmp_path / "bomb.tar"
    path.write_bytes(gzip.compress(_tar_bytes({"a.jpg": b"\0" * (4 << 20)})))
    assert path.stat().st_size < 64 << 10
    with pytest.raises(InputError, match="over the limit"):
        list(iter_tar_groups(path, max_member_bytes=1 << 20, allow_compressed=True))


def test_member_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meissonic_cli.data.shards import iter_tar_groups

    path = tmp_path / "x.tar"
    path.write_bytes(_tar_bytes({"a.txt": b"x" * 5000}))
    monkeypatch.setenv(safety.MEMBER_ENV, "4096")
    with pytest.raises(InputError, match=safety.MEMBER_ENV):
        list(iter_tar_groups(path))
    monkeypatch.setenv(safety.MEMBER_ENV, "8192")
    assert len(list(iter_tar_groups(path))[0][1]["txt"]) == 5000
    monkeypatch.setenv(safety.MEMBER_ENV, "lots")
    with pytest.raises(Exception, match=safety.MEMBER_ENV):
        list(iter_tar_groups(path))


def test_tokenize_refuses_unfinished_and_compressed_shards(tmp_path: Path) -> None:
    from meissonic_cli.data.inputs import check_image_shards

    done, running = tmp_path / "00000.tar", tmp_path / "00001.tar"
    done.write_bytes(_tar_bytes({"k.txt": b"a"}))
    running.write_bytes(_tar_bytes({"k.txt": b"a"}))
    (tmp_path / "00000_stats.json").write_text("{}")
    check_image_shards([done])
    with pytest.raises(InputError, match="00001_stats.json"):
        check_image_shards([done, running])
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.tar").write_bytes(gzip.compress(_tar_bytes({"k.txt": b"a"})))
    with pytest.raises(InputError, match="gzip"):
        check_image_shards([plain / "a.tar"])


# ----------------------------------------------------------------------------------------------
# download: http/https only unless asked


def _urls_parquet(path: Path, urls: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), path)
    return path


def test_download_stages_only_http_urls_by_default(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from meissonic_cli.data.download import DownloadConfig, _stage_inputs

    src = _urls_parquet(tmp_path / "in.parquet", ["http://h/a.jpg", "HTTPS://h/b.jpg", "file:///etc/passwd",
                                                  "ftp://h/c.jpg", "gopher://h/d", "no-scheme.jpg", None, ""])
    refused: dict[str, int] = {}
    cols = {"url": "url", "caption": "caption"}
    rows, dropped, _ = _stage_inputs([src], cols, tmp_path / "stage", DownloadConfig().url_schemes(), refused)
    staged = pq.read_table(tmp_path / "stage" / "part-00000.parquet").column("url").to_pylist()
    assert staged == ["http://h/a.jpg", "HTTPS://h/b.jpg"]
    assert refused == {"file": 1, "ftp": 1, "gopher": 1, "(none)": 1}
    assert (rows, dropped) == (2, 2)

    refused = {}
    schemes = DownloadConfig(allow_schemes=["file,ftp"]).url_schemes()
    assert schemes == ("http", "https", "file", "ftp")
    rows, _, _ = _stage_inputs([src], cols, tmp_path / "stage2", schemes, refused)
    assert rows == 4 and refused == {"gopher": 1, "(none)": 1}


def test_download_with_only_file_urls_fails_and_keeps_old_output(tmp_path: Path) -> None:
    from meissonic_cli.cli import app

    old = tmp_path / "dl"
    (old / "_meissonic").mkdir(parents=True)
    (old / "00000.tar").write_bytes(b"old shard")
    (old / "_meissonic" / "download.json").write_text("{}")
    src = _urls_parquet(tmp_path / "in.parquet", [f"file://{tmp_path / 'in.parquet'}"])
    result = CliRunner().invoke(app, ["download", str(src), "-o", str(old), "--overwrite"])
    assert result.exit_code == 1, result.output
    assert "--allow-schemes" in result.output and "file 1" in result.output
    assert (old / "00000.tar").read_bytes() == b"old shard"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dl.")]


def test_bad_scheme_name_is_refused() -> None:
    from meissonic_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="not a URL scheme"):
        safety.parse_schemes("http, ../x")


# ----------------------------------------------------------------------------------------------
# Images: one pixel limit


def _png_header(path: Path, side: int) -> Path:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_input_error(tmp_path: Path) -> None:
    from meissonic_cli.metrics.report import open_rgb
    from meissonic_cli.sample.edit import load_image

    bomb = _png_header(tmp_path / "bomb.png", 100_000)
    for load in (lambda: load_image(bomb), lambda: open_rgb(bomb), lambda: safety.open_image(bomb, "img")):
        with pytest.raises(InputError, match=safety.PIXELS_ENV):
            load()


def test_pixel_limit_is_configurable_and_reaches_pil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(path)
    assert safety.open_image(path, "a").size == (40, 30)
    monkeypatch.setenv(safety.PIXELS_ENV, "1000")
    with pytest.raises(InputError, match="40x30 = 1,200 pixels, over the limit of 1,000"):
        safety.open_image(path, "a")
    assert safety.configure_pil() == 1000 and Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(InputError, match="--resolution"):
        safety.check_resolution(64, 64)


@pytest.mark.parametrize("value", ["8193", "100000x64", "64x100000", "1048576"])
def test_resolution_has_an_upper_bound(value: str) -> None:
    from meissonic_cli.config import parse_resolution

    with pytest.raises(InputError, match="largest supported side"):
        parse_resolution(value)


def test_tokenize_skips_bomb_images_with_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from meissonic_cli.data.tokenize import RawSample, TokenizeConfig, _prepare_or_error

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    monkeypatch.setenv(safety.PIXELS_ENV, "1000")
    key, reason = _prepare_or_error(RawSample("k", buf.getvalue(), "c", {}), TokenizeConfig(input="x", out="y"))
    assert key == "k" and "over the limit of 1,000" in reason and safety.PIXELS_ENV in reason


# ----------------------------------------------------------------------------------------------
# synth --serve: regular files under the root only


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_image_server_serves_regular_files_under_its_root_only(tmp_path: Path) -> None:
    from meissonic_cli.shapes.source import ImageServer

    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"png")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    (root / "out.txt").symlink_to(secret)
    (root / "outdir").symlink_to(tmp_path)
    (root / "in.png").symlink_to(root / "images" / "a.png")
    with ImageServer(root) as server:
        assert _get(f"{server.url}/images/a.png") == 200
        assert _get(f"{server.url}/in.png") == 200  # a link that stays inside the root
        for path in ("/out.txt", "/outdir/secret.txt", "/images/", "/", "/../secret.txt", "/%2e%2e/secret.txt"):
            assert _get(server.url + path) == 404, path


def test_image_server_bad_port_is_an_input_error(tmp_path: Path) -> None:
    from meissonic_cli.shapes.source import ImageServer

    with pytest.raises(InputError, match="65535"):
        ImageServer(tmp_path, port=70000).start()
    with ImageServer(tmp_path) as busy:
        with pytest.raises(InputError, match="cannot listen"):
            ImageServer(tmp_path, port=int(busy.url.rsplit(":", 1)[1])).start()


# ----------------------------------------------------------------------------------------------
# handle_errors: the last resort


def _failing_app(exc: BaseException) -> typer.Typer:
    from meissonic_cli.commands._common import handle_errors

    app = typer.Typer()

    @app.command()
    @handle_errors
    def go() -> None:
        raise exc

    return app


@pytest.mark.parametrize("exc, text", [
    (PermissionError(13, "Permission denied", "/data/x.json"), "/data/x.json: Permission denied"),
    (OSError(30, "Read-only file system", "/ro/out"), "/ro/out: Read-only file system"),
    (OverflowError("cannot convert float infinity to integer"),
     "internal error (OverflowError): cannot convert float infinity"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "internal error (UnicodeDecodeError)"),
    (RuntimeError("Weights only load failed. Re-running with weights_only=False will likely succeed; bad"),
     "internal error (RuntimeError): Weights only load failed."),
])
def test_unexpected_errors_become_one_line(exc: BaseException, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEISSONIC_DEBUG", raising=False)
    result = CliRunner().invoke(_failing_app(exc), [])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.output
    assert "weights_only=False" not in result.output and "Traceback" not in result.output
    assert "MEISSONIC_DEBUG=1" in lines[0]


def test_debug_env_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEISSONIC_DEBUG", "1")
    result = CliRunner().invoke(_failing_app(OSError(5, "I/O error", "/x")), [])
    assert isinstance(result.exception, OSError)


def test_usage_errors_and_exits_pass_through() -> None:
    result = CliRunner().invoke(_failing_app(typer.Exit(3)), [])
    assert result.exit_code == 3 and "Error" not in result.output


def test_ctrl_c_during_a_duckdb_query_is_an_interrupt_not_an_error() -> None:
    """DuckDB turns SIGINT into its own exception ("Query interrupted"): curate makes it Ctrl-C again,
    which the command reports as interrupted (exit 130) instead of a failed query."""
    import duckdb

    from meissonic_cli.data.columns import run_sql

    class Interrupted:
        def execute(self, sql: str) -> None:
            raise duckdb.InterruptException("INTERRUPT Error: Query interrupted")

    with pytest.raises(KeyboardInterrupt):
        run_sql(Interrupted(), "SELECT 1", "count the rows")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# kill -9: no orphan workers, no stale temporaries


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "WANDB_MODE": "disabled"}


def _meissonic(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "meissonic_cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _children_tokens(parent: int) -> set[str]:
    """Worker tokens in the environments of `parent`'s child processes."""
    from meissonic_cli.data.workers import TOKEN_ENV

    tokens = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent:
            tokens |= {e.split(b"=", 1)[1].decode() for e in env if e.startswith(TOKEN_ENV.encode() + b"=")}
    return tokens


def test_end_with_parent_kills_marked_processes_when_the_parent_is_killed(tmp_path: Path) -> None:
    """A parent started inside `end_with_parent` starts a sleeper, then is killed with -9: the
    sleeper goes too."""
    from meissonic_cli.data.workers import marked_processes

    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from meissonic_cli.data.workers import end_with_parent\n"
        "with end_with_parent() as token:\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "    print(token, flush=True)\n"
        "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=ENV)
    token = parent.stdout.readline().strip()
    assert token and len(marked_processes(token)) == 1
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while marked_processes(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked_processes(token) == []


def test_end_with_parent_leaves_processes_alone_on_a_normal_end() -> None:
    """Only a killed parent takes its processes along (multiprocessing's resource tracker, started
    inside the block, must outlive a normal end)."""
    from meissonic_cli.data.workers import end_with_parent, marked_processes

    with end_with_parent() as token:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(1.0)
        assert sleeper.poll() is None and marked_processes(token) == [sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_download_workers_end_with_a_killed_parent(tmp_path: Path) -> None:
    import socket

    from meissonic_cli.data.workers import marked_processes

    # A server that accepts connections and never answers: the workers stay busy until killed.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    src = _urls_parquet(tmp_path / "in.parquet", [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(40)])
    proc = _meissonic("download", str(src), "-o", str(tmp_path / "dl"), "--processes", "2", "--threads", "2",
                      "--shard-size", "10", "--timeout", "120")
    try:
        deadline = time.monotonic() + 180
        tokens: set[str] = set()
        while not tokens and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            tokens = _children_tokens(proc.pid)
        assert tokens, "download never started its workers"
        (token,) = tokens
        time.sleep(1.0)
        assert marked_processes(token)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marked_processes(token) == [], "workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    # The next run starts clean: nothing stale beside the output.
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".dl.")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_curate_after_kill_9_leaves_no_stale_temporary(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 1_500_000
    pq.write_table(pa.table({"url": [f"http://h/{i}.jpg" for i in range(n)], "caption": ["a red circle"] * n,
                             "aesthetic": [6.0] * n}), tmp_path / "in.parquet")
    out = tmp_path / "cur"
    proc = _meissonic("curate", str(tmp_path / "in.parquet"), "-o", str(out))
    deadline = time.monotonic() + 120
    temps: list[Path] = []
    while not temps and proc.poll() is None and time.monotonic() < deadline:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".cur.tmp-")]
        time.sleep(0.01)
    assert temps, "curate finished before its temporary folder was seen; use a larger input"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.exists() for p in temps)  # what kill -9 leaves behind ...
    from meissonic_cli.cli import app

    result = CliRunner().invoke(app, ["curate", str(tmp_path / "in.parquet"), "-o", str(out), "--limit", "10"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in temps)  # ... is gone after the next run
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cur.")]
