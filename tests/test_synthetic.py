"""The shapes world and the synthetic LAION-style source."""

from __future__ import annotations

import math
import random
from collections import Counter, deque

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.commands import synth as synth_command
from meissonic_cli.errors import OutputExistsError
from meissonic_cli.shapes import world as shapes
from meissonic_cli.shapes.source import DEFAULT_SIDES, SCHEMAS, generate_source, parse_sides, synthetic_table, write_image_folder


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, pts = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pts.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(pts))
    return comps


def _analyse(img: Image.Image) -> list[tuple[str, str, str]]:
    """(colour, shape, position) of every object, found from pixels alone."""
    arr = np.asarray(img.convert("RGB"))
    labels = shapes.nearest_colour_labels(arr)
    side = arr.shape[0]
    found = []
    for k, colour in enumerate(shapes.COLOURS, start=1):
        for pts in _components(labels == k):
            ys, xs = pts[:, 0], pts[:, 1]
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = len(pts) / box
            shape = min(shapes.FILL_RATIO, key=lambda s: abs(shapes.FILL_RATIO[s] - fill))
            cx, cy = (xs.min() + xs.max() + 1) / 2 / side, (ys.min() + ys.max() + 1) / 2 / side
            found.append((colour, shape, shapes.position_of(cx, cy)))
    return found


def test_palette_is_well_separated():
    cols = [shapes.BACKGROUND] + [shapes.PALETTE[c] for c in shapes.COLOURS]
    dists = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(cols) for b in cols[i + 1:]]
    assert min(dists) > 100
    assert set(shapes.FILL_RATIO) == set(shapes.SHAPES)


def test_captions_read_naturally():
    E = shapes.Expect
    assert shapes.make_scene("position", [E("red", "circle", "left")]).caption() == "a red circle on the left"
    assert shapes.make_scene("object", [E("orange", "triangle")]).caption() == "an orange triangle"
    assert shapes.make_scene("count", [E("blue", "square", None, 2)]).caption() == "two blue squares"
    assert shapes.make_scene("position", [E("green", "triangle", "top")]).caption() == "a green triangle at the top"
    pair = shapes.make_scene("pair", [E("red", "circle", "left"), E("blue", "square", "right")])
    assert pair.caption() == "a red circle on the left and a blue square on the right"


@pytest.mark.parametrize("size", [64, 128])
def test_benchmark_reference_scenes_are_recovered_from_pixels(size):
    prompts = shapes.benchmark_prompts()
    assert len(prompts) == 78 and len({p.text for p in prompts}) == 78
    assert Counter(p.category for p in prompts) == {"object": 18, "position": 30, "count": 12, "pair": 18}
    for p in prompts if size == 64 else prompts[::5]:  # (pure-Python component search: keep it small)
        img = p.scene.render(size)
        arr = np.asarray(img)
        # crisp rendering: only palette colours and the background appear
        colours = {tuple(c) for c in arr.reshape(-1, 3)}
        assert colours <= {shapes.BACKGROUND, *shapes.PALETTE.values()}
        found = _analyse(img)
        expected = []
        for e in p.expects:
            expected += [(e.colour, e.shape)] * e.count
        assert sorted((c, s) for c, s, _ in found) == sorted(expected), p.text
        for e in p.expects:
            if e.position is not None:
                assert (e.colour, e.shape, e.position) in found, p.text


def test_sampled_scenes_are_deterministic_inside_and_disjoint():
    a = [shapes.sample_scene(random.Random(5)) for _ in range(3)]
    b = [shapes.sample_scene(random.Random(5)) for _ in range(3)]
    assert a == b
    rng = random.Random(0)
    kinds = Counter()
    for _ in range(300):
        scene = shapes.sample_scene(rng)
        kinds[scene.kind] += 1
        assert shapes.Scene.from_dict(scene.to_dict()) == scene
        boxes = [o.bbox(128) for o in scene.objects]
        assert all(0 <= x0 and 0 <= y0 and x1 < 128 and y1 < 128 for x0, y0, x1, y1 in boxes)
        for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
            for bx0, by0, bx1, by1 in boxes[i + 1:]:
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
        if scene.kind in ("position", "pair"):  # jitter never changes a stated position
            for e in scene.expects():
                assert any(o.position == e.position for o in scene.objects if o.colour == e.colour)
    assert set(kinds) == set(shapes.KINDS)
    only = {shapes.sample_scene(rng, kinds=["count"]).kind for _ in range(20)}
    assert only == {"count"}


def test_generate_source_is_dirty_deterministic_and_truthful(tmp_path):
    a = generate_source(tmp_path / "a", rows=120, seed=4, base_url="http://127.0.0.1:9")
    b = generate_source(tmp_path / "b", rows=120, seed=4, base_url="http://127.0.0.1:9")
    ta = pq.read_table(a.parquet_files[0])
    assert a.parquet_files[0].read_bytes() == b.parquet_files[0].read_bytes()  # (NaN != NaN in Table.equals)
    assert sorted(p.read_bytes() for p in a.images_dir.iterdir()) == sorted(p.read_bytes() for p in b.images_dir.iterdir())

    assert ta.column_names == ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "hash", "punsafe", "pwatermark",
                               "aesthetic"]
    assert ta.schema.field("WIDTH").type == pa.float64() and ta.schema.field("hash").type == pa.int64()
    rows = ta.to_pylist()
    for col in ("WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "aesthetic"):
        vals = [r[col] for r in rows]
        assert any(v is None for v in vals) and any(v != v for v in vals if v is not None), col
    assert any(r["aesthetic"] is not None and r["aesthetic"] < 4.5 for r in rows)
    assert any(r["pwatermark"] is not None and r["pwatermark"] >= 0.5 for r in rows)
    urls = Counter(r["URL"] for r in rows)
    assert max(urls.values()) > 1
    assert any(r["TEXT"] is None for r in rows) or any(r["TEXT"] == "" for r in rows)

    root = a.root
    checked = 0
    for r in rows:
        path = root / r["URL"].removeprefix("http://127.0.0.1:9/")
        if "/missing/" in r["URL"]:
            assert not path.exists()
            continue
        img = Image.open(path)
        if r["WIDTH"] is not None and r["WIDTH"] == r["WIDTH"]:
            assert img.size[0] == r["WIDTH"]
        if r["TEXT"]:
            named = {w for w in r["TEXT"].split() if w in shapes.PALETTE}
            small = np.asarray(img.resize((img.width // 4, img.height // 4), Image.NEAREST))
            drawn = {shapes.COLOURS[k - 1] for k in np.unique(shapes.nearest_colour_labels(small)) if k}
            assert named == drawn, r["TEXT"]
            checked += 1
    assert checked > 80
    # rows sharing a hash under different URLs serve byte-identical images
    by_hash: dict[int, set[str]] = {}
    for r in rows:
        if r["hash"] is not None and "/missing/" not in r["URL"]:
            by_hash.setdefault(r["hash"], set()).add(r["URL"])
    shared = [u for u in by_hash.values() if len(u) > 1]
    assert shared
    for group in shared:
        assert len({(root / u.removeprefix("http://127.0.0.1:9/")).read_bytes() for u in group}) == 1

    a.rebase("http://127.0.0.1:1234/")
    assert all(u.startswith("http://127.0.0.1:1234/") for u in pq.read_table(a.parquet_files[0]).column("URL").to_pylist())

    with pytest.raises(OutputExistsError):
        generate_source(tmp_path / "a", rows=10)


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_schema_variants(schema):
    table = synthetic_table(50, schema=schema, seed=1)
    expected = [name for name in SCHEMAS[schema].values() if name is not None]
    assert table.column_names == expected


def test_image_folder_and_cli(tmp_path):
    paths = write_image_folder(tmp_path / "folder", 5, size=32, seed=1)
    assert len(paths) == 5 and all(p.with_suffix(".txt").read_text().strip() for p in paths)
    assert Image.open(paths[0]).size == (32, 32)
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "src"), "--rows", "30", "--files", "2",
                                   "--schema", "lowercase"])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "src" / "metadata").glob("*.parquet"))
    assert len(files) == 2 and sum(pq.read_metadata(f).num_rows for f in files) == 30
    assert pq.read_schema(files[0]).names[:2] == ["url", "caption"]


def test_cli_sides_set_the_served_image_sizes(tmp_path):
    assert parse_sides(synth_command.DEFAULT_SIDES) == DEFAULT_SIDES  # the CLI default is the library's
    for flag, expected in (("64", {64}), ("64, 96,128", {64, 96, 128})):
        out = tmp_path / f"src-{len(expected)}"
        res = CliRunner().invoke(app, ["synth", "--out", str(out), "--rows", "60", "--sides", flag])
        assert res.exit_code == 0, res.output
        images = sorted((out / "images").iterdir())
        assert len(images) > 40
        # the shorter side of every image, square or not, is one of the given sides, and each side is used
        assert {min(Image.open(p).size) for p in images} == expected
        # the metadata's claimed sizes agree (rows with a NULL or NaN size left aside)
        meta = pq.read_table(out / "metadata" / "part-00000.parquet").to_pylist()
        claimed = {min(r["WIDTH"], r["HEIGHT"]) for r in meta
                   if None not in (r["WIDTH"], r["HEIGHT"]) and not math.isnan(r["WIDTH"] + r["HEIGHT"])}
        assert claimed == expected


@pytest.mark.parametrize("flag", ["64,x", "0", "4", "64,,96", "", "64,100000"])
def test_cli_bad_sides_is_one_line_and_writes_nothing(tmp_path, flag):
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "src"), "--rows", "20", "--sides", flag])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [(
        f"Error: --sides {flag!r} must be image sides in pixels (integers from 8 to 4096) separated by commas, "
        "e.g. 64 or 64,96,128")]
    assert not (tmp_path / "src").exists()
