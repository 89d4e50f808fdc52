"""`meissonic tokenize` on your own images: a table of paths/URLs + captions, and a captioned folder.

Both must give what shard input gives: the same codes and micro-conditions for the same image,
failures (missing file, failed fetch, corrupt image) counted per sample, and resumable shards.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.shards import list_token_shards, read_dataset_info, read_shard_stats, read_token_shard
from meissonic_cli.data.tables import ImageTable, load_image_table, row_source
from meissonic_cli.data.tokenize import TokenizeConfig, tokenize
from meissonic_cli.errors import ConfigError, InputError
from meissonic_cli.shapes.source import ImageServer

R = 32  # the tiny VQ has f = 16: a 2x2 code grid
SIZES = [(48, 40), (40, 64), (36, 36), (90, 50), (64, 32)]


def _image(i: int) -> Image.Image:
    w, h = SIZES[i]
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _flat(output: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─┌┐└┘]", " ", output).split())


def _samples(out: Path) -> dict:
    return {s.key: s for shard in list_token_shards(out) for s in read_token_shard(shard)}


def _tokenize(model: Path, input: Path | str, out: Path, **kw):
    cfg = TokenizeConfig(input=str(input), out=str(out), model=str(model), resolution=R, text_features="pooled",
                         batch_size=2, **kw)
    return tokenize(cfg, show_progress=False)


@pytest.fixture
def photos(tmp_path) -> Path:
    """photos/pNN.png (one per size) plus a corrupt photos/broken.jpg."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(len(SIZES)):
        _image(i).save(folder / f"p{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return folder


@pytest.fixture
def reference(photos, tiny_model_dir, tmp_path) -> dict:
    """The photos tokenized as a plain folder (captions from .txt): what every other input must match."""
    ref_in = tmp_path / "ref_in"
    ref_in.mkdir()
    for i in range(len(SIZES)):
        (ref_in / f"p{i:02d}.png").write_bytes((photos / f"p{i:02d}.png").read_bytes())
        (ref_in / f"p{i:02d}.txt").write_text(f"photo {i}")
    _tokenize(tiny_model_dir, ref_in, tmp_path / "ref")
    return _samples(tmp_path / "ref")


def test_table_of_paths_and_urls(photos, reference, tiny_model_dir, tmp_path):
    with ImageServer(photos) as server:
        rows = [
            ("photos/p00.png", "photo 0", "7.5"),                   # relative to the table's folder
            (str((photos / "p01.png").resolve()), "photo 1", ""),   # absolute; no score: the default
            (f"{server.url}/p02.png", "photo 2", "3"),              # fetched over http
            ("photos/gone.png", "a missing file", "5"),
            ("photos/broken.jpg", "a corrupt image", "5"),
            (f"{server.url}/nothing-here.png", "a 404", "5"),
            ("ftp://example.invalid/p.png", "a refused scheme", "5"),
            ("photos/p03.png", "", "6.5"),                          # no caption: kept and counted
            ("photos/p04.png", "photo 4", "4"),
        ]
        table = tmp_path / "mine.csv"
        lines = ["file,prompt,Aesthetic"] + [",".join(r) for r in rows]
        table.write_text("\n".join(lines) + "\n")
        out = tmp_path / "tokens"
        res = CliRunner().invoke(app, ["tokenize", str(table), "-o", str(out), "--model", str(tiny_model_dir),
                                       "--resolution", str(R), "--text-features", "pooled", "--shard-size", "4",
                                       "--batch-size", "2", "--caption-col", "prompt", "--score-key", "aesthetic"])
        assert res.exit_code == 0, res.output
        assert server.requested_paths == ["/p02.png", "/nothing-here.png"]

    assert "4 image(s) skipped" in _flat(res.output)
    stats = [read_shard_stats(p) for p in list_token_shards(out)]
    assert [s["source"] for s in stats] == [f"{table} [0:4]", f"{table} [4:8]", f"{table} [8:9]"]
    assert sum(s["count"] for s in stats) == 5 and sum(s["no_caption"] for s in stats) == 1
    failures = {f["key"]: f["error"] for s in stats for f in s["failures"]}
    assert set(failures) == {"row000000003", "row000000004", "row000000005", "row000000006"}
    assert "missing file photos/gone.png" in failures["row000000003"]
    assert failures["row000000004"].startswith(("UnidentifiedImageError", "OSError", "InputError"))
    assert "404" in failures["row000000005"]
    assert "ftp:// URLs are not fetched" in failures["row000000006"]
    assert read_dataset_info(out)["input_kind"] == "table"

    got = _samples(out)
    assert set(got) == {"row000000000", "row000000001", "row000000002", "row000000007", "row000000008"}
    for row, (photo, score) in {0: (0, 7.5), 1: (1, 6.0), 2: (2, 3.0), 7: (3, 6.5), 8: (4, 4.0)}.items():
        s, ref = got[f"row{row:09d}"], reference[f"p{photo:02d}"]
        assert np.array_equal(s.codes, ref.codes)
        assert s.micro.tolist() == ref.micro[:4].tolist() + [score]  # same size and crop; score from the table
        assert s.caption == ("" if row == 7 else ref.caption)
        assert s.meta["row"] == row and s.meta["file"] == rows[row][0]
    np.testing.assert_array_equal(got["row000000000"].pooled, reference["p00"].pooled)
    assert got["row000000007"].meta["no_caption"] is True


def test_table_resume_redoes_only_the_unfinished_shard(photos, tiny_model_dir, tmp_path):
    table = tmp_path / "mine.jsonl"
    rows = [{"image": f"photos/p{i:02d}.png", "caption": f"photo {i}"} for i in range(len(SIZES))]
    rows.insert(2, {"image": "photos/broken.jpg", "caption": "corrupt"})
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tokens"
    first = _tokenize(tiny_model_dir, table, out, shard_size=2)
    assert (first.shards_written, first.images, first.failed) == (3, 5, 1)
    shard0, shard1 = out / "tokens-00000.tar", out / "tokens-00001.tar"
    stamp, before = shard0.stat().st_mtime_ns, shard1.read_bytes()
    (out / "tokens-00001.stats.json").unlink()  # interrupted: shard 1 has no stats file yet
    shard1.write_bytes(before[:512])

    again = _tokenize(tiny_model_dir, table, out, shard_size=2)
    assert (again.shards_written, again.shards_skipped, again.images, again.failed) == (1, 2, 1, 1)
    assert shard0.stat().st_mtime_ns == stamp and shard1.read_bytes() == before
    assert [f["key"] for f in read_shard_stats(shard1)["failures"]] == ["row000000002"]

    # The table grew: its rows no longer map to the same shards, so resuming into `out` is refused.
    table.write_text(json.dumps({"image": "photos/p00.png", "caption": "new"}) + "\n" + table.read_text())
    with pytest.raises(ConfigError, match="the input changed since the last run"):
        _tokenize(tiny_model_dir, table, out, shard_size=2)


def test_folder_with_txt_and_json_captions(photos, reference, tiny_model_dir, tmp_path):
    (photos / "p00.txt").write_text("photo 0\n")
    (photos / "p00.json").write_text(json.dumps({"caption": "ignored: the .txt wins", "aesthetic": 8}))
    (photos / "p01.json").write_text(json.dumps({"caption": "photo 1", "original_width": 400, "original_height": 640}))
    (photos / "p02.json").write_text(json.dumps({"TEXT": "photo 2"}))  # a caption name curate knows, any case
    (photos / "p03.json").write_text(json.dumps({"prompt": "not a caption key by default"}))
    (photos / "broken.txt").write_text("a corrupt image")
    out = tmp_path / "tokens"
    res = _tokenize(tiny_model_dir, photos, out, shard_size=3)
    assert (res.shards_written, res.images, res.failed) == (2, 5, 1)
    assert res.failures[0]["key"] == "broken"
    got = _samples(out)
    assert {k: s.caption for k, s in got.items()} == {"p00": "photo 0", "p01": "photo 1", "p02": "photo 2",
                                                      "p03": "", "p04": ""}
    assert sum(read_shard_stats(p)["no_caption"] for p in list_token_shards(out)) == 2
    for key, s in got.items():
        assert np.array_equal(s.codes, reference[key].codes)
    assert got["p00"].micro.tolist() == reference["p00"].micro[:4].tolist() + [8.0]
    assert got["p01"].micro.tolist()[:2] == [400, 640]  # the sidecar's original size

    # --caption-col names the sidecars' key; a rerun into a new folder picks it up.
    again = _tokenize(tiny_model_dir, photos, tmp_path / "tokens2", shard_size=3, caption_col="prompt")
    assert again.images == 5
    assert _samples(tmp_path / "tokens2")["p03"].caption == "not a caption key by default"
    # Resume: everything complete, nothing redone.
    assert _tokenize(tiny_model_dir, photos, out, shard_size=3).shards_skipped == 2


def test_table_formats_and_image_cells(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png bytes")
    data = {"File_Name": ["a.png", "0007.png"], "text": ["one", "2"], "score": [1.5, float("nan")]}
    pq.write_table(pa.table(data), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("File_Name,text,score\na.png,one,1.5\n0007.png,2,\n")
    (tmp_path / "t.tsv").write_text("File_Name\ttext\tscore\na.png\tone\t1.5\n0007.png\t2\t\n")
    (tmp_path / "t.jsonl").write_text('{"File_Name": "a.png", "text": "one", "score": 1.5}\n'
                                      '{"File_Name": "0007.png", "text": "2", "score": null}\n')
    for name in ("t.parquet", "t.csv", "t.tsv", "t.jsonl"):
        table = load_image_table(tmp_path / name)
        assert (table.image_col, table.caption_col) == ("File_Name", "text"), name
        assert [r["File_Name"] for r in table.rows] == ["a.png", "0007.png"], name  # leading zeros kept
        assert [str(r["text"]) for r in table.rows] == ["one", "2"], name
        image, load, meta, error = row_source(table.rows[0], table, timeout=1)
        assert image is None and error is None and load() == b"png bytes", name
        assert float(meta["score"]) == 1.5 and meta["File_Name"] == "a.png", name

    # A Hugging Face image column (a {"bytes", "path"} struct) and a plain binary column carry the bytes.
    hf = ImageTable(tmp_path / "hf.parquet", [], "image", "text")
    assert row_source({"image": {"bytes": b"abc", "path": "x.jpg"}, "text": "t"}, hf, 1)[:3] == (
        b"abc", None, {"image": "x.jpg"})
    assert row_source({"image": b"xyz", "text": "t", "n": float("nan")}, hf, 1)[:3] == (b"xyz", None, {"n": None})
    assert row_source({"image": None, "text": "t"}, hf, 1)[3] == "no image: the image cell is empty"
    assert row_source({"image": "s3://bucket/x.jpg", "text": "t"}, hf, 1)[3].startswith("s3:// URLs are not fetched")


def test_table_errors_are_one_line(tmp_path, tiny_model_dir):
    def run(table: Path, *extra: str):
        return CliRunner().invoke(app, ["tokenize", str(table), "-o", str(tmp_path / "out"), "--model",
                                        str(tiny_model_dir), "--resolution", str(R), *extra])

    (tmp_path / "nocol.csv").write_text("picture,caption\na.png,x\n")
    res = run(tmp_path / "nocol.csv")
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nocol.csv'} has no image column (looked for image, image_path, path, file_name, "
        "filename, file, url, image_url, link); columns present: picture, caption; pass --image-col NAME"]
    res = run(tmp_path / "nocol.csv", "--image-col", "picture", "--caption-col", "title")
    assert res.exit_code == 1 and "--caption-col 'title' is not a column of the table" in _flat(res.output)
    (tmp_path / "nocap.jsonl").write_text('{"image": "a.png"}\n')
    res = run(tmp_path / "nocap.jsonl")
    assert res.exit_code == 1 and "has no caption column" in _flat(res.output)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    res = run(tmp_path / "bad.parquet")
    assert res.exit_code == 1 and "cannot read" in _flat(res.output) and "as a parquet table" in _flat(res.output)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="neither a .tar shard nor a table"):
        _tokenize(tiny_model_dir, _touch(tmp_path / "notes.md"), tmp_path / "o2")
    with pytest.raises(ConfigError, match="--url-timeout must be > 0"):
        TokenizeConfig(input="t.csv", out="o", model="m", url_timeout=0).validate()


def _touch(path: Path) -> Path:
    path.write_text("notes")
    return path


def test_fetch_refuses_other_schemes_and_oversized_bodies(tmp_path, monkeypatch):
    from meissonic_cli.data.tables import fetch_url

    with pytest.raises(ValueError, match="only http and https"):
        fetch_url("file:///etc/passwd", timeout=1)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    with ImageServer(tmp_path) as server:
        assert fetch_url(f"{server.url}/x.png", timeout=5) == buf.getvalue()
        monkeypatch.setenv("MEISSONIC_MAX_MEMBER_BYTES", "16")
        with pytest.raises(ValueError, match="over 16 bytes"):
            fetch_url(f"{server.url}/x.png", timeout=5)
