"""Shapes benchmark scorer: ground truth scores 1, each kind of wrong image scores 0 on its attribute."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from meissonic_cli.errors import InputError
from meissonic_cli.shapes import bench as sb
from meissonic_cli.shapes import world as shapes
from meissonic_cli.shapes.world import Expect, make_scene

PROMPTS = shapes.benchmark_prompts()


def _score_all(images_and_prompts):
    return [sb.score_image(im, p) for im, p in images_and_prompts]


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def test_ground_truth_scores_one_on_every_attribute():
    results = _score_all((p.scene.render(64), p) for p in PROMPTS)
    summary = sb.summarize(results)
    assert summary["images"] == summary["prompts"] == len(PROMPTS) == 78
    for attr in (*sb.ATTRIBUTES, "overall"):
        assert summary[attr] == 1.0, attr
    assert set(summary["by_category"]) == set(shapes.KINDS)
    assert all(row["overall"] == 1.0 for row in summary["by_category"].values())
    # Each category tests exactly its attributes; untested ones are None, not True.
    for r in results:
        for attr in sb.ATTRIBUTES:
            assert (r[attr] is None) == (attr not in sb.TESTED[r["category"]])


@pytest.mark.parametrize("transform", ["jpeg75", "jpeg40", "resize48", "resize96", "render128"])
def test_ground_truth_survives_compression_and_resizing(transform):
    def make(p):
        if transform == "render128":
            return p.scene.render(128)
        im = p.scene.render(64)
        if transform.startswith("jpeg"):
            return _jpeg(im, int(transform[4:]))
        side = int(transform[6:])
        return im.resize((side, side), Image.BILINEAR)

    summary = sb.summarize(_score_all((make(p), p) for p in PROMPTS))
    assert summary["overall"] == 1.0


def test_random_training_scenes_score_one_against_their_captions():
    rng = random.Random(3)
    for _ in range(60):
        scene = shapes.sample_scene(rng)
        assert sb.score_image(_jpeg(scene.render(64), 75), scene.caption())["overall"], scene.caption()


def _other(values, *avoid):
    return next(v for v in values if v not in avoid)


def test_wrong_colour_scores_zero_on_colour_only():
    results = []
    for p in PROMPTS:
        named = [e.colour for e in p.expects]
        first = p.expects[0]
        wrong = [Expect(_other(shapes.COLOURS, *named), first.shape, first.position, first.count), *p.expects[1:]]
        results.append(sb.score_image(make_scene(p.category, wrong).render(64), p))
    summary = sb.summarize(results)
    assert summary["color"] == 0.0
    # The shape, position and count of the object drawn are still judged, and they are right.
    assert summary["shape"] == summary["position"] == summary["count"] == 1.0


def test_wrong_shape_scores_zero_on_shape_only():
    results = []
    for p in PROMPTS:
        first = p.expects[0]
        wrong = [Expect(first.colour, _other(shapes.SHAPES, first.shape), first.position, first.count), *p.expects[1:]]
        results.append(sb.score_image(make_scene(p.category, wrong).render(64), p))
    summary = sb.summarize(results)
    assert summary["shape"] == 0.0
    assert summary["color"] == summary["position"] == summary["count"] == 1.0


def test_wrong_position_scores_zero_on_position_only():
    results = []
    for p in PROMPTS:
        if p.category == "position":
            e = p.expects[0]
            wrong = [Expect(e.colour, e.shape, shapes.OPPOSITE.get(e.position, "left"))]
        elif p.category == "pair":
            a, b = p.expects
            wrong = [Expect(a.colour, a.shape, b.position), Expect(b.colour, b.shape, a.position)]
        else:
            continue
        results.append(sb.score_image(make_scene(p.category, wrong).render(64), p))
    assert len(results) == 48
    summary = sb.summarize(results)
    assert summary["position"] == 0.0
    assert summary["color"] == summary["shape"] == 1.0


def test_wrong_count_scores_zero_on_count_only():
    results = []
    for p in (p for p in PROMPTS if p.category == "count"):
        e = p.expects[0]
        for n in range(1, shapes.MAX_COUNT + 1):
            if n != e.count:
                kind = "count" if n > 1 else "object"
                results.append(sb.score_image(make_scene(kind, [Expect(e.colour, e.shape, None, n)]).render(64), p))
    assert len(results) == 24
    summary = sb.summarize(results)
    assert summary["count"] == 0.0
    assert summary["color"] == summary["shape"] == 1.0


def test_blank_and_foreign_images_score_zero():
    blank = Image.new("RGB", (64, 64), shapes.BACKGROUND)
    summary = sb.summarize([sb.score_image(blank, p) for p in PROMPTS])
    for attr in (*sb.ATTRIBUTES, "overall"):
        assert summary[attr] == 0.0, attr
    assert sb.detect_objects(blank) == []


def test_speckle_noise_is_not_an_object():
    p = PROMPTS[0]
    arr = np.asarray(p.scene.render(64)).copy()
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 64, 60), rng.integers(0, 64, 60)
    colours = np.array([shapes.PALETTE[c] for c in shapes.COLOURS], dtype=np.uint8)
    arr[ys, xs] = colours[rng.integers(0, len(colours), 60)]
    objects = sb.detect_objects(arr)
    assert [(o.colour, o.shape, o.position) for o in objects] == [(p.colour, p.shape, "center")]
    assert sb.score_image(arr, p)["overall"]


def test_detected_geometry_matches_the_scene():
    scene = make_scene("pair", [Expect("red", "triangle", "left"), Expect("blue", "square", "right")])
    objects = {o.colour: o for o in sb.detect_objects(scene.render(128))}
    assert objects["red"].shape == "triangle" and objects["blue"].shape == "square"
    assert objects["red"].fill == pytest.approx(0.5, abs=0.06)
    assert objects["blue"].fill == pytest.approx(1.0, abs=0.01)
    assert objects["red"].taper < 0.35 and objects["blue"].taper == pytest.approx(1.0)
    # A triangle's centroid sits a sixth of its height below its box centre.
    assert objects["red"].cx == pytest.approx(0.25, abs=0.01)
    assert objects["red"].cy == pytest.approx(0.5 + shapes.PAIR_SIZE / 6, abs=0.015)
    assert objects["blue"].area == pytest.approx((shapes.PAIR_SIZE * 128) ** 2, rel=0.05)


def test_templates_fit_clean_renders_and_reject_merged_blobs():
    for shape in shapes.SHAPES:
        for side in (64, 128):
            scene = make_scene("object", [Expect("red", shape)])
            mask = shapes.nearest_colour_labels(np.asarray(scene.render(side))) > 0
            overlaps = sb.template_overlaps(mask)
            assert overlaps[shape] >= 0.93, (shape, side, overlaps)
            assert all(v < overlaps[shape] - 0.05 for k, v in overlaps.items() if k != shape), (shape, overlaps)
            assert sb.classify_shape(overlaps)[0] == shape
    merged = np.zeros((64, 64), dtype=bool)  # two touching squares read as one component
    merged[20:36, 10:26] = merged[20:36, 26:42] = True
    assert sb.classify_shape(sb.template_overlaps(merged))[0] == sb.IRREGULAR
    ring = np.zeros((64, 64), dtype=bool)
    ring[10:50, 10:50] = True
    ring[16:44, 16:44] = False
    assert sb.classify_shape(sb.template_overlaps(ring))[0] == sb.IRREGULAR


def _wobble(arr, rng, fraction, shift):
    """Shift the content of a `fraction` of the 8x8 patches that hold an edge by up to `shift` px:
    the ragged edges a VQ model leaves when neighbouring tokens pick slightly different edge codes."""
    out = arr.copy()
    background = np.array(shapes.BACKGROUND)
    for y in range(0, arr.shape[0], 8):
        for x in range(0, arr.shape[1], 8):
            patch = arr[y:y + 8, x:x + 8]
            is_bg = np.abs(patch.astype(int) - background).sum(-1) < 30
            if is_bg.all() or not is_bg.any() or rng.random() > fraction:
                continue
            dy, dx = rng.randint(-shift, shift), rng.randint(-shift, shift)
            out[y:y + 8, x:x + 8] = patch[np.clip(np.arange(8) - dy, 0, 7)][:, np.clip(np.arange(8) - dx, 0, 7)]
    return out


def test_shape_survives_ragged_edges_and_wrong_shapes_stay_wrong():
    rng = random.Random(3)
    prompts = shapes.benchmark_prompts()
    right, wrong = [], []
    for i in range(160):
        p = prompts[i % len(prompts)]
        scene = make_scene(p.category, list(p.expects), jitter=0.03, rng=rng)
        right.append(sb.score_image(_wobble(np.asarray(scene.render(64)), rng, 0.5, 2), p)["shape"])
        others = [dataclasses.replace(o, shape=shapes.SHAPES[(shapes.SHAPES.index(o.shape) + 1) % 3])
                  for o in scene.objects]
        swapped = dataclasses.replace(scene, objects=tuple(others))
        wrong.append(sb.score_image(_wobble(np.asarray(swapped.render(64)), rng, 0.5, 2), p)["shape"])
    # Half of the edge patches moved by up to 2 px: a rule on the bounding box (fill ratio) keeps ~0.7 of these.
    assert np.mean(right) >= 0.95 and np.mean(wrong) <= 0.05, (np.mean(right), np.mean(wrong))


def _reference_components(mask):
    """Plain breadth-first search, raster order: the definition the vectorised version must match."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not labels[y, x]:
                n += 1
                labels[y, x] = n
                queue = [(y, x)]
                while queue:
                    cy, cx = queue.pop()
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = n
                            queue.append((ny, nx))
    return labels, n


def test_label_components_matches_breadth_first_search():
    rng = np.random.default_rng(1)
    masks = [rng.random((20, 23)) < q for q in (0.3, 0.5, 0.6)]
    spiral = np.zeros((15, 15), dtype=bool)  # one long winding component: many propagation steps
    spiral[1, 1:14] = spiral[1:14, 13] = spiral[13, 1:14] = spiral[3:14, 1] = spiral[3, 1:12] = True
    spiral[3:12, 11] = spiral[11, 3:12] = spiral[5:12, 3] = spiral[5, 3:10] = True
    masks += [spiral, np.zeros((5, 5), dtype=bool), np.ones((4, 6), dtype=bool)]
    for mask in masks:
        labels, n = sb.label_components(mask)
        ref_labels, ref_n = _reference_components(mask)
        assert n == ref_n
        assert np.array_equal(labels, ref_labels)
    assert sb.label_components(spiral)[1] == 1


def test_parse_prompt_reads_every_benchmark_caption():
    for p in PROMPTS:
        spec = sb.parse_prompt(p.text)
        assert spec is not None and spec.category == p.category and spec.expects == tuple(p.expects), p.text
    assert sb.parse_prompt("a photo of a cat") is None
    assert sb.parse_prompt("a red circle and a blue square") is None  # a pair needs positions
    with pytest.raises(InputError, match="not a shapes-world prompt"):
        sb.score_image(PROMPTS[0].scene.render(64), "a photo of a cat")


def test_bad_image_inputs_raise_input_error():
    with pytest.raises(InputError, match="PIL image"):
        sb.score_image("not an image", PROMPTS[0])
    with pytest.raises(InputError, match="uint8"):
        sb.score_image(np.zeros((64, 64, 3), dtype=np.float32), PROMPTS[0])


def test_chance_levels_and_text_blind_baseline():
    chance = sb.chance_levels()
    singles, pairs = 60, 18
    assert chance["color"] == pytest.approx((singles / 6 + pairs / math.comb(6, 2)) / 78)
    assert chance["count"] == pytest.approx(1 / 3)
    assert chance["position"] == pytest.approx((30 / 5 + 18 / 25) / 48)
    assert chance["overall"] < min(chance[a] for a in sb.ATTRIBUTES)
    baseline = sb.text_blind_baseline(images_per_prompt=1, seed=0)
    assert baseline == sb.text_blind_baseline(images_per_prompt=1, seed=0)
    assert 0.02 < baseline["color"] < 0.35 and baseline["overall"] < 0.15


def _write_sample(folder, name, image, meta):
    image.save(folder / f"{name}.png")
    (folder / f"{name}.json").write_text(json.dumps(meta))


def test_score_folder_summary_and_report(tmp_path):
    from rich.console import Console

    folder = tmp_path / "samples"
    folder.mkdir()
    red_circle, two_green = PROMPTS[0], next(p for p in PROMPTS if p.text == "two green squares")
    _write_sample(folder, "000", red_circle.scene.render(64), {"prompt": red_circle.text, "seed": 0})
    _write_sample(folder, "001", red_circle.scene.render(64), {"prompt": red_circle.text, "seed": 1})
    three_green = make_scene("count", [Expect("green", "square", None, 3)])
    _write_sample(folder, "002", three_green.render(64), {"prompt": two_green.text})
    # Not a benchmark prompt, but the sidecar states what it expects.
    custom = make_scene("position", [Expect("green", "circle", "top")])
    _write_sample(folder, "003", custom.render(64), {"prompt": "a lime disc up high", "category": "position",
                                                      "expects": [{"colour": "green", "shape": "circle",
                                                                   "position": "top"}]})
    results = sb.score_folder(folder)
    assert [r["file"] for r in results] == ["000.png", "001.png", "002.png", "003.png"]
    assert [r["overall"] for r in results] == [True, True, False, True]
    summary = sb.summarize(results)
    assert summary["images"] == 4 and summary["prompts"] == 3
    assert summary["count"] == 0.0 and summary["color"] == 1.0 and summary["overall"] == 0.75
    assert summary["position"] == 1.0
    assert summary["by_category"]["object"]["overall"] == 1.0
    row = next(r for r in summary["per_prompt"] if r["prompt"] == red_circle.text)
    assert row["images"] == 2 and row["overall"] == 1.0 and row["position"] is None

    path = sb.write_report(results, tmp_path / "report")
    data = json.loads(path.read_text())
    assert data["summary"]["overall"] == 0.75 and len(data["results"]) == 4
    assert [p.name for p in path.parent.iterdir()] == [sb.REPORT_NAME]
    console = Console(record=True, width=120)
    sb.print_report(summary, console)
    text = console.export_text()
    assert "overall" in text and "0.750" in text and "chance" in text


def test_score_folder_rejects_unscorable_input(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        sb.score_folder(tmp_path / "missing")
    with pytest.raises(InputError, match="no images"):
        sb.score_folder(tmp_path)
    PROMPTS[0].scene.render(64).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="1 of 1 images cannot be scored .*no a.json"):
        sb.score_folder(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "a photo of a cat"}))
    with pytest.raises(InputError, match="not a shapes-world caption"):
        sb.score_folder(tmp_path)
    (tmp_path / "a.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        sb.score_folder(tmp_path)
