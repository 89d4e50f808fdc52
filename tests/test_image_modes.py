"""Every PIL mode becomes 8-bit RGB by its real range, with one EXIF orientation rule (issue 20, class 5).

Each mode is checked against a reference conversion computed here with numpy; then tokenize, edit and
eval are checked to read a 16-bit file and an EXIF-rotated file as the same pixels as their plain 8-bit
upright equivalents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RNG = np.random.default_rng(0)
H, W = 6, 10


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def _case(mode: str) -> tuple[Image.Image, np.ndarray]:
    """(an image in `mode`, the 8-bit RGB array it stands for), the reference worked out by hand."""
    if mode in ("I;16", "I;16B", "I;16L"):
        v = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
        im = Image.frombytes(mode, (W, H), v.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        return im, _gray3(np.rint(v.astype(np.float64) * 255 / 65535))
    if mode == "I":
        v = RNG.integers(0, 65536, (H, W)).astype(np.int32)
        return Image.fromarray(v), _gray3(np.rint(v * 255 / 65535))
    if mode == "I-8bit":  # mode I holding 8-bit values (how some 8-bit files open): already 0..255
        v = RNG.integers(0, 256, (H, W)).astype(np.int32)
        return Image.fromarray(v), _gray3(v)
    if mode == "F":
        v = RNG.random((H, W)).astype(np.float32)
        return Image.fromarray(v), _gray3(np.rint(v.astype(np.float64) * 255))
    if mode == "F-255":
        v = (RNG.random((H, W)) * 300 - 20).astype(np.float32)
        return Image.fromarray(v), _gray3(np.rint(np.clip(v.astype(np.float64), 0, 255)))
    if mode == "L":
        v = RNG.integers(0, 256, (H, W)).astype(np.uint8)
        return Image.fromarray(v), _gray3(v)
    if mode == "1":
        v = RNG.integers(0, 2, (H, W)).astype(bool)
        return Image.fromarray(v).convert("1"), _gray3(v * 255)
    if mode == "LA":
        v = RNG.integers(0, 256, (H, W, 2)).astype(np.uint8)
        return Image.fromarray(v, mode="LA"), _gray3(v[..., 0])
    if mode == "RGBA":
        v = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
        return Image.fromarray(v), v[..., :3]
    if mode in ("P", "P-transparency"):
        palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
        idx = RNG.integers(0, 256, (H, W)).astype(np.uint8)
        im = Image.fromarray(idx).convert("P")
        im.putpalette(palette.tobytes())
        if mode == "P-transparency":
            im.info["transparency"] = int(idx[0, 0])
        return im, palette[idx]
    if mode == "CMYK":
        v = RNG.integers(0, 256, (H, W, 4)).astype(np.int32)
        # PIL's CMYK -> RGB rule: each channel is (255 - colour) x (255 - black) / 255
        ref = np.rint((255 - v[..., :3]) * (255 - v[..., 3:4]) / 255)
        return Image.fromarray(v.astype(np.uint8), mode="CMYK"), ref.astype(np.uint8)
    if mode == "RGB":
        v = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
        return Image.fromarray(v), v
    raise AssertionError(mode)


MODES = ["I;16", "I;16B", "I;16L", "I", "I-8bit", "F", "F-255", "L", "1", "LA", "RGBA", "P", "P-transparency", "CMYK",
         "RGB"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_maps_its_real_range_to_8_bit_rgb(mode: str) -> None:
    from meissonic_cli.imaging import to_rgb8

    image, reference = _case(mode)
    out = to_rgb8(image)
    assert out.mode == "RGB" and out.size == (W, H)
    got = np.asarray(out).astype(int)
    assert np.abs(got - reference.astype(int)).max() <= (1 if mode == "CMYK" else 0), mode


def _save(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


def _sixteen_bit_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A 16-bit grey PNG and the 8-bit PNG it stands for (a smooth ramp, mid-grey on average)."""
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    wide = _save(Image.fromarray(ramp), tmp_path / "wide.png")
    eight = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    narrow = _save(Image.fromarray(np.repeat(eight[..., None], 3, axis=2)), tmp_path / "narrow.png")
    with Image.open(wide) as im:
        assert im.mode in ("I;16", "I"), im.mode  # the file really is 16-bit
    return wide, narrow


def _rotated_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A PNG tagged 'rotate 90 CW to view' and the upright PNG a viewer shows."""
    v = RNG.integers(0, 256, (40, 64, 3)).astype(np.uint8)
    stored = Image.fromarray(v)
    exif = stored.getexif()
    exif[0x0112] = 6
    tagged = _save(stored, tmp_path / "tagged.png", exif=exif.tobytes())
    upright = _save(stored.transpose(Image.Transpose.ROTATE_270), tmp_path / "upright.png")
    return tagged, upright


PAIRS = {"16-bit": _sixteen_bit_pair, "exif": _rotated_pair}


@pytest.mark.parametrize("pair", PAIRS)
def test_shared_loader_reads_pairs_alike(pair: str, tmp_path: Path) -> None:
    from meissonic_cli.imaging import load_rgb8

    a, b = PAIRS[pair](tmp_path)
    assert np.array_equal(np.asarray(load_rgb8(a, "a")), np.asarray(load_rgb8(b, "b")))
    assert np.array_equal(np.asarray(load_rgb8(a.read_bytes(), "a")), np.asarray(load_rgb8(b, "b")))


@pytest.mark.parametrize("pair", PAIRS)
def test_tokenize_reads_pairs_alike(pair: str, tmp_path: Path) -> None:
    from meissonic_cli.data.sources import RawSample
    from meissonic_cli.data.tokenize import TokenizeConfig, prepare_image

    a, b = PAIRS[pair](tmp_path)
    cfg = TokenizeConfig(input=str(tmp_path), out=str(tmp_path / "o"), model="x", resolution=32)
    pa = prepare_image(RawSample("a", a.read_bytes(), "x", {}), cfg)
    pb = prepare_image(RawSample("b", b.read_bytes(), "x", {}), cfg)
    assert np.array_equal(np.asarray(pa.pixels), np.asarray(pb.pixels))
    assert np.array_equal(pa.micro, pb.micro)


@pytest.mark.parametrize("pair", PAIRS)
def test_edit_reads_pairs_alike(pair: str, tmp_path: Path) -> None:
    from meissonic_cli.sample.edit_masks import load_image, open_resized

    a, b = PAIRS[pair](tmp_path)
    assert np.array_equal(np.asarray(load_image(a)), np.asarray(load_image(b)))
    assert np.array_equal(np.asarray(open_resized(a, (32, 48))), np.asarray(open_resized(b, (32, 48))))


@pytest.mark.parametrize("pair", PAIRS)
def test_eval_reads_pairs_alike(pair: str, tmp_path: Path) -> None:
    from meissonic_cli.metrics.report import open_rgb

    a, b = PAIRS[pair](tmp_path)
    assert np.array_equal(np.asarray(open_rgb(a)), np.asarray(open_rgb(b)))


def test_sixteen_bit_is_not_clipped_to_white(tmp_path: Path) -> None:
    from meissonic_cli.imaging import load_rgb8

    wide, _ = _sixteen_bit_pair(tmp_path)
    mean = np.asarray(load_rgb8(wide, "wide")).mean()
    assert 100 < mean < 155, mean
