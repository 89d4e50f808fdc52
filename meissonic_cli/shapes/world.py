"""The shapes world: simple compositional scenes with captions that describe them exactly.

A scene is a few flat-coloured shapes (circle, square, triangle) from a small palette of
well-separated saturated colours on a plain light-grey background. Scenes are easy enough that a
tiny model trained for minutes on CPU at 64 or 128 px can learn colour, shape, position and count,
and exact enough that a pixel scorer can check a generated image without any learned model:

- every colour in `PALETTE` is far from every other and from `BACKGROUND`, so a pixel is labelled
  by its nearest palette colour (`nearest_colour_labels`), which survives JPEG and resizing;
- the three shapes are far apart geometrically: they fill different parts of their bounding box
  (`FILL_RATIO`: circle ~0.785, square 1.0, triangle 0.5), and each overlaps the others' outlines
  of the same area and centre poorly, which is what the scorer compares (`shapes_bench.template_overlaps`);
- a position name is a function of the object's centroid (`position_of`), the same function that
  placed it, so "on the left" means the same thing to the generator, the captions and the scorer;
- rendering is crisp (no anti-aliasing) and deterministic given the scene.

Used by `synthetic.py` (the LAION-style source), the demo and `shapes_bench.py` (the weight-free
compositional benchmark, whose prompt set is `benchmark_prompts()`).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # PIL and numpy are imported where used, keeping `import meissonic_cli.shapes.world` cheap
    import numpy as np
    from PIL import Image

# Saturated, pairwise more than 100 apart in RGB and far from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 20),
    "purple": (140, 40, 190),
    "orange": (245, 120, 0),
}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
COLOURS: tuple[str, ...] = tuple(PALETTE)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Area of the shape over the area of its bounding box: what tells the shapes apart in pixels.
FILL_RATIO: dict[str, float] = {"circle": 0.785, "square": 1.0, "triangle": 0.5}

# Normalised (x, y) centre of each named position; y grows downwards as in image coordinates.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# A centroid closer than this to the image centre (in both axes) is "center".
CENTER_RADIUS = 0.125
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
MAX_COUNT = 3

SINGLE_SIZE = 0.4  # side of one object's bounding box, as a fraction of the image side
PAIR_SIZE = 0.36
COUNT_SIZE = 0.26

# Scene kinds: what the caption says.
#   object:   one shape, caption names colour and shape only ("a red circle")
#   position: one shape, caption also names where ("a red circle on the left")
#   count:    2-3 identical shapes ("two blue squares")
#   pair:     two different shapes on opposite sides ("a red circle on the left and a blue square on the right")
KINDS: tuple[str, ...] = ("object", "position", "count", "pair")


@dataclass(frozen=True)
class ShapeObject:
    """One flat shape. `cx, cy, size` are fractions of the image side; `size` is the bounding-box side."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def position(self) -> str:
        """The named position of this object's centre (see `position_of`)."""
        return position_of(self.cx, self.cy)

    def bbox(self, side: int) -> tuple[int, int, int, int]:
        """Pixel bounding box (x0, y0, x1, y1), inclusive, in an image `side` pixels wide."""
        half = self.size * side / 2
        x, y = self.cx * side, self.cy * side
        return (round(x - half), round(y - half), round(x + half) - 1, round(y + half) - 1)


@dataclass(frozen=True)
class Expect:
    """What a caption promises about one group of identical objects; `position` None means unspecified."""

    colour: str
    shape: str
    position: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Scene:
    """A scene of a given `kind` (see `KINDS`); `caption()` describes it exactly."""

    kind: str
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int] = BACKGROUND

    def expects(self) -> tuple[Expect, ...]:
        """The attributes the caption states, one `Expect` per object group."""
        first = self.objects[0]
        if self.kind == "object":
            return (Expect(first.colour, first.shape),)
        if self.kind == "position":
            return (Expect(first.colour, first.shape, first.position),)
        if self.kind == "count":
            return (Expect(first.colour, first.shape, None, len(self.objects)),)
        if self.kind == "pair":
            return tuple(Expect(o.colour, o.shape, o.position) for o in self.objects)
        raise ValueError(f"unknown scene kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def caption(self) -> str:
        """A natural caption: "a red circle on the left", "two blue squares", ..."""
        return " and ".join(describe(e) for e in self.expects())

    def render(self, size: int = 64) -> "Image.Image":
        """The scene as an RGB image of `size` x `size` pixels."""
        return render(self, size)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "objects": [dataclasses.asdict(o) for o in self.objects],
                "background": list(self.background)}

    @staticmethod
    def from_dict(data: dict) -> "Scene":
        return Scene(kind=data["kind"], objects=tuple(ShapeObject(**o) for o in data["objects"]),
                     background=tuple(data.get("background", BACKGROUND)))


def describe(e: Expect) -> str:
    """Caption fragment for one object group: "a red circle", "two red circles on the left"."""
    if e.count == 1:
        article = "an" if e.colour[0] in "aeiou" else "a"
        text = f"{article} {e.colour} {e.shape}"
    else:
        text = f"{COUNT_WORDS[e.count]} {e.colour} {e.shape}s"
    if e.position is not None:
        text += " " + POSITION_PHRASE[e.position]
    return text


def position_of(cx: float, cy: float) -> str:
    """Name the position of a normalised point: "center" near the middle, else the dominant side.

    Objects are placed by their bounding-box centre; a scorer may pass either that centre or the
    pixel centroid (a triangle's centroid sits size/6 below its box centre, which never changes the
    name for the sizes and jitter used here).
    """
    dx, dy = cx - 0.5, cy - 0.5
    if abs(dx) < CENTER_RADIUS and abs(dy) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _count_slots(count: int, vertical: bool) -> list[tuple[float, float]]:
    # Evenly spaced along the middle line, far enough apart that objects never touch.
    coords = {1: [0.5], 2: [0.27, 0.73], 3: [0.18, 0.5, 0.82]}[count]
    return [(0.5, c) if vertical else (c, 0.5) for c in coords]


def make_scene(kind: str, specs: Sequence[Expect], *, jitter: float = 0.0,
               rng: random.Random | None = None) -> Scene:
    """Build the canonical scene for `specs` (positions at their named centres, plus optional jitter).

    `object`/`position` take one spec; `count` one spec with count 2..3; `pair` two specs with
    opposite positions (left/right or top/bottom).
    """
    rng = rng or random.Random(0)

    def j(v: float, size: float) -> float:
        # Jittered, then clamped so the whole object (plus a 2% margin) stays inside the image.
        v += rng.uniform(-jitter, jitter) if jitter else 0.0
        return min(max(v, size / 2 + 0.02), 1 - size / 2 - 0.02)

    if kind in ("object", "position"):
        (e,) = specs
        cx, cy = POSITIONS[e.position or "center"]
        size = SINGLE_SIZE * (1 + (rng.uniform(-0.15, 0.15) if jitter else 0.0))
        return Scene(kind, (ShapeObject(e.colour, e.shape, j(cx, size), j(cy, size), size),))
    if kind == "count":
        (e,) = specs
        vertical = rng.random() < 0.5 if jitter else False
        objs = tuple(ShapeObject(e.colour, e.shape, j(x, COUNT_SIZE), j(y, COUNT_SIZE), COUNT_SIZE)
                     for x, y in _count_slots(e.count, vertical))
        return Scene(kind, objs)
    if kind == "pair":
        objs = []
        for e in specs:
            cx, cy = POSITIONS[e.position]
            objs.append(ShapeObject(e.colour, e.shape, j(cx, PAIR_SIZE), j(cy, PAIR_SIZE), PAIR_SIZE))
        return Scene(kind, tuple(objs))
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {', '.join(KINDS)}")


def sample_scene(rng: random.Random, kinds: Iterable[str] = KINDS, *, jitter: float = 0.03,
                 colours: Sequence[str] = COLOURS, shapes: Sequence[str] = SHAPES) -> Scene:
    """A random scene of one of `kinds`; deterministic given the state of `rng`.

    `jitter` moves centres by up to that fraction of the side (kept small so the named position
    never changes) and varies single-object sizes by +-15%, for some variety in training data.
    """
    kinds = list(kinds)
    kind = rng.choice(kinds)
    colour, shape = rng.choice(list(colours)), rng.choice(list(shapes))
    if kind == "object":
        pos = rng.choice(list(POSITIONS))
        scene = make_scene("position", [Expect(colour, shape, pos)], jitter=jitter, rng=rng)
        return dataclasses.replace(scene, kind="object")
    if kind == "position":
        return make_scene(kind, [Expect(colour, shape, rng.choice(list(POSITIONS)))], jitter=jitter, rng=rng)
    if kind == "count":
        return make_scene(kind, [Expect(colour, shape, None, rng.randint(2, MAX_COUNT))], jitter=jitter, rng=rng)
    if kind == "pair":
        first = rng.choice(list(OPPOSITE))
        colour2 = rng.choice([c for c in colours if c != colour])
        shape2 = rng.choice(list(shapes))
        return make_scene(kind, [Expect(colour, shape, first), Expect(colour2, shape2, OPPOSITE[first])],
                          jitter=jitter, rng=rng)
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {', '.join(KINDS)}")


def render(scene: Scene, size: int = 64) -> "Image.Image":
    """Draw `scene` crisply (no anti-aliasing) on a `size` x `size` RGB canvas."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox(size)
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            # Apex up, base on the bottom edge of the box: fills half of it.
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {', '.join(SHAPES)}")
    return img


def nearest_colour_labels(pixels: "np.ndarray") -> "np.ndarray":
    """Label each pixel of an (H, W, 3) uint8 array by its nearest colour.

    Returns an (H, W) int array: 0 for the background, i + 1 for `COLOURS[i]`.
    """
    import numpy as np

    refs = np.array([BACKGROUND] + [PALETTE[c] for c in COLOURS], dtype=np.int32)
    diff = pixels[..., None, :3].astype(np.int32) - refs[None, None]
    return np.argmin((diff * diff).sum(-1), axis=-1)


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt of the shapes benchmark: its text, category, expectations and a reference scene."""

    text: str
    category: str  # one of KINDS
    expects: tuple[Expect, ...]
    scene: Scene  # a scene that satisfies the prompt exactly (scores 1 by construction)

    @property
    def colour(self) -> str:
        return self.expects[0].colour

    @property
    def shape(self) -> str:
        return self.expects[0].shape

    @property
    def position(self) -> str | None:
        return self.expects[0].position

    @property
    def count(self) -> int:
        return self.expects[0].count


def benchmark_prompts(categories: Iterable[str] = KINDS) -> list[BenchmarkPrompt]:
    """The fixed, ordered prompt set of the shapes benchmark (78 prompts over all four categories).

    object:   every colour x shape (18);
    position: every position x colour, shapes cycling (30);
    count:    counts 2 and 3 x every colour, shapes cycling (12);
    pair:     first object on the left, top or right x every colour, with a different second colour on
              the opposite side, shapes cycling (18).
    """
    wanted = set(categories)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; expected some of {', '.join(KINDS)}")
    out: list[BenchmarkPrompt] = []

    def add(kind: str, specs: list[Expect]) -> None:
        scene = make_scene(kind, specs)
        out.append(BenchmarkPrompt(scene.caption(), kind, scene.expects(), scene))

    if "object" in wanted:
        for colour in COLOURS:
            for shape in SHAPES:
                add("object", [Expect(colour, shape)])
    if "position" in wanted:
        i = 0
        for pos in POSITIONS:
            for colour in COLOURS:
                add("position", [Expect(colour, SHAPES[i % len(SHAPES)], pos)])
                i += 1
    if "count" in wanted:
        i = 0
        for count in range(2, MAX_COUNT + 1):
            for colour in COLOURS:
                add("count", [Expect(colour, SHAPES[i % len(SHAPES)], None, count)])
                i += 1
    if "pair" in wanted:
        i = 0
        for first in ("left", "top", "right"):
            for k, colour in enumerate(COLOURS):
                other = COLOURS[(k + 1 + i % 2) % len(COLOURS)]
                add("pair", [Expect(colour, SHAPES[i % len(SHAPES)], first),
                             Expect(other, SHAPES[(i + 1) % len(SHAPES)], OPPOSITE[first])])
                i += 1
    return out
