"""`meissonic tokenize` guards: micro-conditions from metadata, non-RGB images, the summary users read,
what the shards and dataset.json record, and the errors on a reused or unreadable --out.

Cheap on purpose: most runs use a two-entry `PatchVQ` (no text encoder), the rest the shared tiny model.
"""

from __future__ import annotations

import dataclasses
import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from test_tokenize import R, _flat, _image, _png, _reference_pixels
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.shards import list_token_shards, read_dataset_info, read_shard_stats, read_token_shard
from meissonic_cli.data.tokenize import (
    RawSample,
    TokenizeConfig,
    crop_offsets,
    prepare_image,
    summary_table,
    tokenize,
)
from meissonic_cli.errors import ConfigError
from meissonic_cli.model.vq.patch import PatchVQ

WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def white_vq(tmp_path_factory) -> Path:
    """A PatchVQ (f = 16) with an exactly white patch (code 0) and a 0.995 grey one (code 1)."""
    folder = tmp_path_factory.mktemp("white_vq")
    PatchVQ(torch.stack([torch.ones(3, 16, 16), torch.full((3, 16, 16), 0.995)])).save_pretrained(folder)
    return folder


@pytest.fixture
def white_folder(tmp_path) -> Path:
    """Two white images (different sizes) and one file that is not an image."""
    folder = tmp_path / "white"
    folder.mkdir()
    Image.new("RGB", (40, 32), WHITE).save(folder / "w0.png")
    Image.new("RGB", (32, 48), WHITE).save(folder / "w1.png")
    (folder / "zz_garbage.png").write_bytes(b"these bytes are no image format at all")
    return folder


def _samples(out: Path) -> dict:
    return {s.key: s for shard in list_token_shards(out) for s in read_token_shard(shard)}


def _prepare(meta: dict, *, size: tuple[int, int] = (48, 40), mode: str = "RGB", **cfg) -> tuple:
    img = _image(*size, seed=3)
    raw = RawSample(key="k", image=_png(img.convert(mode)), caption="c", meta=meta)
    return prepare_image(raw, TokenizeConfig(resolution=R, **cfg)), img


# ---------------------------------------------------------------------------------------------
# Micro-conditions


@pytest.mark.parametrize("meta, expected", [
    ({"original_width": 400, "original_height": 640}, (400, 640)),
    ({"WIDTH": 1000, "HEIGHT": 750}, (1000, 750)),
    ({"source_width": 300, "source_height": 200}, (300, 200)),
    ({"original_width": 1, "original_height": 300}, (1, 300)),  # a one-pixel-wide original is still a size
    ({"original_width": 400, "original_height": -5, "WIDTH": 1000, "HEIGHT": 750}, (1000, 750)),
    ({"original_width": 400, "original_height": -5}, None),
    ({"original_width": 0, "original_height": 640}, None),
    ({"original_width": 400}, None),
    ({"source_width": 300, "source_height": "n/a"}, None),
    ({"original_width": float("inf"), "original_height": 640}, None),
    ({"original_width": "nan", "original_height": 640}, None),
])
def test_original_size_comes_from_metadata_or_the_image(meta, expected):
    prepared, img = _prepare(meta)
    size = img.size if expected is None else expected
    assert prepared.micro[:2].tolist() == list(size)
    assert prepared.size_from_image is (expected is None)


def test_score_key_is_case_insensitive_and_must_be_finite():
    prepared, _ = _prepare({"caption": "not a score", "Aesthetic": "7.5"})
    assert prepared.micro[4] == 7.5 and not prepared.score_defaulted
    prepared, _ = _prepare({1: "a non-string key", "AESTHETIC": 5}, score_key="aesthetic")
    assert prepared.micro[4] == 5.0
    for bad in ("nan", float("inf"), "-inf", None, "high"):
        prepared, _ = _prepare({"aesthetic": bad}, score=4.5)
        assert prepared.micro[4] == 4.5 and prepared.score_defaulted, bad


def test_crop_is_random_only_when_asked_and_seeded():
    size, r = (90, 70), 32
    centre = (round((70 - r) / 2), round((90 - r) / 2))
    assert crop_offsets(size, r, True, None) == centre
    assert all(crop_offsets(size, r, False, random.Random(s)) == centre for s in range(20))
    offsets = {crop_offsets(size, r, True, random.Random(s)) for s in range(20)}
    assert len(offsets) > 1 and all(0 <= t <= 70 - r and 0 <= left <= 90 - r for t, left in offsets)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_non_rgb_images_are_converted_to_rgb(mode):
    prepared, img = _prepare({}, mode=mode)
    expected, top, left = _reference_pixels(img.convert(mode).convert("RGB"), R)
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (R, R, 3)
    assert np.array_equal(prepared.pixels, (expected[0].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8))
    assert prepared.micro[2:4].tolist() == [top, left]


# ---------------------------------------------------------------------------------------------
# Runs: what users read and what the shards hold


def test_cli_run_without_workers_summary_and_stats(white_folder, white_vq, tmp_path):
    out = tmp_path / "tokens"
    res = CliRunner().invoke(app, ["tokenize", str(white_folder), "-o", str(out), "--vq", str(white_vq),
                                   "--resolution", str(R), "--text-features", "none", "--shard-size", "1",
                                   "--workers", "0"], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    lines = [ln.strip() for ln in res.output.splitlines()]
    assert "tokenize" in lines  # the title, no rank under a single process
    flat = _flat(res.output)
    assert "3/3 images" in flat  # the progress bar counts images
    assert "images tokenized 2" in flat and "images skipped (undecodable) 1" in flat
    assert "images/s on cpu (fp32)" in flat and "throughput" in flat

    samples = _samples(out)
    assert set(samples) == {"w0", "w1"}
    s = samples["w0"]
    assert f"payload: codes, micro {s.codes.nbytes} + {s.micro.nbytes}" in flat
    # Pixels are scaled to [0, 1] exactly: 255 is 1.0, the white patch, not the 0.995 one.
    white_code = PatchVQ.from_pretrained(white_vq).encode(torch.ones(1, 3, R, R))[0].numpy()
    assert all(np.array_equal(x.codes, white_code) for x in samples.values()) and white_code.max() == 0
    assert samples["w1"].micro[:2].tolist() == [32, 48]

    stats = [read_shard_stats(p) for p in list_token_shards(out)]
    assert all(st["resolution"] == R and st["text_features"] == "none" for st in stats)
    failure = stats[2]["failures"][0]
    assert failure["key"] == "zz_garbage" and failure["error"].startswith("InputError") and "cannot identify image file" in failure["error"]
    assert "BytesIO" not in failure["error"] and " 0x" not in failure["error"]  # no Python object address
    assert f"zz_garbage: {failure['error']}" in flat


def test_cli_under_torchrun_titles_the_rank(white_folder, white_vq, tmp_path):
    out = tmp_path / "tokens"
    res = CliRunner().invoke(app, ["tokenize", str(white_folder), "-o", str(out), "--vq", str(white_vq),
                                   "--resolution", str(R), "--text-features", "none", "--shard-size", "1"],
                             env={"COLUMNS": "120", "RANK": "0", "WORLD_SIZE": "2"})
    assert res.exit_code == 0, res.output
    flat = _flat(res.output)
    assert "tokenize (rank 0 of 2)" in flat
    assert "shards written / skipped (complete) 2 / 0" in flat  # input shards 0 and 2 of 3


def test_payload_sizes_and_models_match_what_is_stored(tiny_model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _image(40, 32, 1).save(folder / "a.png")
    (folder / "a.txt").write_text("a caption")
    out = tmp_path / "tokens"
    result = tokenize(TokenizeConfig(input=str(folder), out=str(out), model=str(tiny_model_dir), resolution=R),
                      show_progress=False)
    s = _samples(out)["a"]
    stored = {"codes": s.codes, "micro": s.micro, "text": s.text, "pooled": s.pooled}
    assert result.feature_bytes == {k: v.nbytes for k, v in stored.items()}
    assert result.device == "cpu" and result.images == 1
    info = read_dataset_info(out)
    assert info["models"]["text_encoder"] == str(Path(tiny_model_dir).resolve())
    assert info["models"]["vq"] == str(Path(tiny_model_dir).resolve())

    def render(res) -> str:
        console = Console(file=io.StringIO(), width=160)
        console.print(summary_table(res))
        return console.file.getvalue()

    text = render(result)
    flat = _flat(text)
    assert text.splitlines()[0].strip() == "tokenize"
    assert "payload: codes, micro, text, pooled " + " + ".join(f"{v.nbytes:,}" for v in stored.values()) in flat
    assert f"bytes per sample (--text-features full) {result.bytes_per_sample:,.0f}" in flat
    assert "dataset total 1 samples" in flat
    ranked = render(dataclasses.replace(result, rank=1, world_size=2))
    assert ranked.splitlines()[0].strip() == "tokenize (rank 1 of 2)"


# ---------------------------------------------------------------------------------------------
# Errors and resume


def test_reusing_out_for_another_input_or_a_broken_dataset_json(white_folder, white_vq, tmp_path):
    def run(folder: Path, out: Path):
        return tokenize(TokenizeConfig(input=str(folder), out=str(out), vq=str(white_vq), resolution=R,
                                       text_features="none", shard_size=1), show_progress=False)

    out = tmp_path / "tokens"
    assert run(white_folder, out).shards_written == 3
    again = run(white_folder, out)
    assert (again.shards_written, again.shards_skipped) == (0, 3)

    other = tmp_path / "other"
    shutil.copytree(white_folder, other)
    with pytest.raises(ConfigError) as err:
        run(other, out)
    assert str(err.value) == (f"tokens-00000.tar was made from {white_folder} [0:1], but this input maps "
                              f"{other} [0:1] to it; the input changed since the last run: use a new --out")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"dataset.json: not valid JSON .*; choose a new --out"):
        run(white_folder, broken)
    assert [p.name for p in broken.iterdir()] == ["dataset.json"]


def test_missing_input_message():
    with pytest.raises(ConfigError, match=r"--input is required \(image shards or an image folder\)"):
        TokenizeConfig(out="o", vq="v", text_features="none").validate()


def test_tar_sample_json_is_read_bounded_and_missing_captions_are_counted(tmp_path):
    """A sample's .json nested 100,000 deep is that sample's failure (it reached the last-resort handler
    as a RecursionError); a sample without .txt is marked no_caption, as folder and table inputs mark it."""
    import tarfile

    from meissonic_cli.data.sources import _shard_samples

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    members = [("a.png", buf.getvalue()), ("a.json", b"[" * 100_000 + b"]" * 100_000),
               ("b.png", buf.getvalue()), ("b.txt", b"a red square"), ("c.png", buf.getvalue())]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = {s.key: s for s in _shard_samples(tmp_path / "00000.tar")}
    assert samples["a"].error == "unreadable json: a.json: JSON nested too deep"
    assert samples["c"].meta.get("no_caption") is True and samples["c"].error is None
    assert "no_caption" not in samples["b"].meta and samples["b"].caption == "a red square"
