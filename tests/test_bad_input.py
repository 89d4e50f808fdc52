"""Bad input on every command: exit 1, exactly one `Error:` line, no traceback, old output untouched.

One table row per case: `build(ws, model)` prepares files under the case's own workspace `ws` (and
may copy the session's tiny model folder `model`) and returns the command line. Everything that
exists under `ws` before the command runs must exist afterwards with the same bytes (no output is
destroyed or rewritten by a run that fails). Cases never load a model unless they say so.

Rows with `ok=True` are inputs that are odd but valid: the command must finish (exit 0) without a
traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import resource
import shutil
import socket
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
from typer.testing import CliRunner

from meissonic_cli.cli import app

BIG_SEED = str(2**64)


# ----------------------------------------------------------------------------------------------
# Builders


def png(path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side x side pixels (a few dozen bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    body += chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def parquet(path: Path, columns: Optional[dict] = None, rows: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if columns is None:
        columns = {
            "URL": [f"http://127.0.0.1:9/{i}.png" for i in range(rows)],
            "TEXT": [f"a red circle number {i}" for i in range(rows)],
            "WIDTH": [256] * rows, "HEIGHT": [256] * rows, "AESTHETIC_SCORE": [6.5] * rows,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def tar(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def png_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def image_shards(folder: Path, keys: tuple[str, ...] = ("000000000", "000000001"), stats: bool = True) -> Path:
    """An img2dataset-style webdataset shard 00000.tar (+ 00000_stats.json)."""
    members = {}
    for k in keys:
        members[f"{k}.jpg"] = png_bytes()
        members[f"{k}.txt"] = b"a green square"
        members[f"{k}.json"] = json.dumps({"key": k, "aesthetic": 6.0}).encode()
    tar(folder / "00000.tar", members)
    if stats:
        (folder / "00000_stats.json").write_text(json.dumps({"successes": len(keys), "count": len(keys)}))
    return folder


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def synth_source(ws: Path, name: str = "src", rows: int = 6) -> Path:
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "--out", str(ws / name), "--rows", str(rows), "--sides", "64"])
    assert result.exit_code == 0, result.output
    return ws / name


def copy_model(model: Path, dst: Path) -> Path:
    shutil.copytree(model, dst)
    return dst


def perturb_weights(model_dir: Path) -> None:
    """Change one transformer weight (same shapes, other values)."""
    from safetensors.torch import load_file, save_file

    path = next((model_dir / "transformer").glob("*.safetensors"))
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = state[key] + 1.0
    save_file(state, str(path))


def sample_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "-m", str(model), "-p", "a red circle", "-o", str(out), "--steps", "1", "--resolution", "64",
            "--device", "cpu", *extra]


def edit_args(model: Path, ws: Path, *extra: str) -> list[str]:
    image = png(ws / "in.png")
    return ["edit", "-m", str(model), "-i", str(image), "-p", "a blue square", "--box", "0,0,32,32",
            "-o", str(ws / "edits"), "--steps", "1", "--device", "cpu", *extra]


def cases_file(ws: Path, rows: list, jsonl: bool = True, name: str = "cases.jsonl") -> Path:
    png(ws / "in.png")
    rows = [{"image": str(ws / "in.png"), "prompt": "a blue square", "box": [0, 0, 32, 32], **r} for r in rows]
    if jsonl:
        return write(ws / name, "".join(json.dumps(r) + "\n" for r in rows))
    return write(ws / name.replace(".jsonl", ".json"), json.dumps(rows))


def eval_images(ws: Path) -> Path:
    folder = ws / "imgs"
    png(folder / "00000-a-red-circle.png")
    write(folder / "00000-a-red-circle.json", json.dumps({"prompt": "a red circle", "file": "00000-a-red-circle.png"}))
    return folder


def busy_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _KEEP.append(sock)
    return sock.getsockname()[1]


_KEEP: list = []  # sockets held open while a case runs


# ----------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    id: str
    build: Callable[[Path, Path], list[str]]
    model: bool = False  # the case loads a model (slower)
    env: Optional[dict] = None
    ok: bool = False  # odd but valid input: must succeed (exit 0) without a traceback
    expect: Optional[str] = None  # a regex the Error: line must match (it names the setting or file)


def C(id: str, build: Callable[[Path, Path], list[str]], **kw) -> Case:
    return Case(id, build, **kw)


def _existing_source(ws: Path, extra: list[str]) -> list[str]:
    synth_source(ws)
    return ["synth", "--out", str(ws / "src"), "--rows", "6", "--sides", "64", "--overwrite", *extra]


def _curated(ws: Path) -> Path:
    runner = CliRunner()
    src = parquet(ws / "meta.parquet")
    result = runner.invoke(app, ["curate", str(src), "-o", str(ws / "cur")])
    assert result.exit_code == 0, result.output
    return ws / "cur"


def _download_state(ws: Path, manifest: Optional[str] = None) -> Path:
    out = ws / "dl"
    write(out / "00000.tar", b"old shard bytes")
    write(out / "00000_stats.json", json.dumps({"successes": 1, "count": 1}))
    write(out / "_meissonic" / "download.json", manifest if manifest is not None else json.dumps({"fingerprint": {}}))
    return out


def _token_dir(ws: Path) -> Path:
    out = ws / "tok"
    write(out / "dataset.json", json.dumps({"resolution": 64}))
    return out


def _train_cfg(ws: Path, text: str | bytes) -> str:
    return str(write(ws / "recipe.yaml", text))


CASES: list[Case] = [
    # ---- synth
    C("synth-rows-negative", lambda ws, m: ["synth", "--out", str(ws / "s"), "--rows", "-5"]),
    C("synth-files-zero", lambda ws, m: ["synth", "--out", str(ws / "s"), "--files", "0"]),
    C("synth-schema-unknown", lambda ws, m: ["synth", "--out", str(ws / "s"), "--schema", "nope"]),
    C("synth-sides-text", lambda ws, m: ["synth", "--out", str(ws / "s"), "--sides", "abc"]),
    C("synth-sides-zero", lambda ws, m: ["synth", "--out", str(ws / "s"), "--sides", "0"]),
    C("synth-sides-huge", lambda ws, m: ["synth", "--out", str(ws / "s"), "--sides", "100000"]),
    C("synth-port-range", lambda ws, m: ["synth", "--out", str(ws / "s"), "--rows", "2", "--serve", "--port", "70000"]),
    C("synth-port-negative", lambda ws, m: ["synth", "--out", str(ws / "s"), "--rows", "2", "--serve", "--port", "-1"]),
    C("synth-port-busy", lambda ws, m: ["synth", "--out", str(ws / "s"), "--rows", "2", "--sides", "64", "--serve", "--port",
                                        str(busy_port())]),
    C("synth-folder-images-negative", lambda ws, m: ["synth", "--out", str(ws / "f"), "--folder-images", "-5"]),
    C("synth-folder-images-zero-size", lambda ws, m: ["synth", "--out", str(ws / "f"), "--folder-images", "2", "--size", "0"]),
    C("synth-folder-images-huge-size", lambda ws, m: ["synth", "--out", str(ws / "f"), "--folder-images", "1", "--size", "100000"]),
    C("synth-folder-images-nonempty", lambda ws, m: (write(ws / "f" / "mine.png", b"user data"),
                                                     write(ws / "f" / "00000.png", b"user image"),
                                                     ["synth", "--out", str(ws / "f"), "--folder-images", "2", "--size", "16"])[-1]),
    C("synth-existing-no-overwrite", lambda ws, m: (synth_source(ws), ["synth", "--out", str(ws / "src"), "--rows", "6"])[-1]),
    C("synth-overwrite-bad-schema", lambda ws, m: _existing_source(ws, ["--schema", "nope"])),
    C("synth-overwrite-bad-sides", lambda ws, m: _existing_source(ws, ["--sides", "x"])),
    C("synth-overwrite-bad-rows", lambda ws, m: _existing_source(ws, ["--rows", "0"])),
    C("synth-overwrite-bad-port", lambda ws, m: _existing_source(ws, ["--serve", "--port", "70000"])),
    C("synth-under-file", lambda ws, m: (write(ws / "file", "x"), ["synth", "--out", str(ws / "file" / "s"), "--rows", "2"])[-1]),
    C("synth-folder-under-file", lambda ws, m: (write(ws / "file", "x"),
                                                ["synth", "--out", str(ws / "file" / "f"), "--folder-images", "1"])[-1]),
    # ---- curate
    C("curate-missing-input", lambda ws, m: ["curate", str(ws / "nope.parquet"), "-o", str(ws / "o")]),
    C("curate-not-parquet", lambda ws, m: ["curate", str(write(ws / "x.parquet", "hello")), "-o", str(ws / "o")]),
    C("curate-glob-nothing", lambda ws, m: ["curate", str(ws / "*.parquet"), "-o", str(ws / "o")]),
    C("curate-under-file", lambda ws, m: (write(ws / "file", "x"),
                                          ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "file" / "o")])[-1]),
    C("curate-keep-col-url", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                            "--keep-col", "URL"]),
    C("curate-keep-col-missing", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                                "--keep-col", "nope"]),
    C("curate-min-aesthetic-nan", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                                 "--min-aesthetic", "nan"]),
    C("curate-min-aesthetic-inf", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                                 "--min-aesthetic", "inf"]),
    C("curate-sample-fraction", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                               "--sample-fraction", "2"]),
    C("curate-limit-negative", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                              "--limit", "-1"]),
    C("curate-shard-rows-zero", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                               "--shard-rows", "0"]),
    C("curate-preset-unknown", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                              "--preset", "nope"]),
    C("curate-url-col-missing", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                               "--url-col", "nope"]),
    C("curate-no-url-column", lambda ws, m: ["curate", str(parquet(ws / "m.parquet", {"TEXT": ["a"]})), "-o",
                                             str(ws / "o")]),
    C("curate-existing-output", lambda ws, m: (_curated(ws), ["curate", str(ws / "meta.parquet"), "-o",
                                                              str(ws / "cur")])[-1]),
    C("curate-overwrite-bad-option", lambda ws, m: (_curated(ws), ["curate", str(ws / "meta.parquet"), "-o",
                                                                   str(ws / "cur"), "--overwrite",
                                                                   "--sample-fraction", "5"])[-1]),
    C("curate-overwrite-missing-input", lambda ws, m: (_curated(ws), ["curate", str(ws / "other.parquet"), "-o",
                                                                      str(ws / "cur"), "--overwrite"])[-1]),
    C("curate-aspect-below-one", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                                "--max-aspect-ratio", "0.5"]),
    C("curate-caption-words-order", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                                   "--min-caption-words", "5", "--max-caption-words", "2"]),
    C("curate-min-side-negative", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                                 "--min-side", "-1"]),
    # One seed range everywhere (0 ..= 2**63 - 1): curate refuses what synth, sample and train refuse.
    C("curate-seed-huge", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                         "--sample-fraction", "0.5", "--seed", BIG_SEED], expect="--seed"),
    C("curate-inf-columns", lambda ws, m: ["curate", str(parquet(ws / "m.parquet", {
        "URL": ["http://a/1", "http://a/2", "http://a/3"], "TEXT": ["a b", "c d", "e f"],
        "AESTHETIC_SCORE": [6.0, float("inf"), float("-inf")], "WIDTH": [float("-inf"), 256.0, float("inf")],
        "HEIGHT": [256.0, 256.0, 256.0]})), "-o", str(ws / "o"), "--min-aesthetic", "5", "--min-side", "8"], ok=True),
    # ---- download
    C("download-missing-input", lambda ws, m: ["download", str(ws / "nope.parquet"), "-o", str(ws / "dl")]),
    C("download-not-parquet", lambda ws, m: ["download", str(write(ws / "x.parquet", "hi")), "-o", str(ws / "dl")]),
    C("download-under-file", lambda ws, m: (write(ws / "file", "x"),
                                            ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "file" / "dl")])[-1]),
    C("download-file-scheme-only", lambda ws, m: ["download", str(parquet(ws / "m.parquet", {
        "URL": [f"file://{png(ws / 'a.png')}", "ftp://example.invalid/x.png"], "TEXT": ["a", "b"]})),
        "-o", str(ws / "dl"), "--processes", "1", "--threads", "1"]),
    C("download-image-size-zero", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                                 "--image-size", "0"]),
    C("download-resize-mode", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                             "--resize-mode", "bad"]),
    C("download-encode-format", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                               "--encode-format", "gif"]),
    C("download-encode-quality", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                                "--encode-quality", "200"]),
    C("download-processes-zero", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                                "--processes", "0"]),
    C("download-timeout-zero", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                              "--timeout", "0"]),
    # Upper bounds on what sizes a download (checked before anything is staged or fetched).
    *[C(f"download-{flag[2:]}-huge", lambda ws, m, flag=flag, value=value: [
        "download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"), flag, value, "--upscale"], expect=flag)
      for flag, value in (("--image-size", "20000"), ("--min-image-size", "9000"), ("--processes", "100000"),
                          ("--threads", "5000"), ("--retries", "1000000000"), ("--timeout", "99999"),
                          ("--shard-size", "100000000"))],
    C("download-aspect-below-one", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                                  "--max-aspect-ratio", "0.5"]),
    C("download-url-col-missing", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                                 "--url-col", "nope"]),
    C("download-corrupt-manifest", lambda ws, m: (_download_state(ws, "{not json"),
                                                  ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl")])[-1]),
    C("download-manifest-not-utf8", lambda ws, m: (_download_state(ws),
                                                   write(ws / "dl" / "_meissonic" / "download.json", b"\xff\xfe\x00"),
                                                   ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl")])[-1]),
    C("download-manifest-list", lambda ws, m: (_download_state(ws, "[1, 2]"),
                                               ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl")])[-1]),
    C("download-other-options", lambda ws, m: (_download_state(ws),
                                               ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl")])[-1]),
    C("download-foreign-folder", lambda ws, m: (write(ws / "dl" / "mine.txt", "keep me"),
                                                ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl")])[-1]),
    C("download-overwrite-missing-input", lambda ws, m: (_download_state(ws),
                                                         ["download", str(ws / "nope.parquet"), "-o", str(ws / "dl"),
                                                          "--overwrite"])[-1]),
    C("download-overwrite-bad-urls", lambda ws, m: (_download_state(ws), ["download", str(parquet(ws / "m.parquet", {
        "URL": ["file:///etc/hostname"], "TEXT": ["a"]})), "-o", str(ws / "dl"), "--overwrite"])[-1]),
    C("download-overwrite-bad-option", lambda ws, m: (_download_state(ws), [
        "download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"), "--overwrite", "--encode-format", "gif"])[-1]),
    C("download-distributor", lambda ws, m: ["download", str(parquet(ws / "m.parquet")), "-o", str(ws / "dl"),
                                             "--distributor", "nope"]),
    # ---- tokenize
    C("tokenize-missing-input", lambda ws, m: ["tokenize", str(ws / "nope"), "--model", str(m), "-o", str(ws / "tok")]),
    C("tokenize-input-not-tar", lambda ws, m: ["tokenize", str(write(ws / "x.zip", "hi")), "--model", str(m), "-o", str(ws / "tok")]),
    C("tokenize-empty-folder", lambda ws, m: ((ws / "empty").mkdir(), ["tokenize", str(ws / "empty"), "-o",
                                                                        str(ws / "tok")])[-1]),
    C("tokenize-resolution-zero", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "--model", str(m), "-o", str(ws / "tok"),
                                                 "--resolution", "0"]),
    C("tokenize-resolution-huge", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "-o", str(ws / "tok"),
                                                 "--resolution", "1048576", "--model", str(m)]),
    C("tokenize-text-features", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o", str(ws / "tok"),
                                               "--text-features", "bad"]),
    C("tokenize-batch-size-zero", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o", str(ws / "tok"),
                                                 "--batch-size", "0"]),
    C("tokenize-shard-size-zero", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o", str(ws / "tok"),
                                                 "--shard-size", "0"]),
    C("tokenize-workers-negative", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o", str(ws / "tok"),
                                                  "--workers", "-1"]),
    C("tokenize-dtype", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o", str(ws / "tok"),
                                       "--dtype", "fp8"]),
    C("tokenize-device", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o", str(ws / "tok"),
                                        "--device", "nope"]),
    C("tokenize-model-missing", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "-o", str(ws / "tok"),
                                               "--model", str(ws / "nomodel")]),
    C("tokenize-seed-huge", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o", str(ws / "tok"),
                                           "--seed", BIG_SEED, "--random-crop"]),
    C("tokenize-gzip-tar", lambda ws, m: (tar(ws / "sh" / "00000.tar", {"a.jpg": png_bytes(), "a.txt": b"x"},
                                              compress=True),
                                          ["tokenize", str(ws / "sh"), "-o", str(ws / "tok"), "--model", str(m),
                                           "--resolution", "64", "--device", "cpu"])[-1], model=True),
    C("tokenize-huge-member", lambda ws, m: (tar(ws / "sh" / "00000.tar", {"a.jpg": png_bytes(), "a.txt": b"x" * 4096}),
                                             ["tokenize", str(ws / "sh"), "-o", str(ws / "tok"), "--model", str(m),
                                              "--resolution", "64", "--device", "cpu"])[-1], model=True,
      env={"MEISSONIC_MAX_MEMBER_BYTES": "1024"}),
    C("tokenize-colliding-keys", lambda ws, m: (tar(ws / "sh" / "00000.tar", {
        "a b.jpg": png_bytes(), "a b.txt": b"x", "a_b.jpg": png_bytes(), "a_b.txt": b"y"}),
        ["tokenize", str(ws / "sh"), "-o", str(ws / "tok"), "--model", str(m), "--resolution", "64",
         "--device", "cpu"])[-1], model=True, ok=True),
    C("tokenize-unfinished-shard", lambda ws, m: (image_shards(ws / "sh", stats=False),
                                                  write(ws / "sh" / "_meissonic" / "download.json", "{}"),
                                                  ["tokenize", str(ws / "sh"), "-o", str(ws / "tok"), "--model", str(m),
                                                   "--resolution", "64", "--device", "cpu"])[-1], model=True),
    C("tokenize-under-file", lambda ws, m: (write(ws / "file", "x"),
                                            ["tokenize", str(image_shards(ws / "sh")), "-o", str(ws / "file" / "tok"),
                                             "--model", str(m), "--resolution", "64", "--device", "cpu"])[-1], model=True),
    # ---- train
    C("train-config-missing", lambda ws, m: ["train", "--config", str(ws / "nope.yaml")]),
    C("train-config-not-utf8", lambda ws, m: ["train", "--config", _train_cfg(ws, b"lr: \xff\xfe\n")]),
    C("train-config-not-mapping", lambda ws, m: ["train", "--config", _train_cfg(ws, "- 1\n- 2\n")]),
    C("train-config-unknown-key", lambda ws, m: ["train", "--config", _train_cfg(ws, "nope: 1\n")]),
    C("train-config-bad-yaml", lambda ws, m: ["train", "--config", _train_cfg(ws, "a: [1,\n")]),
    C("train-config-python-tag", lambda ws, m: ["train", "--config", _train_cfg(
        ws, "lr: !!python/object/apply:os.system ['echo pwned > /dev/null']\n")]),
    C("train-data-missing", lambda ws, m: ["train", "--data", str(ws / "nope"), "--out", str(ws / "run"), "--arch", "tiny"]),
    C("train-output-under-file", lambda ws, m: (write(ws / "file", "x"),
                                                ["train", "--arch", "tiny", "--data", str(_token_dir(ws)), "--out",
                                                 str(ws / "file" / "run")])[-1]),
    C("train-seed-huge", lambda ws, m: ["train", "--arch", "tiny", "--data", str(_token_dir(ws)), "--out", str(ws / "run"),
                                        "--seed", BIG_SEED]),
    C("train-lr-nan", lambda ws, m: ["train", "--arch", "tiny", "--data", str(_token_dir(ws)), "--out", str(ws / "run"),
                                     "--lr", "nan"]),
    C("train-batch-size-zero", lambda ws, m: ["train", "--arch", "tiny", "--data", str(_token_dir(ws)), "--out", str(ws / "run"),
                                              "--batch-size", "0"]),
    C("train-resolution-huge", lambda ws, m: ["train", "--arch", "tiny", "--data", str(_token_dir(ws)), "--out", str(ws / "run"),
                                              "--resolution", "1048576"]),
    # ---- sample
    C("sample-prompts-missing", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(ws / "p.txt"), "-o",
                                               str(ws / "o")]),
    C("sample-prompts-not-utf8", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(ws / "p.txt", b"\xff\xfe")),
                                                "-o", str(ws / "o")]),
    C("sample-prompts-csv", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(ws / "p.csv", "a")), "-o",
                                           str(ws / "o")]),
    C("sample-jsonl-bad-line", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(ws / "p.jsonl", "{\n")),
                                              "-o", str(ws / "o")]),
    C("sample-jsonl-seed-huge", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.jsonl", json.dumps({"prompt": "a", "seed": 2**64}) + "\n")), "-o", str(ws / "o")]),
    C("sample-jsonl-seed-negative", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.jsonl", json.dumps({"prompt": "a", "seed": -1}) + "\n")), "-o", str(ws / "o")]),
    C("sample-jsonl-cfg-infinity", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.jsonl", '{"prompt": "a", "cfg": Infinity}\n')), "-o", str(ws / "o")]),
    C("sample-jsonl-steps-1e999", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.jsonl", '{"prompt": "a", "steps": 1e999}\n')), "-o", str(ws / "o")]),
    C("sample-seed-huge", lambda ws, m: sample_args(m, ws / "o", "--seed", BIG_SEED)),
    C("sample-cfg-nan", lambda ws, m: sample_args(m, ws / "o", "--guidance-scale", "nan")),
    C("sample-resolution-zero", lambda ws, m: sample_args(m, ws / "o", "--resolution", "0")),
    C("sample-resolution-huge", lambda ws, m: sample_args(m, ws / "o", "--resolution", "1048576")),
    C("sample-resolution-text", lambda ws, m: sample_args(m, ws / "o", "--resolution", "abc")),
    C("sample-temperature-text", lambda ws, m: sample_args(m, ws / "o", "--temperature", "a,b")),
    C("sample-temperature-three", lambda ws, m: sample_args(m, ws / "o", "--temperature", "1,2,3")),
    C("sample-temperature-inf", lambda ws, m: sample_args(m, ws / "o", "--temperature", "inf")),
    C("sample-steps-zero", lambda ws, m: sample_args(m, ws / "o", "--steps", "0")),
    C("sample-batch-size-zero", lambda ws, m: sample_args(m, ws / "o", "--batch-size", "0")),
    C("sample-dtype", lambda ws, m: sample_args(m, ws / "o", "--dtype", "fp8")),
    C("sample-token-temperature-zero", lambda ws, m: sample_args(m, ws / "o", "--token-temperature", "0")),
    C("sample-empty-prompt", lambda ws, m: ["sample", "-m", str(m), "-p", " ", "-o", str(ws / "o")]),
    C("sample-model-missing", lambda ws, m: sample_args(ws / "nomodel", ws / "o")),
    C("sample-out-is-file", lambda ws, m: sample_args(m, write(ws / "o", "x"))),
    C("sample-out-under-file", lambda ws, m: (write(ws / "file", "x"), sample_args(m, ws / "file" / "o"))[-1],
      model=True),
    C("sample-grid-exists", lambda ws, m: (write(ws / "o" / "grid.png", b"my grid"),
                                           sample_args(m, ws / "o", "--grid"))[-1], model=True),
    C("sample-image-exists", lambda ws, m: (write(ws / "o" / "00000-a-red-circle.png", b"my image"),
                                            sample_args(m, ws / "o"))[-1], model=True),
    # The same model folder, retrained (other weights) since the first run: its images are not "done".
    C("sample-other-model", lambda ws, m: (copy_model(m, ws / "m2"), CliRunner().invoke(app, sample_args(ws / "m2", ws / "o")),
                                           perturb_weights(ws / "m2"), sample_args(ws / "m2", ws / "o"))[-1], model=True),
    C("edit-other-model", lambda ws, m: (copy_model(m, ws / "m2"), CliRunner().invoke(app, edit_args(ws / "m2", ws)),
                                         perturb_weights(ws / "m2"), edit_args(ws / "m2", ws))[-1], model=True),
    C("sample-model-config-not-utf8", lambda ws, m: (copy_model(m, ws / "m2"),
                                                     write(ws / "m2" / "transformer" / "config.json", b"{\xff}"),
                                                     sample_args(ws / "m2", ws / "o"))[-1], model=True),
    C("sample-bomb-limit-resolution", lambda ws, m: sample_args(m, ws / "o"),
      env={"MEISSONIC_MAX_IMAGE_PIXELS": "1000"}),
    # ---- edit
    C("edit-name-parent", lambda ws, m: (png(ws / "x.png"), write(ws / "x.json", "{}"),
                                         edit_args(m, ws, "--name", "../x"))[-1]),
    C("edit-name-absolute", lambda ws, m: (png(ws / "abs.png"), edit_args(m, ws, "--name", str(ws / "abs")))[-1]),
    C("edit-name-dot", lambda ws, m: edit_args(m, ws, "--name", "..")),
    C("edit-name-user-file", lambda ws, m: (write(ws / "edits" / "mine.png", b"user image"),
                                            edit_args(m, ws, "--name", "mine"))[-1]),
    C("edit-cases-name-parent", lambda ws, m: (png(ws / "x.png"),
                                               ["edit", "-m", str(m), "--cases", str(cases_file(ws, [{"name": "../x"}])),
                                                "-o", str(ws / "edits")])[-1]),
    C("edit-cases-json-name-absolute", lambda ws, m: (png(ws / "abs.png"), [
        "edit", "-m", str(m), "--cases", str(cases_file(ws, [{"name": str(ws / "abs")}], jsonl=False)),
        "-o", str(ws / "edits")])[-1]),
    C("edit-cases-strength-infinity", lambda ws, m: ["edit", "-m", str(m), "--cases", str(write(
        ws / "c.jsonl", json.dumps({"image": str(png(ws / "in.png")), "prompt": "a", "mode": "edit"})[:-1]
        + ', "strength": Infinity}\n')), "-o", str(ws / "edits")]),
    C("edit-cases-steps-1e999", lambda ws, m: ["edit", "-m", str(m), "--cases", str(write(
        ws / "c.jsonl", json.dumps({"image": str(png(ws / "in.png")), "prompt": "a", "box": [0, 0, 8, 8]})[:-1]
        + ', "steps": 1e999}\n')), "-o", str(ws / "edits")]),
    C("edit-cases-seed-huge", lambda ws, m: ["edit", "-m", str(m), "--cases", str(cases_file(ws, [{"seed": 2**64}])),
                                             "-o", str(ws / "edits")]),
    C("edit-cases-not-utf8", lambda ws, m: ["edit", "-m", str(m), "--cases", str(write(ws / "c.jsonl", b"\xff\xfe{}")),
                                            "-o", str(ws / "edits")]),
    C("edit-cases-not-json", lambda ws, m: ["edit", "-m", str(m), "--cases", str(write(ws / "c.jsonl", "{oops\n")),
                                            "-o", str(ws / "edits")]),
    C("edit-cases-json-not-list", lambda ws, m: ["edit", "-m", str(m), "--cases", str(write(ws / "c.json", "3")),
                                                 "-o", str(ws / "edits")]),
    C("edit-image-missing", lambda ws, m: ["edit", "-m", str(m), "-i", str(ws / "no.png"), "-p", "a", "--box",
                                           "0,0,8,8", "-o", str(ws / "edits")]),
    C("edit-image-not-image", lambda ws, m: ["edit", "-m", str(m), "-i", str(write(ws / "t.png", "text")), "-p", "a",
                                             "--box", "0,0,8,8", "-o", str(ws / "edits")]),
    C("edit-image-bomb", lambda ws, m: ["edit", "-m", str(m), "-i", str(bomb_png(ws / "b.png")), "-p", "a",
                                        "--box", "0,0,8,8", "-o", str(ws / "edits")]),
    C("edit-image-over-limit", lambda ws, m: edit_args(m, ws), env={"MEISSONIC_MAX_IMAGE_PIXELS": "1000"}),
    C("edit-box-three", lambda ws, m: edit_args(m, ws, "--box", "1,2,3")),
    C("edit-box-text", lambda ws, m: edit_args(m, ws, "--box", "a,b,c,d")),
    C("edit-box-huge-int", lambda ws, m: edit_args(m, ws, "--box", f"0,0,{10**400},8")),
    C("edit-extend-negative", lambda ws, m: ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a",
                                             "--mode", "outpaint", "--extend", "-1,0,0,0", "-o", str(ws / "edits")]),
    C("edit-target-zero", lambda ws, m: ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a",
                                         "--mode", "outpaint", "--target", "0x0", "-o", str(ws / "edits")]),
    C("edit-target-huge", lambda ws, m: ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a",
                                         "--mode", "outpaint", "--target", "1048576x1048576", "-o", str(ws / "edits")]),
    C("edit-mode-unknown", lambda ws, m: edit_args(m, ws, "--mode", "nope")),
    C("edit-strength-two", lambda ws, m: ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a",
                                          "--mode", "edit", "--strength", "2", "-o", str(ws / "edits")]),
    C("edit-cfg-nan", lambda ws, m: edit_args(m, ws, "--guidance-scale", "nan")),
    C("edit-seed-huge", lambda ws, m: edit_args(m, ws, "--seed", BIG_SEED)),
    C("edit-strength-nan", lambda ws, m: ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a",
                                          "--mode", "edit", "--strength", "nan", "-o", str(ws / "edits")]),
    C("edit-resolution-huge", lambda ws, m: edit_args(m, ws, "--resolution", "1048576")),
    C("edit-dilate-negative", lambda ws, m: edit_args(m, ws, "--dilate", "-1")),
    C("edit-mask-missing", lambda ws, m: ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a",
                                          "--mask", str(ws / "nomask.png"), "-o", str(ws / "edits")]),
    C("edit-out-under-file", lambda ws, m: (write(ws / "file", "x"),
                                            ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a", "--box",
                                             "0,0,32,32", "-o", str(ws / "file" / "e"), "--steps", "1",
                                             "--device", "cpu"])[-1], model=True),
    # ---- eval
    C("eval-report-exists", lambda ws, m: (write(ws / "rep" / "report.json", "{\"mine\": 1}\n"),
                                           ["eval", "--suite", "shapes", "--images", str(eval_images(ws)), "-o",
                                            str(ws / "rep"), "--device", "cpu"])[-1]),
    C("eval-images-missing", lambda ws, m: ["eval", "--suite", "shapes", "--images", str(ws / "nope"), "-o",
                                            str(ws / "rep")]),
    C("eval-suite-unknown", lambda ws, m: ["eval", "--suite", "nope", "--images", str(eval_images(ws))]),
    C("eval-neither", lambda ws, m: ["eval", "--suite", "shapes"]),
    C("eval-weights-config-not-utf8", lambda ws, m: ["eval", "--images", str(eval_images(ws)), "--weights-config",
                                                     str(write(ws / "w.yaml", b"clip: \xff\n"))]),
    C("eval-weights-config-not-yaml", lambda ws, m: ["eval", "--images", str(eval_images(ws)), "--weights-config",
                                                     str(write(ws / "w.yaml", "a: [1,\n"))]),
    C("eval-weights-config-list", lambda ws, m: ["eval", "--images", str(eval_images(ws)), "--weights-config",
                                                 str(write(ws / "w.json", "[1]"))]),
    C("eval-grid-negative", lambda ws, m: ["eval", "--suite", "shapes", "--images", str(eval_images(ws)),
                                           "--grid-size", "-1"]),
    C("eval-batch-size-zero", lambda ws, m: ["eval", "--suite", "shapes", "--images", str(eval_images(ws)),
                                             "--batch-size", "0"]),
    C("eval-fid-mode-unknown", lambda ws, m: ["eval", "--suite", "shapes", "--images", str(eval_images(ws)),
                                              "--fid-mode", "tf"]),
    C("eval-hps-version-unknown", lambda ws, m: ["eval", "--suite", "shapes", "--images", str(eval_images(ws)),
                                                 "--hps-version", "3"]),
    C("eval-bomb-image", lambda ws, m: (eval_images(ws), bomb_png(ws / "imgs" / "00001-b.png"),
                                        write(ws / "imgs" / "00001-b.json", json.dumps({"prompt": "a blue square"})),
                                        ["eval", "--suite", "shapes", "--images", str(ws / "imgs"), "-o",
                                         str(ws / "rep"), "--device", "cpu"])[-1]),
    C("eval-sidecar-not-utf8", lambda ws, m: (eval_images(ws), write(ws / "imgs" / "00000-a-red-circle.json", b"\xff"),
                                              ["eval", "--suite", "shapes", "--images", str(ws / "imgs")])[-1]),
    C("eval-out-under-file", lambda ws, m: (write(ws / "file", "x"),
                                            ["eval", "--suite", "shapes", "--images", str(eval_images(ws)), "-o",
                                             str(ws / "file" / "rep"), "--device", "cpu"])[-1]),
    C("eval-prompts-seed-huge", lambda ws, m: ["eval", "--suite", "shapes", "--prompts", str(write(ws / "p.txt", "a\n")),
                                               "-m", str(m), "--seed", BIG_SEED, "-o", str(ws / "rep")]),
    # ---- info
    C("info-model-empty", lambda ws, m: ["info", "--model", ""]),
    C("info-both", lambda ws, m: ["info", "--model", str(m), "--arch", "tiny"]),
    C("info-config-unknown", lambda ws, m: ["info", "--arch", "nope"]),
    C("info-model-missing", lambda ws, m: ["info", "--model", str(ws / "nope")]),
    C("info-config-not-utf8", lambda ws, m: (copy_model(m, ws / "m2"),
                                             write(ws / "m2" / "transformer" / "config.json", b"{\xff}"),
                                             ["info", "--model", str(ws / "m2")])[-1]),
    C("info-config-not-json", lambda ws, m: (copy_model(m, ws / "m2"),
                                             write(ws / "m2" / "transformer" / "config.json", "{"),
                                             ["info", "--model", str(ws / "m2")])[-1]),
    C("info-config-inf", lambda ws, m: (copy_model(m, ws / "m2"),
                                        write(ws / "m2" / "transformer" / "config.json", json.dumps(
                                            {**json.loads((m / "transformer" / "config.json").read_text()),
                                             "num_layers": 1e999})),
                                        ["info", "--model", str(ws / "m2")])[-1]),
    C("info-weights-garbage", lambda ws, m: (copy_model(m, ws / "m2"),
                                             [write(p, b"garbage") for p in (ws / "m2" / "transformer").glob("*.safetensors")],
                                             ["info", "--model", str(ws / "m2")])[-1]),
    C("info-index-outside", lambda ws, m: (copy_model(m, ws / "m2"), _outside_index(ws / "m2"),
                                           ["info", "--model", str(ws / "m2")])[-1]),
    # ---- demo
    C("demo-budget-unknown", lambda ws, m: ["demo", "--out", str(ws / "d"), "--budget", "nope"]),
    C("demo-device-unknown", lambda ws, m: ["demo", "--out", str(ws / "d"), "--device", "nope"]),
    # A device this machine lacks is refused before synth/curate/download write anything.
    C("demo-device-absent", lambda ws, m: ["demo", "--out", str(ws / "d"), "--device", "cuda:99"], expect="cuda:99"),
    C("demo-out-nonempty", lambda ws, m: (write(ws / "d" / "mine.txt", "keep"), ["demo", "--out", str(ws / "d")])[-1]),
    C("demo-out-under-file", lambda ws, m: (write(ws / "file", "x"), ["demo", "--out", str(ws / "file" / "d"),
                                                                      "--budget", "small"])[-1]),
]


def _outside_index(model_dir: Path) -> None:
    """Point a sharded-weights index at a file outside the model folder."""
    tdir = model_dir / "transformer"
    weights = next(tdir.glob("*.safetensors"))
    outside = model_dir.parent / "stolen.safetensors"
    shutil.move(str(weights), outside)
    from safetensors import safe_open

    with safe_open(str(outside), "pt") as f:
        keys = list(f.keys())
    write(tdir / "diffusion_pytorch_model.safetensors.index.json",
          json.dumps({"weight_map": {k: "../../stolen.safetensors" for k in keys}}))


# ----------------------------------------------------------------------------------------------
# Running a case


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def memory_cap(headroom: int = 3 << 30):
    """Cap this process's address space at its current size + `headroom` while a case runs, so a case
    that would allocate a decompression bomb fails (MemoryError) instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# What the last-resort handler of commands/_common.py prints: an exception no check caught (a bug).
CATCH_ALL = ("internal error", "MEISSONIC_DEBUG=1 for the traceback")


def run_case(case: Case, ws: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, str]:
    """Run one case; (handled well, why not)."""
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(os.getcwd())  # a case may build its command from another working directory
    args = case.build(ws, model)
    before = snapshot(ws)
    runner = CliRunner()
    with memory_cap():
        result = runner.invoke(app, args)
    for sock in _KEEP:
        sock.close()
    _KEEP.clear()
    output = result.output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    problems = []
    if case.ok:
        if result.exit_code != 0:
            problems.append(f"exit {result.exit_code} (expected success)")
        errors = ["(none expected)"]
    elif result.exit_code != 1:
        problems.append(f"exit {result.exit_code}")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"traceback ({type(result.exception).__name__}: {result.exception})")
    if "Traceback" in output:
        problems.append("traceback in output")
    if len(errors) != 1:
        problems.append(f"{len(errors)} Error: lines")
    if any(mark in output for mark in CATCH_ALL):
        problems.append("reached the last-resort handler (an unexpected exception)")
    if case.expect and not case.ok and not any(re.search(case.expect, e, re.I) for e in errors):
        problems.append(f"the Error: line does not match {case.expect!r}")
    after = snapshot(ws)
    changed = [k for k, v in before.items() if after.get(k) != v]
    if changed:
        problems.append(f"changed or removed: {', '.join(changed[:3])}")
    return not problems, "; ".join(problems) + f"\n--- output:\n{output[-1500:]}"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if not c.model], ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    ok, why = run_case(case, tmp_path, model, monkeypatch)
    assert ok, why


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", [c for c in CASES if c.model], ids=lambda c: c.id)
def test_bad_input_with_model(case: Case, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch,
                              one_thread) -> None:
    ok, why = run_case(case, tmp_path, model, monkeypatch)
    assert ok, why


def test_table_is_large() -> None:
    commands = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 100
    assert commands >= {"synth", "curate", "download", "tokenize", "train", "sample", "edit", "eval", "info", "demo"}
    assert len({c.id for c in CASES}) == len(CASES)
