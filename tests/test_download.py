"""`download` end to end: synthetic source served on 127.0.0.1 -> img2dataset -> webdataset shards."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.download import ENCODE_QUALITY, DownloadConfig, download, summarize
from meissonic_cli.errors import ConfigError, InputError, OutputExistsError
from meissonic_cli.shapes.source import ImageServer, generate_source

ROWS = 40
SHARD = 16


@pytest.fixture()
def served(tmp_path):
    with ImageServer(tmp_path / "source") as server:
        source = generate_source(tmp_path / "source", rows=ROWS, base_url=server.url, seed=3)
        yield server, source


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _none_if_nan(v):
    return None if isinstance(v, float) and math.isnan(v) else v


@pytest.mark.slow
def test_download_end_to_end_then_resume(tmp_path, served):
    server, source = served
    rows = pq.read_table(source.parquet_files[0]).to_pylist()
    by_url: dict[str, list[dict]] = {}
    for r in rows:
        by_url.setdefault(r["URL"], []).append(r)
    missing = [r for r in rows if "/missing/" in r["URL"]]
    assert missing, "the synthetic source must hold some URLs that answer 404"

    out = tmp_path / "shards"
    cfg = DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(out), image_size=32, shard_size=SHARD,
                         threads=4, processes=1, timeout=5)
    result = download(cfg)
    s = result.summary
    assert s["complete"] and s["shards"] == s["expected_shards"] == math.ceil(ROWS / SHARD)
    assert s["count"] == ROWS
    assert s["successes"] == ROWS - len(missing)
    assert s["failed_to_download"] == len(missing)
    assert s["failures_by_reason"] == {"HTTP Error 404: File not found": len(missing)}
    assert json.loads((out / "_meissonic" / "download_summary.json").read_text())["successes"] == s["successes"]

    seen = 0
    for tar in sorted(out.glob("*.tar")):
        for key, sample in _tar_samples(tar).items():
            meta = json.loads(sample["json"])
            assert meta["status"] == "success" and meta["key"] == key
            assert sample["txt"].decode() == (meta["caption"] or "")
            # a repeated URL may carry other metadata: the sample must match one of its rows exactly
            assert any(meta["caption"] == src["TEXT"] and meta["hash"] == src["hash"]
                       and meta["aesthetic"] == _none_if_nan(src["aesthetic"])
                       and meta["pwatermark"] == _none_if_nan(src["pwatermark"])
                       and meta["source_width"] == _none_if_nan(src["WIDTH"]) for src in by_url[meta["url"]])
            img = Image.open(io.BytesIO(sample["jpg"]))
            assert (meta["width"], meta["height"]) == img.size and min(img.size) == 32
            assert min(meta["original_width"], meta["original_height"]) > 32
            seen += 1
    assert seen == s["successes"]
    assert server.requested_paths and len(server.requested_paths) == ROWS

    # Simulate an interrupted shard: its stats (written last) never appeared. A rerun through the
    # CLI redoes that shard only.
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").write_bytes(b"partial")
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02]*")}
    server.requested_paths.clear()
    res = CliRunner().invoke(app, ["download", str(source.parquet_files[0]), "-o", str(out), "--image-size", "32",
                                   "--shard-size", str(SHARD), "--threads", "4", "--processes", "1", "--timeout", "5"])
    assert res.exit_code == 0, res.output
    assert len(server.requested_paths) == SHARD  # only the redone shard's URLs were fetched again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02]*")} == untouched
    assert summarize(out)["successes"] == s["successes"]
    assert len(_tar_samples(out / "00001.tar")) > 0

    # A rerun with other image options would mix two datasets in one folder: refused, nothing touched.
    with pytest.raises(ConfigError, match="--overwrite"):
        download(DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(out), image_size=48,
                                shard_size=SHARD))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02]*")} == untouched


def test_bad_inputs_are_refused_before_downloading(tmp_path, served):
    _, source = served
    with pytest.raises(InputError, match="does not exist"):
        download(DownloadConfig(inputs=[str(tmp_path / "nope.parquet")], output=str(tmp_path / "o")))
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet at all, just bytes")
    with pytest.raises(InputError, match="not a parquet file"):
        download(DownloadConfig(inputs=[str(fake)], output=str(tmp_path / "o")))
    pq.write_table(pq.read_table(source.parquet_files[0]).drop(["URL"]), tmp_path / "nourl.parquet")
    with pytest.raises(InputError, match="no url column.*columns present: TEXT"):
        download(DownloadConfig(inputs=[str(tmp_path / "nourl.parquet")], output=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="--resize-mode.*--encode-format"):
        download(DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(tmp_path / "o"),
                                resize_mode="stretch", encode_format="gif"))
    with pytest.raises(ConfigError, match="--shard-size must be between 1 and 10000000, got 0"):  # numbers first
        download(DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(tmp_path / "o"), shard_size=0))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds no `meissonic download` state"):
        download(DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(foreign)))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "o").exists()


def test_missing_distributor_package_is_a_clear_error(tmp_path, served, monkeypatch):
    _, source = served
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match="--distributor ray needs the ray package"):
        download(DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(tmp_path / "o"), distributor="ray"))
    assert not (tmp_path / "o").exists()


def test_server_serves_images_and_404s(served):
    import urllib.error
    import urllib.request

    server, source = served
    first = sorted(source.images_dir.iterdir())[0]
    with urllib.request.urlopen(f"{server.url}/images/{first.name}", timeout=5) as resp:
        assert resp.status == 200 and resp.read() == first.read_bytes()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server.url}/missing/0000000.png", timeout=5)
    assert err.value.code == 404
    assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")
    assert os.path.basename(server.requested_paths[0]) == first.name


def test_encode_quality_default_and_range_follow_the_format(tmp_path):
    def cfg(**kw) -> DownloadConfig:
        return DownloadConfig(inputs=["in.parquet"], output=str(tmp_path / "o"), **kw)

    png = cfg(encode_format="png")
    png.validate()
    assert png.quality() == ENCODE_QUALITY["png"][2] and 0 <= png.quality() <= 9
    assert cfg().quality() == cfg(encode_format="webp").quality() == 95
    # leaving the flag out resumes a run that gave the format's default explicitly
    assert png.fingerprint_options() == cfg(encode_format="png", encode_quality=png.quality()).fingerprint_options()
    assert cfg().fingerprint_options() != cfg(encode_quality=90).fingerprint_options()
    for fmt, value in (("jpg", 0), ("jpg", 100), ("webp", 1), ("webp", 100), ("png", 0), ("png", 9)):
        cfg(encode_format=fmt, encode_quality=value).validate()
    for fmt, value, expected in (("png", 95, "png compression level, 0-9"), ("png", -1, "png compression level, 0-9"),
                                 ("jpg", 101, "jpg quality, 0-100"), ("webp", 0, "webp quality, 1-100")):
        with pytest.raises(ConfigError, match=f"--encode-quality is the {expected}.*got {value}$"):
            cfg(encode_format=fmt, encode_quality=value).validate()


def test_encode_quality_defaults_are_accepted_by_img2dataset():
    from img2dataset.resizer import Resizer

    buf = io.BytesIO()
    Image.new("RGB", (48, 24), (200, 30, 90)).save(buf, format="PNG")
    for fmt, (low, high, default) in ENCODE_QUALITY.items():
        for value in (low, high, default):
            resizer = Resizer(image_size=16, resize_mode="keep_ratio", resize_only_if_bigger=True,
                              encode_format=fmt, encode_quality=value)
            buf.seek(0)
            encoded, width, height, *_, error = resizer(buf)
            assert error is None and (width, height) == (32, 16)
            assert Image.open(io.BytesIO(encoded)).format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    # the out-of-range value img2dataset would only reject inside a worker is refused by validate()
    with pytest.raises(ValueError, match="between 0 and 9"):
        Resizer(image_size=16, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="png",
                encode_quality=95)


def test_cli_refuses_an_out_of_range_encode_quality_in_one_line(tmp_path):
    parquet = tmp_path / "in.parquet"
    parquet.write_bytes(b"never read: the flags are checked first")
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["download", str(parquet), "-o", str(out), "--encode-format", "png",
                                   "--encode-quality", "95"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: --encode-quality is the png compression level, 0-9 (leave it out for 1); got 95"]
    assert not out.exists()
