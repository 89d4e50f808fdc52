"""One way to turn any image file into the 8-bit RGB picture every stage works on.

`tokenize`, `edit` and `eval` read images through `load_rgb8` (or `to_rgb8` on an opened image),
so all three see the same pixels:

- orientation: the EXIF orientation tag is applied (the picture is shown upright, as a viewer shows
  it), then dropped;
- range: each PIL mode maps its real range onto 0..255. 16-bit integer modes (`I;16`, `I;16B`, ...)
  scale 0..65535; mode `I` (32-bit integers, how PIL opens some 16-bit files) scales 0..65535 when a
  value exceeds 255, else is already 8-bit; mode `F` (floats) scales 0..1 when every value lies there,
  else is clipped to 0..255 (NaN becomes 0). PIL's own `convert("RGB")` clips the integer modes at 255,
  which turns most 16-bit pictures white;
- alpha (`RGBA`, `LA`, `PA`, `P` with transparency, premultiplied `RGBa`/`La`) is dropped and the colour
  under it kept, as the official pipeline's `convert("RGB")` does; `1`, `L`, `P`, `CMYK`, `YCbCr`,
  `HSV` and `LAB` convert with PIL's own colour rules.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from meissonic_cli.errors import InputError

# Modes whose values do not fit 8 bits: converted by their real range before anything else.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_l(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        out = np.clip(values * scale, 0, 255)
    else:
        values = values.astype(np.float64)
        wide = image.mode != "I" or (values.size and values.max() > 255)
        out = np.clip(values, 0, 65535) * (255.0 / 65535.0) if wide else np.clip(values, 0, 255)
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")


def to_rgb8(image: Any) -> Any:
    """`image` (any PIL mode) as an 8-bit RGB PIL image, each mode by its real range (module doc)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in WIDE_MODES:
        return _wide_to_l(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when P with transparency goes to RGB directly
    if image.mode in ("RGBa", "La"):
        image = image.convert("RGBA")
    if image.mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB",
                                            "RGB")
        return ImageCms.applyTransform(image, transform)
    return image.convert("RGB")


def upright(image: Any) -> Any:
    """`image` turned as its EXIF orientation tag says (the one orientation rule of every stage)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image


def load_rgb8(source: "str | os.PathLike | bytes", what: str, size: Optional[tuple[int, int]] = None) -> Any:
    """The image file (or bytes) `source` upright and as 8-bit RGB, refusing bombs and unreadable files
    with one `InputError` naming `what`. With `size` = (W, H) it is first resized in its own mode with
    PIL's default filter (how the official pipeline loads edit inputs; wide modes are made 8-bit first)."""
    import io

    from PIL import Image, UnidentifiedImageError

    from meissonic_cli.safety import check_pixels, image_errors

    if not isinstance(source, bytes) and not os.path.isfile(source):
        raise InputError(f"{what} not found")
    with image_errors(what):
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                check_pixels(im, what)
                im.load()
                image = upright(im)
                if size is not None and image.size != tuple(size):
                    if image.mode in WIDE_MODES:
                        image = to_rgb8(image)
                    image = image.resize(tuple(size))
                return to_rgb8(image)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise InputError(f"{what} cannot be read as an image ({err})") from None


__all__ = ["WIDE_MODES", "load_rgb8", "to_rgb8", "upright"]
