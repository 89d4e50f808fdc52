"""`meissonic tokenize` with a tiny VQ and text encoder: folder and webdataset inputs, resume, modes, errors."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.shards import ShardStream, list_token_shards, read_dataset_info, read_shard_stats, read_token_shard
from meissonic_cli.data.tokenize import TokenizeConfig, tokenize
from meissonic_cli.errors import ConfigError, ModelFormatError
from meissonic_cli.model.text_encoder import TextEncoder
from meissonic_cli.model.vq.vqgan import VQTokenizer

R = 32  # tiny VQ has f = 16: a 2x2 code grid


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_model")
    VQTokenizer.tiny(seed=0).save_pretrained(root / "vqvae")
    TextEncoder.tiny(seed=0).save_pretrained(root / "text_encoder")
    return root


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _reference_pixels(img: Image.Image, r: int, top: int | None = None, left: int | None = None):
    """Shorter side to r (bilinear), then the crop: computed directly with PIL."""
    w, h = img.size
    if w <= h:
        size = (r, int(r * h / w))
    else:
        size = (int(r * w / h), r)
    resized = img.resize(size, Image.BILINEAR)
    if top is None:
        top, left = int(round((size[1] - r) / 2)), int(round((size[0] - r) / 2))
    crop = np.array(resized.crop((left, top, left + r, top + r)))
    return torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255, top, left


def _run(*args: str):
    return CliRunner().invoke(app, ["tokenize", *args])


def _flat(output: str) -> str:
    """CLI output with box drawing and line wrapping removed, for phrase checks."""
    return " ".join(re.sub(r"[│╭╮╰╯─┌┐└┘]", " ", output).split())


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    sizes = [(48, 40), (40, 64), (32, 32), (90, 50)]
    for i, (w, h) in enumerate(sizes):
        _image(w, h, i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red circle number {i}\n")
    (folder / "img1.json").write_text(json.dumps({"aesthetic": 7.25, "original_width": 400, "original_height": 640}))
    _image(36, 36, 9).save(folder / "sub" / "no caption.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return folder


def test_image_folder_end_to_end(image_folder, model_dir, tmp_path):
    out = tmp_path / "tokens"
    res = _run(str(image_folder), "--out", str(out), "--model", str(model_dir), "--resolution", str(R),
               "--shard-size", "4", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    flat = _flat(res.output)
    assert "images/s" in flat and "bytes per sample" in flat and "broken" in flat

    shards = list_token_shards(out)
    assert [p.name for p in shards] == ["tokens-00000.tar", "tokens-00001.tar"]
    stats = [read_shard_stats(p) for p in shards]
    assert sum(s["count"] for s in stats) == 5 and sum(s["failed"] for s in stats) == 1
    failure = [f for s in stats for f in s["failures"]][0]
    assert failure["key"] == "broken" and "cannot be read as an image" in failure["error"]

    info = read_dataset_info(out)
    assert info["grid"] == [2, 2] and info["text_features"] == "full" and info["text_dim"] == 32
    assert info["pooled_dim"] == 32 and info["codebook_size"] == 64 and info["crop"] == "center"

    samples = {s.key: s for s in ShardStream.open(out, epochs=1)}
    assert set(samples) == {"img0", "img1", "img2", "img3", "sub_no_caption"}
    vq = VQTokenizer.from_pretrained(model_dir)
    te = TextEncoder.from_pretrained(model_dir).eval()
    for i, (w, h) in enumerate([(48, 40), (40, 64), (32, 32), (90, 50)]):
        s = samples[f"img{i}"]
        pixels, top, left = _reference_pixels(_image(w, h, i), R)
        assert s.codes.dtype == np.uint16 and s.codes.shape == (2, 2)
        assert np.array_equal(s.codes, vq.encode(pixels)[0].numpy().astype(np.uint16))
        orig = (400, 640) if i == 1 else (w, h)
        score = 7.25 if i == 1 else 6.0
        assert s.micro.tolist() == [orig[0], orig[1], top, left, score]
        assert s.caption == f"a red circle number {i}"
        with torch.no_grad():
            seq, pooled = te.encode([s.caption])
        assert s.text.dtype == np.float16 and s.text.shape == (77, 32)
        np.testing.assert_allclose(s.text.astype(np.float32), seq[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(s.pooled.astype(np.float32), pooled[0].numpy(), atol=2e-3, rtol=2e-3)
    assert samples["sub_no_caption"].caption == "" and samples["sub_no_caption"].meta["no_caption"] is True


def _img2dataset_tar(path: Path, start: int, n: int) -> None:
    """A shard laid out like img2dataset output: <key>.jpg/.txt/.json plus NNNNN_stats.json."""
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            buf = io.BytesIO()
            _image(64, 48, i).save(buf, format="JPEG", quality=90)
            meta = {"url": f"http://127.0.0.1/{i}.jpg", "key": key, "status": "success", "width": 64, "height": 48,
                    "original_width": 640, "original_height": 480, "caption": f"shape {i}", "aesthetic": 5.0 + i}
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"shape {i}".encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.with_name(path.stem + "_stats.json").write_text(json.dumps({"successes": n}))


@pytest.fixture
def wds_input(tmp_path) -> Path:
    shards = tmp_path / "shards"
    shards.mkdir()
    _img2dataset_tar(shards / "00000.tar", 0, 3)
    _img2dataset_tar(shards / "00001.tar", 10, 2)
    return shards


def test_webdataset_input_random_crop(wds_input, model_dir, tmp_path):
    cfg = TokenizeConfig(input=str(wds_input), out=str(tmp_path / "a"), model=str(model_dir), resolution=R,
                         random_crop=True, seed=5, batch_size=2, text_features="pooled")
    res = tokenize(cfg, show_progress=False)
    assert res.shards_written == 2 and res.images == 5 and res.failed == 0
    samples = list(ShardStream.open(tmp_path / "a", epochs=1))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000000010", "000000011"]
    references = []
    for s in samples:
        i = int(s.key)
        assert s.micro[[0, 1, 4]].tolist() == [640, 480, 5.0 + i]
        top, left = int(s.micro[2]), int(s.micro[3])
        # 64x48 -> 42x32: only a horizontal offset is possible.
        assert top == 0 and 0 <= left <= 10
        decoded = Image.open(io.BytesIO(_jpeg_of(wds_input, s.key))).convert("RGB")
        references.append(_reference_pixels(decoded, R, top, left)[0])
        assert s.text is None and s.pooled.shape == (32,)
        assert s.meta["url"].endswith(f"{i}.jpg")
    expected = VQTokenizer.from_pretrained(model_dir).encode(torch.cat(references)).numpy()
    assert np.array_equal(np.stack([s.codes for s in samples]), expected)
    assert len({int(s.micro[3]) for s in samples}) > 1  # the crops really are random
    # Same seed, same crops.
    again = tokenize(TokenizeConfig(input=str(wds_input), out=str(tmp_path / "b"), vq=str(model_dir), resolution=R,
                                    random_crop=True, seed=5, text_features="none"), show_progress=False)
    assert again.images == 5
    assert [s.micro.tolist() for s in ShardStream.open(tmp_path / "b", epochs=1)] == [s.micro.tolist() for s in samples]


def _jpeg_of(shards: Path, key: str) -> bytes:
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            if f"{key}.jpg" in tar.getnames():
                return tar.extractfile(f"{key}.jpg").read()
    raise KeyError(key)


def test_resume_skips_complete_and_redoes_partial(wds_input, model_dir, tmp_path):
    out = tmp_path / "tokens"
    args = [str(wds_input), "--out", str(out), "--model", str(model_dir), "--resolution", str(R), "--text-features", "none"]
    assert _run(*args).exit_code == 0
    first = out / "tokens-00000.tar"
    second = out / "tokens-00001.tar"
    stamp = first.stat().st_mtime_ns
    before = second.read_bytes()
    (out / "tokens-00001.stats.json").unlink()  # interrupted: the tar is there, its stats file is not
    second.write_bytes(before[:1024])  # and the tar is half-written
    (out / ".tokens-00001.tar.tmp-999").write_bytes(b"junk from a crashed writer")

    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert first.stat().st_mtime_ns == stamp  # complete shard untouched
    assert second.read_bytes() == before  # partial shard redone, byte-identical
    assert read_shard_stats(second)["count"] == 2
    assert not list(out.glob(".tokens-*"))
    assert "1 / 1" in _flat(res.output)  # written / skipped


def test_text_feature_modes_and_sizes(image_folder, model_dir, tmp_path):
    sizes = {}
    for mode in ("full", "pooled", "none"):
        extra = {"vq": str(model_dir / "vqvae")} if mode == "none" else {"model": str(model_dir)}
        res = tokenize(TokenizeConfig(input=str(image_folder), out=str(tmp_path / mode), resolution=R,
                                      text_features=mode, **extra), show_progress=False)
        sample = next(read_token_shard(list_token_shards(tmp_path / mode)[0]))
        assert (sample.text is not None) == (mode == "full")
        assert (sample.pooled is not None) == (mode != "none")
        info = read_dataset_info(tmp_path / mode)
        assert info["text_features"] == mode
        assert info["text_dim"] == (32 if mode == "full" else None)
        assert info["models"]["text_encoder"] == (None if mode == "none" else str(model_dir.resolve()))
        sizes[mode] = res.bytes_per_sample
        assert ("text" in res.feature_bytes) == (mode == "full")
    assert sizes["full"] > sizes["pooled"] > sizes["none"] > 0


def test_torchrun_ranks_split_shards(wds_input, model_dir, tmp_path):
    out = tmp_path / "tokens"
    kw = dict(input=str(wds_input), out=str(out), model=str(model_dir), resolution=R, text_features="none")
    r1 = tokenize(TokenizeConfig(**kw), rank=1, world_size=2, show_progress=False)
    assert r1.shards_written == 1 and [p.name for p in list_token_shards(out)] == ["tokens-00001.tar"]
    r0 = tokenize(TokenizeConfig(**kw), rank=0, world_size=2, show_progress=False)
    assert r0.shards_written == 1 and r0.images == 3
    assert len(list_token_shards(out)) == 2 and r0.dataset_samples == 5


def test_bad_input_errors(image_folder, model_dir, tmp_path):
    model = ["--model", str(model_dir)]
    res = _run(str(tmp_path / "missing"), "--out", str(tmp_path / "o1"), *model)
    assert res.exit_code == 1 and "does not exist" in _flat(res.output)
    (tmp_path / "empty").mkdir()
    res = _run(str(tmp_path / "empty"), "--out", str(tmp_path / "o2"), *model)
    assert res.exit_code == 1 and "no .tar shards and no images" in _flat(res.output)
    res = _run(str(image_folder), "--out", str(tmp_path / "o3"), *model, "--resolution", "40")
    assert res.exit_code == 1 and "not a multiple of the VQ's downsample factor 16" in _flat(res.output)
    assert not (tmp_path / "o3").exists()

    with pytest.raises(ConfigError, match="--text-features full needs --model or --text-encoder"):
        tokenize(TokenizeConfig(input=str(image_folder), out=str(tmp_path / "o4"), vq=str(model_dir)))
    with pytest.raises(ConfigError, match="--text-features must be one of"):
        tokenize(TokenizeConfig(input=str(image_folder), out=str(tmp_path / "o4"), model=str(model_dir),
                                text_features="all"))
    with pytest.raises(ModelFormatError, match="expected config.json"):
        tokenize(TokenizeConfig(input=str(image_folder), out=str(tmp_path / "o4"), model=str(tmp_path / "empty")),
                 show_progress=False)

    # An output directory that is not a token dataset, or one made with other settings, is left alone.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a token dataset"):
        tokenize(TokenizeConfig(input=str(image_folder), out=str(taken), model=str(model_dir), resolution=R),
                 show_progress=False)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    done = tmp_path / "done"
    tokenize(TokenizeConfig(input=str(image_folder), out=str(done), model=str(model_dir), resolution=R,
                            text_features="none"), show_progress=False)
    snapshot = {p.name: p.read_bytes() for p in done.iterdir()}
    with pytest.raises(ConfigError, match="other settings.*resolution 32 -> 64"):
        tokenize(TokenizeConfig(input=str(image_folder), out=str(done), model=str(model_dir), resolution=64,
                                text_features="none"), show_progress=False)
    assert {p.name: p.read_bytes() for p in done.iterdir()} == snapshot


def test_non_finite_text_features_are_a_failed_sample_not_a_written_one(image_folder, model_dir, tmp_path, monkeypatch):
    """A text encoder state beyond float16's range (infinity after the cast) is never written to a shard: the
    sample is listed as failed with the reason, so `train` never meets it."""
    import meissonic_cli.data.tokenize as tok

    real = tok._encode_batch

    def overflowing(*args, **kwargs):
        samples = real(*args, **kwargs)
        samples[0].pooled[0] = np.inf
        return samples

    monkeypatch.setattr(tok, "_encode_batch", overflowing)
    res = tokenize(TokenizeConfig(input=str(image_folder), out=str(tmp_path / "o"), model=str(model_dir), resolution=R,
                                  text_features="pooled", batch_size=64), show_progress=False)
    written = [s for shard in list_token_shards(tmp_path / "o") for s in read_token_shard(shard)]
    failures = [f for shard in list_token_shards(tmp_path / "o") for f in read_shard_stats(shard)["failures"]]
    overflowed = [f["key"] for f in failures if "non-finite pooled features (beyond float16's range)" in f["error"]]
    assert len(overflowed) == 1 and overflowed[0] not in {s.key for s in written}
    assert res.failed == len(failures) == 2 and len(written) == res.images == 4  # the folder's broken image + this one
