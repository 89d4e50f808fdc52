"""Pixels -> objects for the shapes benchmark: palette labels, opened masks, components, template match.

Steps 1-4 of `meissonic_cli.shapes.bench`'s docstring: label pixels by nearest palette colour, open
each colour's mask so 1-2 px slivers vanish and regrow the survivors, take 4-connected components
over `MIN_AREA`, and name each component's shape by the template (circle, square, triangle made with
its own area and centroid) it overlaps best, or `IRREGULAR` under `MIN_TEMPLATE_IOU`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meissonic_cli.errors import InputError
from meissonic_cli.shapes import world as shapes

if TYPE_CHECKING:
    import numpy as np

# Smallest object the world draws is a count-scene triangle, 0.5 * 0.26**2 ~ 3.4% of the image;
# anything under 0.5% is speckle, not an object.
MIN_AREA = 0.005
# A clean render (crisp, resized or JPEG'd) overlaps its own template with IoU >= ~0.94; two touching
# objects merged into one component score ~0.6. Below this a component is no shape at all.
MIN_TEMPLATE_IOU = 0.7
IRREGULAR = "irregular"


@dataclass(frozen=True)
class DetectedObject:
    """One connected region of one palette colour; `cx, cy` are its centroid as fractions of the side."""

    colour: str
    shape: str
    cx: float
    cy: float
    area: int
    fill: float
    taper: float
    match: float = 1.0  # IoU with the template of `shape` (the best one; < MIN_TEMPLATE_IOU when irregular)

    @property
    def position(self) -> str:
        return shapes.position_of(self.cx, self.cy)

    def to_dict(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape, "position": self.position,
                "cx": round(self.cx, 4), "cy": round(self.cy, 4), "area": self.area,
                "fill": round(self.fill, 4), "taper": round(self.taper, 4), "match": round(self.match, 4)}


def _shift_reduce(mask: "np.ndarray", radius: int, op: Any, fill: bool) -> "np.ndarray":
    """Min (erode) or max (dilate) over a (2r+1)^2 square window, separably; outside counts as `fill`."""
    import numpy as np

    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], constant_values=fill)
        n = out.shape[axis]
        acc = padded.take(range(0, n), axis=axis)
        for k in range(1, 2 * radius + 1):
            acc = op(acc, padded.take(range(k, k + n), axis=axis))
        out = acc
    return out


def _open(mask: "np.ndarray", radius: int) -> "np.ndarray":
    """Morphological opening with a square: removes parts thinner than 2r+1 px, keeps squares exact."""
    import numpy as np

    if radius <= 0:
        return mask
    return _shift_reduce(_shift_reduce(mask, radius, np.logical_and, True), radius, np.logical_or, False)


def _regrow(comps: "np.ndarray", raw: "np.ndarray", steps: int) -> "np.ndarray":
    """Grow component labels back into the unopened mask for `steps` 4-neighbour steps.

    The opening that drops slivers also cuts a triangle's apex (2r+1 rows of it); regrowing
    restores it so fill ratio and taper are measured on the object as drawn. Where two
    components reach the same pixel the larger label wins, which only matters for touching objects.
    """
    import numpy as np

    comps = comps.copy()
    for _ in range(steps):
        grown = comps.copy()
        np.maximum(grown[1:, :], comps[:-1, :], out=grown[1:, :])
        np.maximum(grown[:-1, :], comps[1:, :], out=grown[:-1, :])
        np.maximum(grown[:, 1:], comps[:, :-1], out=grown[:, 1:])
        np.maximum(grown[:, :-1], comps[:, 1:], out=grown[:, :-1])
        fill = (comps == 0) & raw & (grown > 0)
        if not fill.any():
            break
        comps[fill] = grown[fill]
    return comps


def label_components(mask: "np.ndarray") -> tuple["np.ndarray", int]:
    """4-connected components of a boolean (H, W) mask: `(labels, n)`, labels int32 with 0 off the
    mask and 1..n numbered in raster order of each component's first pixel.

    Each pixel carries the flat index of a pixel in its component; repeatedly taking the minimum
    over its neighbours and then following the index (pointer jumping) converges to the
    component's first pixel in a few dozen vectorised steps. The same numbering as
    `scipy.ndimage.label`, without needing scipy.
    """
    import numpy as np

    h, w = mask.shape
    big = h * w
    ref = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        prev = ref
        best = ref.copy()
        np.minimum(best[1:, :], ref[:-1, :], out=best[1:, :])
        np.minimum(best[:-1, :], ref[1:, :], out=best[:-1, :])
        np.minimum(best[:, 1:], ref[:, :-1], out=best[:, 1:])
        np.minimum(best[:, :-1], ref[:, 1:], out=best[:, :-1])
        best = np.where(mask, best, big)
        flat = np.append(best.ravel(), big)
        for _ in range(4):  # follow pointers: each pixel jumps to what its representative points at
            flat[:-1] = flat[flat[:-1]]
        ref = flat[:-1].reshape(h, w)
        if np.array_equal(ref, prev):
            break
    roots = np.unique(ref[mask])
    labels = np.zeros((h, w), dtype=np.int32)
    labels[mask] = np.searchsorted(roots, ref[mask]) + 1
    return labels, int(roots.size)


def template_overlaps(component: "np.ndarray") -> dict[str, float]:
    """IoU of a component (bool (H, W), non-empty) with each shape of `shapes.SHAPES` drawn with the
    component's area and centroid: a circle, an axis-aligned square, and an apex-up triangle whose
    base equals its height (as `shapes.render` draws them), the triangle's centroid a third of its
    height above the base."""
    import numpy as np

    ys, xs = np.nonzero(component)
    area = float(ys.size)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    radius, side, base = math.sqrt(area / math.pi), math.sqrt(area), math.sqrt(2.0 * area)
    # A window holding the component and every template (none reaches further than 2/3 base from the centroid).
    reach = max(radius, side / 2, 2 * base / 3) + 2
    h, w = component.shape
    y0, y1 = max(0, min(int(ys.min()), int(cy - reach))), min(h, max(int(ys.max()) + 1, int(cy + reach) + 1))
    x0, x1 = max(0, min(int(xs.min()), int(cx - reach))), min(w, max(int(xs.max()) + 1, int(cx + reach) + 1))
    obj = component[y0:y1, x0:x1]
    py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - cy
    px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - cx
    apex = -2.0 * base / 3  # apex above the centroid (y grows downwards), base line at +base/3
    templates = {
        "circle": px * px + py * py <= radius * radius,
        "square": (np.abs(px) <= side / 2) & (np.abs(py) <= side / 2),
        "triangle": (py >= apex) & (py <= apex + base) & (np.abs(px) <= (py - apex) / 2),
    }
    out = {}
    for name in shapes.SHAPES:
        t = templates[name]
        union = int((t | obj).sum())
        out[name] = int((t & obj).sum()) / union if union else 0.0
    return out


def classify_shape(overlaps: dict[str, float]) -> tuple[str, float]:
    """(shape, IoU): the best-overlapping template of `template_overlaps`, or `IRREGULAR` when its
    IoU is under `MIN_TEMPLATE_IOU`."""
    best = max(shapes.SHAPES, key=lambda name: overlaps[name])
    return (best if overlaps[best] >= MIN_TEMPLATE_IOU else IRREGULAR), overlaps[best]


def _measure(component: "np.ndarray", colour: str) -> DetectedObject:
    import numpy as np

    h, w = component.shape
    ys, xs = np.nonzero(component)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    area = int(ys.size)
    rows = component[y0:y1 + 1, x0:x1 + 1].sum(axis=1).astype(float)
    third = max(1, bh // 3)
    top, bottom = float(rows[:third].mean()), float(rows[-third:].mean())
    taper = min(top, bottom) / max(top, bottom)
    shape, match = classify_shape(template_overlaps(component))
    return DetectedObject(colour=colour, shape=shape, cx=float((xs.mean() + 0.5) / w), cy=float((ys.mean() + 0.5) / h),
                          area=area, fill=area / float(bh * bw), taper=taper, match=match)


def _pixels(image: Any) -> "np.ndarray":
    import numpy as np

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise InputError(f"expected a uint8 (H, W, 3) array or a PIL image, got dtype {arr.dtype}")
    elif hasattr(image, "convert"):
        arr = np.asarray(image.convert("RGB"))
    else:
        raise InputError(f"expected a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")
    if arr.ndim != 3 or arr.shape[2] < 3 or min(arr.shape[:2]) < 8:
        raise InputError(f"expected an RGB image of at least 8x8 pixels, got an array of shape {arr.shape}")
    return arr[..., :3]


def detect_objects(image: Any, min_area: float = MIN_AREA) -> list[DetectedObject]:
    """The objects in `image` (PIL or uint8 (H, W, 3)), largest first.

    `min_area` is the smallest object as a fraction of the image area.
    """
    import numpy as np

    arr = _pixels(image)
    h, w = arr.shape[:2]
    labels = shapes.nearest_colour_labels(arr)
    radius = max(1, round(min(h, w) / 64))
    smallest = max(1, math.ceil(min_area * h * w))
    found: list[DetectedObject] = []
    for index in np.unique(labels):
        if index == 0:
            continue
        raw = labels == index
        mask = _open(raw, radius)
        if mask.sum() < smallest:
            continue
        comps, n = label_components(mask)
        sizes = np.bincount(comps.ravel(), minlength=n + 1)
        comps = _regrow(comps, raw, 2 * radius + 1)
        for k in range(1, n + 1):
            if sizes[k] >= smallest:
                found.append(_measure(comps == k, shapes.COLOURS[index - 1]))
    found.sort(key=lambda o: (-o.area, shapes.COLOURS.index(o.colour), o.cy, o.cx))
    return found


__all__ = ["DetectedObject", "IRREGULAR", "MIN_AREA", "MIN_TEMPLATE_IOU", "classify_shape", "detect_objects",
           "label_components", "template_overlaps"]
