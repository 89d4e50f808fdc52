"""Images, masks and token grids for `meissonic edit` (see `meissonic_cli.sample.edit`): loading and
resizing as the official inpaint.py does, the official mask -> token rule, the `--box` rule, the
official img2img masking probability, outpaint layout and the feathered paste-back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from meissonic_cli.errors import InputError
from meissonic_cli.imaging import load_rgb8
from meissonic_cli.safety import image_errors

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


def load_image(path: Path, what: str = "image") -> "Image.Image":
    """An RGB PIL image (upright, 8-bit by its real range: `meissonic_cli.imaging`), or InputError naming the file."""
    if not Path(path).is_file():
        raise InputError(f"{what} not found: {path}")
    return load_rgb8(path, f"{what} {path}")


def open_resized(path: Path, size: tuple[int, int], what: str = "image") -> "Image.Image":
    """An image file as the official inpaint.py loads it at working size `size` = (W, H): resized in
    its own mode with PIL's default filter (NEAREST for modes 1 and P, BICUBIC otherwise, on
    premultiplied alpha), unless it already has that size, then converted to RGB (alpha dropped).
    Like every image read, it is first turned upright and wide modes are made 8-bit by their range."""
    if not Path(path).is_file():
        raise InputError(f"{what} not found: {path}")
    return load_rgb8(path, f"{what} {path}", size=tuple(size))


def load_mask(path: Path, size: tuple[int, int]) -> "Image.Image":
    """The inpainting mask at working size `size` (RGB; white = repaint), loaded as inpaint.py does."""
    return open_resized(path, size, "mask")


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with image_errors(f"{what} {path}"), Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{what} {path} cannot be read as an image ({err})") from None


def mask_levels(mask: "Image.Image", grid_hw: tuple[int, int]) -> "np.ndarray":
    """(h, w) uint8: the mask resized straight to the token grid with LANCZOS, then to grey (ITU-R 601),
    as the official pipeline's mask processor does (it floors the grid side to a multiple of 16 first,
    which crashes the official pipeline at e.g. 384 or 640 px; any grid works here)."""
    import numpy as np
    from PIL import Image

    h, w = grid_hw
    return np.asarray(mask.resize((int(w), int(h)), Image.LANCZOS).convert("L"))


def mask_token_grid(mask: "Image.Image", grid_hw: tuple[int, int], dilate: int = 0) -> "torch.Tensor":
    """(h, w) bool, True = repaint: the official rule, a token is repainted when its `mask_levels`
    value is >= 128 (L / 255 >= 0.5), then grown by `dilate` tokens."""
    import torch

    return dilate_tokens(torch.from_numpy(mask_levels(mask, grid_hw) >= 128), dilate)


def dilate_tokens(cells: "torch.Tensor", dilate: int) -> "torch.Tensor":
    """A bool token grid grown by `dilate` tokens on every side (a (2N+1)^2 square, clipped at the border)."""
    import torch.nn.functional as F

    if dilate <= 0:
        return cells
    dilate = min(int(dilate), max(cells.shape))  # a wider square covers the same tokens
    grown = F.max_pool2d(cells[None, None].float(), kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return grown[0, 0] > 0


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step the official img2img rule runs: steps - int(steps x strength)
    (Python float arithmetic, truncating); `steps` when no step runs."""
    return int(steps) - int(int(steps) * float(strength))


def img2img_mask_ratio(schedule: str, steps: int, start: int) -> "torch.Tensor":
    """Probability (float32 scalar) with which the official img2img rule masks each token when
    decoding starts at step `start`: the schedule's masked fraction after step start-1, i.e.
    cos(pi/2 x start/n) (cosine) or 1 - start/n (linear), in float32 as the official code computes
    it. At start 0 this is 1 (every token masked): the official code wraps to the t = 0 end there
    and masks none."""
    import math

    import torch

    ratio = (torch.tensor([[int(start) - 1]]) + 1) / int(steps)
    value = torch.cos(ratio * math.pi / 2) if schedule == "cosine" else 1 - ratio
    return value[0, 0]


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> "np.ndarray":
    """A boolean (H, W) mask of the pixel box x0,y0,x1,y1 (end-exclusive), which must lie inside the image."""
    import numpy as np

    x0, y0, x1, y1 = box
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InputError(f"--box {x0},{y0},{x1},{y1} is not a non-empty box inside the {w}x{h} image "
                         f"(need 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h})")
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def token_mask(pixels: "np.ndarray", factor: int, dilate: int = 0) -> "torch.Tensor":
    """(H/f, W/f) bool: a token is masked when any pixel of its f x f cell is (the `--box` rule), then
    dilated by `dilate` tokens."""
    import torch

    h, w = pixels.shape
    if h % factor or w % factor:
        raise InputError(f"mask size {w}x{h} is not a multiple of the VQ factor {factor}")
    cells = torch.from_numpy(pixels.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3)))
    return dilate_tokens(cells, dilate)


def round_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """Each side rounded to the nearest positive multiple of `multiple`."""
    return (max(multiple, int(round(width / multiple)) * multiple), max(multiple, int(round(height / multiple)) * multiple))


def outpaint_layout(size: tuple[int, int], factor: int, even_grid: bool,
                    extend: Optional[Sequence[int]] = None, target: Optional[tuple[int, int]] = None
                    ) -> tuple[int, int, int, int]:
    """(canvas width, canvas height, left, top) in pixels, all multiples of `factor`.

    Each extension is rounded to the nearest multiple of the factor; with `even_grid` (the 2x2
    compression) a side with an odd token count gets one more token on its larger extension.
    """
    w, h = size
    if target is not None:
        tw, th = target
        if tw < w or th < h:
            raise InputError(f"--target {tw}x{th} is smaller than the image ({w}x{h}); outpainting only adds area")
        extend = ((tw - w) // 2, (th - h) // 2, tw - w - (tw - w) // 2, th - h - (th - h) // 2)
    assert extend is not None
    left, top, right, bottom = (int(round(e / factor)) for e in extend)
    gw, gh = w // factor, h // factor
    if even_grid:
        if (gw + left + right) % 2:
            if right >= left:
                right += 1
            else:
                left += 1
        if (gh + top + bottom) % 2:
            if bottom >= top:
                bottom += 1
            else:
                top += 1
    if left + right + top + bottom == 0:
        raise InputError(f"--extend/--target adds nothing once rounded to the {factor}-pixel token grid; extend by at "
                         f"least {factor // 2 + 1} pixels on some side")
    return (gw + left + right) * factor, (gh + top + bottom) * factor, left * factor, top * factor


def check_working_size(case: Any, pipe: Any = None) -> tuple[int, int]:
    """The size `case` is edited at: --resolution, else its image's own size (read from the file's header,
    nothing decoded) rounded to `pipe`'s pixel multiple as `edit_image` rounds it. Refused (InputError saying
    what to do) when it, or the outpaint canvas built on it from --extend/--target, has a side over
    `MAX_RESOLUTION` or more pixels than the image limit: `safety.check_resolution`, the check of
    `sample --resolution`. Without `pipe` (before the model loads) the sizes are taken unrounded; the
    one check of every edit path (the command, --cases rows, the app, `edit_image`)."""
    from meissonic_cli.safety import MAX_RESOLUTION, check_resolution

    source = image_size(case.image)
    work = case.resolution or round_size(*source, int(pipe.pixel_multiple) if pipe is not None else 1)
    way_out = f"pass --resolution WxH (each side at most {MAX_RESOLUTION}) to edit a smaller copy"
    try:
        check_resolution(*work, f"image {case.image.name}" if case.resolution is None else "--resolution")
    except InputError as err:
        raise InputError(f"{err}; {way_out}" if case.resolution is None else str(err)) from None
    if case.mode != "outpaint" or (case.extend is None and case.target is None):
        return work
    if pipe is not None:
        f = int(pipe.vq.downsample_factor)
        canvas = outpaint_layout(work, f, bool(pipe.transformer.config.downsample), case.extend, case.target)[:2]
    else:
        canvas = case.target or (work[0] + case.extend[0] + case.extend[2], work[1] + case.extend[1] + case.extend[3])
    try:
        check_resolution(*canvas, f"the outpaint canvas ({work[0]}x{work[1]} image plus --extend/--target)")
    except InputError as err:
        raise InputError(f"{err}; extend by less, or {way_out}") from None
    return work


def feather_blend(decoded: "Image.Image", original: "Image.Image", keep: "np.ndarray", feather: int) -> "Image.Image":
    """Original pixels where `keep` (H, W) is True, decoded elsewhere, mixed over a `feather`-pixel seam."""
    import numpy as np
    from PIL import Image, ImageFilter

    alpha = Image.fromarray((keep * 255).astype(np.uint8), mode="L")
    if feather > 0:
        # Blur, then re-apply the hard inside so the kept interior stays exactly the original.
        blurred = np.asarray(alpha.filter(ImageFilter.GaussianBlur(feather / 2)), dtype=np.float32) / 255.0
        weight = np.minimum(blurred, keep.astype(np.float32))
    else:
        weight = keep.astype(np.float32)
    a = np.asarray(original, dtype=np.float32)
    b = np.asarray(decoded, dtype=np.float32)
    out = weight[..., None] * a + (1 - weight[..., None]) * b
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))


__all__ = ["box_mask", "check_working_size", "dilate_tokens", "feather_blend", "image_size", "img2img_mask_ratio", "img2img_start",
           "load_image", "load_mask", "mask_levels", "mask_token_grid", "open_resized", "outpaint_layout", "round_size",
           "token_mask"]
