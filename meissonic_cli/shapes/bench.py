"""The shapes benchmark: a weight-free compositional score in the spirit of GenEval (paper Table 3).

GenEval asks an object detector whether a generated image shows the colours, objects, counts and
positions its prompt names. In the shapes world (`shapes.py`) the same questions have exact
pixel answers, so the scorer needs no model:

1. label every pixel by its nearest palette colour (`shapes.nearest_colour_labels`; background 0);
2. per colour, open the mask (erode then dilate, radius ~ side/64) so that 1-2 px slivers vanish:
   the blended rim a JPEG, a resize or a VQ decoder leaves around an object is often nearest to a
   *different* palette colour (a red-grey blend is nearest to orange); surviving components are
   then regrown into the unopened mask, giving back the triangle apex the opening cut;
3. connected components (4-connected); those below `MIN_AREA` of the image are noise;
4. each component is compared with the three shapes the world draws, each made with the
   component's own area and centroid (a circle, an axis-aligned square, an apex-up triangle as
   wide as it is tall): its shape is the template it overlaps best (IoU), or "irregular" when even
   the best overlap is under `MIN_TEMPLATE_IOU` (merged objects, splotches). Area and centroid
   barely move when a few edge pixels do, so a square whose edges wobble by a pixel or two stays a
   square; a rule on the bounding box (fill ratio) does not, since one stray pixel row moves the box.
   Its position comes from its centroid through `shapes.position_of`. Fill ratio (area / bounding
   box) and taper (mean row width of the narrower third over the wider third) are reported too.

Attributes are judged separately so a wrong colour does not hide a right shape:
- `color`: every prompted colour has an object, and the prompted colours are the dominant ones
  (largest total area; for a pair, the two largest);
- `shape`: the prompted colour's largest object (all of its objects for a count prompt) has the
  prompted shape; when the colour is missing, the dominant other colour's objects stand in;
- `position`: the centroid of that object names the prompted position;
- `count`: the number of objects of the prompted colour equals the prompted count;
- `overall`: every attribute the prompt tests is right (`TESTED` lists them per category).

`score_image` scores one image, `score_folder` a folder of `NAME.png` + `NAME.json` sidecars
(written by the sampler, with at least `"prompt"`), `summarize` turns rows into accuracies,
`write_report`/`print_report` write the JSON and show the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from meissonic_cli.atomic import write_text
from meissonic_cli.errors import InputError
from meissonic_cli.progress import make_progress
from meissonic_cli.safety import check_pixels, image_errors
from meissonic_cli.shapes import world as shapes
from meissonic_cli.shapes.detect import (  # noqa: F401  (re-exported: the benchmark's public names)
    IRREGULAR,
    MIN_AREA,
    MIN_TEMPLATE_IOU,
    DetectedObject,
    classify_shape,
    detect_objects,
    label_components,
    template_overlaps,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "count")
# Which attributes each prompt category states, hence tests.
TESTED: dict[str, tuple[str, ...]] = {
    "object": ("color", "shape"),
    "position": ("color", "shape", "position"),
    "count": ("color", "shape", "count"),
    "pair": ("color", "shape", "position"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REPORT_NAME = "shapes_bench.json"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt states: its text, category (one of `shapes.KINDS`) and one `Expect` per object group."""

    text: str
    category: str
    expects: tuple[shapes.Expect, ...]

    @property
    def tested(self) -> tuple[str, ...]:
        return TESTED[self.category]


# ----- prompts

_COUNT_OF = {"a": 1, "an": 1, "one": 1, **{word: n for n, word in shapes.COUNT_WORDS.items()}}
_PHRASE_TO_POSITION = {phrase: name for name, phrase in shapes.POSITION_PHRASE.items()}
_FRAGMENT = re.compile(
    r"^(?P<count>{})\s+(?P<colour>{})\s+(?P<shape>{})s?(?:\s+(?P<where>{}))?$".format(
        "|".join(_COUNT_OF), "|".join(shapes.COLOURS), "|".join(shapes.SHAPES),
        "|".join(re.escape(p) for p in _PHRASE_TO_POSITION)))


def parse_prompt(text: str) -> PromptSpec | None:
    """Read a shapes-world caption ("two red circles", "a red circle on the left and ...") back into
    its expectations; None when the text is not one."""
    fragments = [f.strip() for f in text.strip().lower().rstrip(".").split(" and ")]
    expects = []
    for fragment in fragments:
        m = _FRAGMENT.match(fragment)
        if m is None:
            return None
        where = m.group("where")
        expects.append(shapes.Expect(m.group("colour"), m.group("shape"),
                                     _PHRASE_TO_POSITION[where] if where else None, _COUNT_OF[m.group("count")]))
    if len(expects) == 2 and all(e.position and e.count == 1 for e in expects):
        category = "pair"
    elif len(expects) != 1:
        return None
    elif expects[0].count > 1:
        category = "count"
    elif expects[0].position is not None:
        category = "position"
    else:
        category = "object"
    return PromptSpec(text, category, tuple(expects))


def prompt_lookup(prompts: Iterable[shapes.BenchmarkPrompt] | None = None) -> dict[str, PromptSpec]:
    """Benchmark prompt text -> its spec (the default set is `shapes.benchmark_prompts()`)."""
    prompts = shapes.benchmark_prompts() if prompts is None else prompts
    return {p.text: PromptSpec(p.text, p.category, tuple(p.expects)) for p in prompts}


def _as_spec(prompt: shapes.BenchmarkPrompt | PromptSpec | str) -> PromptSpec:
    if isinstance(prompt, PromptSpec):
        return prompt
    if isinstance(prompt, shapes.BenchmarkPrompt):
        return PromptSpec(prompt.text, prompt.category, tuple(prompt.expects))
    spec = parse_prompt(prompt)
    if spec is None:
        raise InputError(f"not a shapes-world prompt: {prompt!r}; expected a caption like "
                         f"'two red circles' or one of shapes.benchmark_prompts()")
    return spec


# ----- scoring


def score_image(image: Any, prompt: shapes.BenchmarkPrompt | PromptSpec | str,
                min_area: float = MIN_AREA) -> dict[str, Any]:
    """Score one image against one prompt.

    Returns `{"prompt", "category", "tested", "expects", "color", "shape", "position", "count",
    "overall", "objects"}`: attribute values are bools, or None for an attribute the prompt does not test.
    """
    spec = _as_spec(prompt)
    objects = detect_objects(image, min_area)
    area_of: dict[str, int] = {}
    for o in objects:
        area_of[o.colour] = area_of.get(o.colour, 0) + o.area
    by_area = sorted(area_of, key=lambda c: (-area_of[c], shapes.COLOURS.index(c)))
    named = {e.colour for e in spec.expects}
    stand_ins = [c for c in by_area if c not in named]

    groups = []
    for e in spec.expects:
        if e.colour in area_of:
            subject = [o for o in objects if o.colour == e.colour]
        elif stand_ins:
            # The colour is wrong; judge shape/position/count on the object drawn instead.
            stand_in = stand_ins.pop(0)
            subject = [o for o in objects if o.colour == stand_in]
        else:
            subject = []
        groups.append((e, subject))

    def shape_ok(e: shapes.Expect, subject: list[DetectedObject]) -> bool:
        judged = subject if e.count > 1 else subject[:1]
        return bool(judged) and all(o.shape == e.shape for o in judged)

    def position_ok(e: shapes.Expect, subject: list[DetectedObject]) -> bool:
        if not subject:
            return False
        judged = subject if e.count > 1 else subject[:1]
        total = sum(o.area for o in judged)
        cx = sum(o.cx * o.area for o in judged) / total
        cy = sum(o.cy * o.area for o in judged) / total
        return shapes.position_of(cx, cy) == e.position

    verdict: dict[str, bool | None] = {
        "color": all(e.colour in area_of for e in spec.expects) and set(by_area[:len(named)]) == named,
        "shape": all(shape_ok(e, s) for e, s in groups),
        "position": all(position_ok(e, s) for e, s in groups if e.position is not None),
        "count": all(len(s) == e.count for e, s in groups),
    }
    tested = spec.tested
    result: dict[str, Any] = {"prompt": spec.text, "category": spec.category, "tested": list(tested),
                              "expects": [dataclasses.asdict(e) for e in spec.expects]}
    for attr in ATTRIBUTES:
        result[attr] = bool(verdict[attr]) if attr in tested else None
    result["overall"] = all(result[a] for a in tested)
    result["objects"] = [o.to_dict() for o in objects]
    return result


def spec_from_sidecar(meta: dict[str, Any], lookup: dict[str, PromptSpec] | None = None) -> PromptSpec | None:
    """What an image's sidecar asks for: its own `category` + `expects` when it states valid ones,
    else the benchmark prompt (`lookup`, default `prompt_lookup()`) or a parse of its `prompt`;
    None when the prompt is not a shapes-world caption."""
    text = meta.get("prompt")
    if not isinstance(text, str):
        return None
    if isinstance(meta.get("expects"), list) and meta.get("category") in TESTED:
        try:
            expects = tuple(shapes.Expect(e["colour"], e["shape"], e.get("position"), int(e.get("count", 1)))
                            for e in meta["expects"])
        except (KeyError, TypeError, ValueError):
            expects = ()
        if expects and all(e.colour in shapes.PALETTE and e.shape in shapes.SHAPES for e in expects):
            return PromptSpec(text, meta["category"], expects)
    return (prompt_lookup() if lookup is None else lookup).get(text) or parse_prompt(text)


def score_folder(folder: str | os.PathLike, prompts: Iterable[shapes.BenchmarkPrompt] | None = None,
                 min_area: float = MIN_AREA, show_progress: bool = False) -> list[dict[str, Any]]:
    """Score every `NAME.png` (or .jpg/.jpeg/.webp) in `folder` against the prompt in its `NAME.json`.

    The sidecar needs `"prompt"`; its metadata comes from the sidecar's `"category"` + `"expects"`
    when present, else from the benchmark prompt with that text, else from parsing the caption.
    Raises `InputError` listing the images that cannot be scored (nothing is scored silently short).
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"no such folder: {root}; expected the sampler's output (NAME.png + NAME.json per image)")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}); generate the benchmark prompts first "
                         f"(the sampler writes NAME.png with a NAME.json holding the prompt)")
    lookup = prompt_lookup(prompts)
    jobs: list[tuple[Path, PromptSpec]] = []
    problems: list[str] = []
    for path in images:
        sidecar = path.with_suffix(".json")
        try:
            meta = json.loads(sidecar.read_text())
        except FileNotFoundError:
            problems.append(f"{path.name}: no {sidecar.name}")
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(f"{sidecar.name}: not valid JSON ({err})")
            continue
        spec = spec_from_sidecar(meta, lookup) if isinstance(meta, dict) else None
        if spec is None:
            problems.append(f"{sidecar.name}: 'prompt' missing or not a shapes-world caption")
            continue
        jobs.append((path, spec))
    if problems:
        raise InputError(f"{root}: {len(problems)} of {len(images)} images cannot be scored (first: {problems[0]}); "
                         f"each image needs a NAME.json sidecar whose 'prompt' is a shapes benchmark prompt")

    results = []
    with make_progress(show_progress, transient=True) as progress:
        task = progress.add_task("scoring", total=len(jobs))
        for path, spec in jobs:
            try:
                with image_errors(str(path)), Image.open(path) as im:
                    row = score_image(check_pixels(im, str(path)), spec, min_area)
            except (UnidentifiedImageError, OSError) as err:
                raise InputError(f"{path}: cannot read the image ({err})") from None
            results.append({"file": path.name, **row})
            progress.advance(task)
    return results


# ----- summaries and reports


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def chance_levels(prompts: Iterable[shapes.BenchmarkPrompt | PromptSpec] | None = None) -> dict[str, float | None]:
    """Accuracy of a uniformly random guess of each stated attribute, averaged over `prompts`.

    Per object group: colour 1/|colours| (a pair's two colours as a set: 1/C(|colours|, 2)),
    shape 1/|shapes|, position 1/|positions|, count 1/MAX_COUNT; `overall` multiplies the tested
    attributes of each prompt.
    """
    specs = [_as_spec(p) for p in (shapes.benchmark_prompts() if prompts is None else prompts)]
    per_attr: dict[str, list[float]] = {a: [] for a in (*ATTRIBUTES, "overall")}
    for spec in specs:
        g = len(spec.expects)
        p = {"color": 1 / math.comb(len(shapes.COLOURS), g) if g > 1 else 1 / len(shapes.COLOURS),
             "shape": (1 / len(shapes.SHAPES)) ** g,
             "position": (1 / len(shapes.POSITIONS)) ** g,
             "count": (1 / shapes.MAX_COUNT) ** g}
        overall = 1.0
        for attr in spec.tested:
            per_attr[attr].append(p[attr])
            overall *= p[attr]
        per_attr["overall"].append(overall)
    return {a: (sum(v) / len(v) if v else None) for a, v in per_attr.items()}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies over scored images: `color`, `shape`, `position`, `count`, `overall` (None when no
    image's prompt tests the attribute), `images`, `by_category` (GenEval-style per-task rows) and
    `per_prompt` rows (accuracies over the images of each prompt, in first-seen order)."""
    out: dict[str, Any] = {}
    for attr in (*ATTRIBUTES, "overall"):
        out[attr] = _mean([r[attr] for r in results if r.get(attr) is not None])
    out["images"] = len(results)

    by_category: dict[str, dict[str, Any]] = {}
    for category in shapes.KINDS:
        rows = [r for r in results if r["category"] == category]
        if rows:
            by_category[category] = {"images": len(rows), **{a: _mean([r[a] for r in rows if r[a] is not None])
                                                              for a in (*TESTED[category], "overall")}}
    out["by_category"] = by_category

    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault(r["prompt"], []).append(r)
    out["prompts"] = len(grouped)
    out["per_prompt"] = [
        {"prompt": text, "category": rows[0]["category"], "images": len(rows),
         **{a: _mean([r[a] for r in rows if r[a] is not None]) for a in (*ATTRIBUTES, "overall")}}
        for text, rows in grouped.items()
    ]
    # Chance weighted like the accuracies: once per image, with each image's own prompt.
    out["chance"] = chance_levels([_row_spec(r) for r in results]) if results else chance_levels([])
    return out


def _row_spec(row: dict[str, Any]) -> PromptSpec:
    return PromptSpec(row["prompt"], row["category"], tuple(shapes.Expect(**e) for e in row["expects"]))


def text_blind_baseline(images_per_prompt: int = 4, size: int = 64, seed: int = 0,
                        prompts: Iterable[shapes.BenchmarkPrompt] | None = None) -> dict[str, Any]:
    """`summarize` of a model that ignores its prompt and draws random training scenes
    (`shapes.sample_scene`): the empirical chance level a trained model must beat."""
    rng = random.Random(seed)
    results = []
    for prompt in shapes.benchmark_prompts() if prompts is None else prompts:
        for _ in range(images_per_prompt):
            results.append(score_image(shapes.render(shapes.sample_scene(rng), size), prompt))
    return summarize(results)


def write_report(results: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/shapes_bench.json` (`{"summary": summarize(results), "results": results}`); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_NAME
    write_text(path, json.dumps({"summary": summarize(results), "results": list(results)}, indent=2) + "\n")
    return path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_table(summary: dict[str, Any]) -> "Table":
    """A GenEval-style rich table: one row per prompt category and per attribute, with chance levels."""
    from rich.table import Table

    table = Table(title=f"Shapes benchmark: {summary['images']} images, {summary['prompts']} prompts")
    table.add_column("row")
    table.add_column("images", justify="right")
    for attr in (*ATTRIBUTES, "overall"):
        table.add_column(attr, justify="right")
    for category, row in summary["by_category"].items():
        table.add_row(category, str(row["images"]), *(_fmt(row.get(a)) for a in (*ATTRIBUTES, "overall")))
    table.add_section()
    table.add_row("all", str(summary["images"]), *(_fmt(summary[a]) for a in (*ATTRIBUTES, "overall")), style="bold")
    chance = summary.get("chance") or {}
    table.add_row("chance", "", *(_fmt(chance.get(a)) for a in (*ATTRIBUTES, "overall")), style="dim")
    return table


def print_report(summary: dict[str, Any], console: "Console | None" = None) -> None:
    """Print `report_table(summary)`."""
    from rich.console import Console

    (console or Console()).print(report_table(summary))


# ----------------------------------------------------------------------------------------------
# The `shapes` suite of `meissonic eval` (registered here: metrics never imports the shapes world)


def _eval_prompts() -> list[Any]:
    from meissonic_cli.metrics.evaluate import PromptEntry

    return [PromptEntry(p.text, p.category, {"expects": [dataclasses.asdict(e) for e in p.expects]})
            for p in shapes.benchmark_prompts()]


def _eval_start(items: Sequence[Any]) -> dict[str, Any]:
    lookup = prompt_lookup()
    specs = []
    for it in items:
        spec = spec_from_sidecar({**it.meta, "prompt": it.prompt or ""}, lookup)
        if spec is None:
            raise InputError(f"--suite shapes: {it.path.name}'s prompt {it.prompt!r} is not a shapes-world caption; "
                             f"sample the benchmark prompts with --prompts shapes")
        specs.append(spec)
    return {"specs": specs, "results": []}


def _eval_score(state: dict[str, Any], item: Any, image: Any) -> dict[str, Any]:
    results = state["results"]
    scored = score_image(image, state["specs"][len(results)])
    results.append({"file": item.path.name, **scored})
    return {"shapes_overall": scored["overall"]}


def _eval_write(results: Sequence[dict[str, Any]], out: Path) -> dict[str, Any]:
    write_report(results, out)
    return summarize(results)


def register_eval_suite() -> None:
    """Register the `shapes` suite with `meissonic_cli.metrics.evaluate` (done when this module is imported)."""
    from meissonic_cli.metrics.evaluate import PluginSuite, register_suite

    register_suite(PluginSuite("shapes", start=_eval_start, score=_eval_score, finish=lambda state: state["results"],
                               write=_eval_write, prompts=_eval_prompts, outputs=(REPORT_NAME,)))


register_eval_suite()


__all__ = ["ATTRIBUTES", "DetectedObject", "IRREGULAR", "MIN_AREA", "MIN_TEMPLATE_IOU", "PromptSpec", "TESTED",
           "chance_levels", "classify_shape", "detect_objects", "label_components", "parse_prompt", "print_report",
           "prompt_lookup", "report_table", "score_folder", "score_image", "spec_from_sidecar", "summarize",
           "register_eval_suite", "template_overlaps", "text_blind_baseline", "write_report"]
