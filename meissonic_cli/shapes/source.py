"""A synthetic LAION-style source: shapes-world images, LAION-schema parquet metadata, a local server.

`generate_source()` writes `images/*.png` (scenes from `shapes.py`, captions that describe them)
and `metadata/part-*.parquet` with the columns of a real LAION dump, so `curate`, `download` and
`tokenize` run on it exactly as they would on LAION. The metadata is deliberately dirty, the way
real dumps are: some rows fail each curate filter, some hold NULL or NaN in a score or size
column, some repeat an earlier URL (same image, possibly another caption), some point at a copy
of an earlier image under a new URL (same `hash`), and some URLs answer 404.

`ImageServer` serves the generated folder over HTTP on 127.0.0.1 with an ephemeral port, so
`download` fetches real bytes over a real socket in tests and the demo without touching the
network. Start the server first and pass `server.url` as `base_url`, or rebase later with
`SyntheticSource.rebase(url)`.

`synthetic_table()` builds only the metadata, vectorised, for benchmarks with millions of rows.
"""

from __future__ import annotations

import functools
import http.server
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from meissonic_cli.atomic import atomic_directory, atomic_write
from meissonic_cli.errors import InputError, OutputExistsError
from meissonic_cli.shapes import world as shapes

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

# Column names of each schema variant, by role. A role mapped to None is absent from that variant.
#   laion2b-en-aesthetic: laion2B-en joined with the aesthetic / watermark / unsafe predictions
#   laion-aesthetics-v2:  improved_aesthetics_*plus; the score is AESTHETIC_SCORE, probabilities float32
#   laion2b-en:           no aesthetic score at all
#   lowercase:            another dump's naming: lower-case, caption instead of TEXT
SCHEMAS: dict[str, dict[str, str | None]] = {
    "laion2b-en-aesthetic": {"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT",
                             "similarity": "similarity", "hash": "hash", "unsafe": "punsafe",
                             "watermark": "pwatermark", "aesthetic": "aesthetic"},
    "laion-aesthetics-v2": {"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT",
                            "similarity": "similarity", "hash": "hash", "unsafe": "punsafe",
                            "watermark": "pwatermark", "aesthetic": "AESTHETIC_SCORE"},
    "laion2b-en": {"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT",
                   "similarity": "similarity", "hash": "hash", "unsafe": "punsafe",
                   "watermark": "pwatermark", "aesthetic": None},
    "lowercase": {"url": "url", "caption": "caption", "width": "width", "height": "height",
                  "similarity": "similarity", "hash": "hash", "unsafe": "punsafe",
                  "watermark": "pwatermark", "aesthetic": "aesthetic"},
}

# Image sides (pixels) of the served images; the shorter side of non-square images is one of these.
DEFAULT_SIDES: tuple[int, ...] = (96, 128, 192, 256, 320, 512)
# Below this the shapes collapse to nothing (and PIL refuses to draw them under 4 px).
MIN_SIDE = 8
MAX_SIDE = 4096  # the longer side of a non-square image is up to ~2x this
# Width / height of the non-square images (a quarter of the rows); 3.0 and 1/3.5 fail aspect filters.
_ASPECTS = (4 / 3, 3 / 4, 16 / 9, 9 / 16, 3.0, 1 / 3.5)

# Fractions of rows with each kind of dirt.
DUP_URL_FRACTION = 0.05
MISSING_FRACTION = 0.03
DUP_HASH_FRACTION = 0.04
NULL_FRACTION = 0.03
NAN_FRACTION = 0.02


@dataclass
class SyntheticSource:
    """What `generate_source` wrote."""

    root: Path
    images_dir: Path
    parquet_files: list[Path]
    schema: str
    rows: int
    images: int
    base_url: str
    columns: dict[str, str | None] = field(default_factory=dict)  # role -> column name in this schema

    def rebase(self, base_url: str) -> None:
        """Rewrite every URL to start with `base_url` (e.g. after starting a server on a new port)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        url_col = self.columns["url"]
        old, new = self.base_url.rstrip("/"), base_url.rstrip("/")
        for path in self.parquet_files:
            table = pq.read_table(path)
            urls = [u if u is None else new + u[len(old):] if u.startswith(old) else u
                    for u in table.column(url_col).to_pylist()]
            table = table.set_column(table.schema.get_field_index(url_col), url_col, pa.array(urls, pa.string()))
            _write_parquet_atomic(table, path)
        self.base_url = new


def _splitmix64(x: "np.ndarray") -> "np.ndarray":
    # A cheap, well-mixed integer hash: gives LAION-like int64 `hash` values from content ids.
    import numpy as np

    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.view(np.int64)


def _earlier(rng: "np.random.Generator", idx: "np.ndarray") -> "np.ndarray":
    # A uniformly chosen earlier row for each row index (row 0 points at itself).
    import numpy as np

    return np.floor(rng.random(len(idx)) * idx).astype(np.int64)


def _resolve(ptr: "np.ndarray") -> "np.ndarray":
    # Follow "same as row j" pointers until each row points at a row that points at itself.
    import numpy as np

    while True:
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            return ptr
        ptr = nxt


def parse_sides(sides: str | Sequence[int]) -> tuple[int, ...]:
    """'64,96,128' (or a sequence of ints) -> (64, 96, 128); InputError unless every side is >= MIN_SIDE."""
    parts = sides.split(",") if isinstance(sides, str) else list(sides)
    try:
        out = tuple(int(str(part).strip()) for part in parts)
    except ValueError:
        out = ()
    if not out or min(out) < MIN_SIDE or max(out) > MAX_SIDE:
        shown = sides if isinstance(sides, str) else ",".join(str(v) for v in sides)
        raise InputError(f"--sides {shown!r} must be image sides in pixels (integers from {MIN_SIDE} to {MAX_SIDE}) "
                         "separated by commas, e.g. 64 or 64,96,128")
    return out


def _plan(rows: int, seed: int, sides: Sequence[int]) -> dict[str, "np.ndarray"]:
    """Per-row ground truth: which image a row's URL names, its true size, whether it 404s."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = np.arange(rows, dtype=np.int64)
    fate = rng.random(rows)
    dup_url = (fate < DUP_URL_FRACTION) & (idx > 0)
    missing = (fate >= DUP_URL_FRACTION) & (fate < DUP_URL_FRACTION + MISSING_FRACTION)
    dup_hash = (fate >= DUP_URL_FRACTION + MISSING_FRACTION) & (
        fate < DUP_URL_FRACTION + MISSING_FRACTION + DUP_HASH_FRACTION) & (idx > 0)

    if rows >= 8:
        # Even a tiny source holds at least one row of each kind of dirt (fixed positions).
        for mask, pos in ((dup_url, rows - 1), (missing, 1), (dup_hash, rows - 2)):
            if not mask.any():
                dup_url[pos] = missing[pos] = dup_hash[pos] = False
                mask[pos] = True
    # A duplicate-hash row is a new URL serving a copy of an earlier row's image.
    content = idx.copy()
    content[dup_hash] = _earlier(rng, idx)[dup_hash]
    content = _resolve(content)
    url_id = idx.copy()
    url_id[dup_url] = _earlier(rng, idx)[dup_url]
    url_id = _resolve(url_id)

    side = np.asarray(sides, dtype=np.int64)[rng.integers(0, len(sides), rows)]
    aspect = np.where(rng.random(rows) < 0.75, 1.0, np.asarray(_ASPECTS)[rng.integers(0, len(_ASPECTS), rows)])
    width = np.where(aspect >= 1, np.round(side * aspect), side).astype(np.int64)
    height = np.where(aspect >= 1, side, np.round(side / aspect)).astype(np.int64)
    # A duplicate-hash row serves a byte-identical copy: same size as the row it copies.
    width, height = width[content], height[content]
    # A repeated URL is the same image: same size, same content, same 404-ness.
    return {"url_id": url_id, "content": content[url_id], "missing": missing[url_id],
            "width": width[url_id], "height": height[url_id], "rng": rng}


def _dirty(rng: "np.random.Generator", values: "np.ndarray", nan: bool = True) -> "pa.Array":
    """A float column with NULL_FRACTION nulls and, when `nan`, NAN_FRACTION NaNs."""
    import numpy as np
    import pyarrow as pa

    u = rng.random(len(values))
    if len(u) >= 20:
        # Even a small source holds at least one NULL and one NaN in every dirty column.
        if not (u < NULL_FRACTION).any():
            u[int(np.argmin(u))] = 0.0
        if nan and not ((u >= NULL_FRACTION) & (u < NULL_FRACTION + NAN_FRACTION)).any():
            u[int(np.argmax(u))] = NULL_FRACTION
    values = values.astype(np.float64)
    if nan:
        values = np.where((u >= NULL_FRACTION) & (u < NULL_FRACTION + NAN_FRACTION), np.nan, values)
    return pa.array(values, mask=u < NULL_FRACTION)


def _scene(seed: int, content_id: int) -> shapes.Scene:
    return shapes.sample_scene(random.Random(seed * 1_000_003 + int(content_id)))


def _url_path(url_id: int, missing: bool) -> str:
    return f"missing/{url_id:07d}.png" if missing else f"images/{url_id:07d}.png"


def synthetic_table(rows: int, *, schema: str = "laion2b-en-aesthetic", seed: int = 0,
                    base_url: str = "http://127.0.0.1:8000", sides: Sequence[int] = DEFAULT_SIDES,
                    scene_pool: int | None = None) -> "pa.Table":
    """LAION-schema metadata for `rows` rows (no images written).

    Captions describe the scene of each row's image; with `scene_pool` set, scenes are drawn from a
    pool of that many (fast for millions of rows; captions then repeat across images).
    """
    table, _ = _build(rows, schema=schema, seed=seed, base_url=base_url, sides=sides, scene_pool=scene_pool)
    return table


def _build(rows: int, *, schema: str, seed: int, base_url: str, sides: Sequence[int],
           scene_pool: int | None) -> tuple["pa.Table", dict[str, Any]]:
    import numpy as np
    import pyarrow as pa

    if schema not in SCHEMAS:
        raise InputError(f"unknown synthetic schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    if rows < 1:
        raise InputError(f"rows must be at least 1, got {rows}")
    plan = _plan(rows, seed, parse_sides(sides))
    rng: np.random.Generator = plan.pop("rng")
    names = SCHEMAS[schema]
    base = base_url.rstrip("/")

    if scene_pool:
        pool = [_scene(seed, i).caption() for i in range(scene_pool)]
        caption_of = {c: pool[c % scene_pool] for c in np.unique(plan["content"]).tolist()}
    else:
        caption_of = {c: _scene(seed, c).caption() for c in np.unique(plan["content"]).tolist()}
    captions: list[str | None] = [caption_of[c] for c in plan["content"].tolist()]
    u = rng.random(rows)
    for i in np.nonzero(u < 0.02)[0].tolist():
        captions[i] = None
    for i in np.nonzero((u >= 0.02) & (u < 0.03))[0].tolist():
        captions[i] = ""
    urls = [f"{base}/{_url_path(i, m)}" for i, m in zip(plan["url_id"].tolist(), plan["missing"].tolist())]

    punsafe = np.where(rng.random(rows) < 0.12, rng.uniform(0.5, 1.0, rows), rng.uniform(0.0, 0.3, rows))
    pwatermark = np.where(rng.random(rows) < 0.2, rng.uniform(0.5, 1.0, rows), rng.uniform(0.0, 0.45, rows))
    hashes = _splitmix64(plan["content"] * 7919 + seed)
    hash_mask = rng.random(rows) < 0.02
    columns: dict[str, pa.Array] = {
        "url": pa.array(urls, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "width": _dirty(rng, plan["width"]),
        "height": _dirty(rng, plan["height"]),
        "similarity": _dirty(rng, rng.uniform(0.18, 0.42, rows)),
        "hash": pa.array(hashes, mask=hash_mask),
        "unsafe": _dirty(rng, punsafe),
        "watermark": _dirty(rng, pwatermark),
        "aesthetic": _dirty(rng, rng.uniform(3.0, 9.5, rows)),
    }
    if schema == "laion-aesthetics-v2":
        for role in ("unsafe", "watermark"):
            columns[role] = columns[role].cast(pa.float32())
    table = pa.table({names[role]: arr for role, arr in columns.items() if names[role] is not None})
    return table, plan


def _write_parquet_atomic(table: "pa.Table", path: Path) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _render_image(scene: shapes.Scene, width: int, height: int) -> "Any":
    """The scene drawn square at the shorter side, centred on a background canvas of width x height."""
    from PIL import Image

    side = min(width, height)
    square = shapes.render(scene, side)
    if width == height:
        return square
    canvas = Image.new("RGB", (width, height), scene.background)
    canvas.paste(square, ((width - side) // 2, (height - side) // 2))
    return canvas


def generate_source(out_dir: str | os.PathLike, *, rows: int = 200, schema: str = "laion2b-en-aesthetic",
                    seed: int = 0, base_url: str = "http://127.0.0.1:8000", files: int = 1,
                    sides: Sequence[int] = DEFAULT_SIDES, overwrite: bool = False) -> SyntheticSource:
    """Write a LAION-style source to `out_dir`: `images/*.png` and `metadata/part-NNNNN.parquet`.

    `files` splits the metadata into that many parquet files; `base_url` prefixes every URL (use
    the `ImageServer.url` of a server started on `out_dir`). Refuses a non-empty `out_dir` unless
    `overwrite`. Deterministic given the arguments.
    """
    root = Path(out_dir)
    _check_folder(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise OutputExistsError(f"{root} already exists and is not empty; pass overwrite=True "
                                "(--overwrite) or choose another folder")
    if rows < 1:
        raise InputError(f"rows must be >= 1, got {rows}")
    if files < 1 or files > rows:
        raise InputError(f"files must be between 1 and rows ({rows}), got {files}")
    parse_sides(sides)
    # Everything is checked (and the table built) before anything is written; an old source's
    # images/ and metadata/ are each replaced only once the new one is complete.
    table, plan = _build(rows, schema=schema, seed=seed, base_url=base_url, sides=sides, scene_pool=None)
    with atomic_directory(root / "images") as tmp_images:
        written = _write_images(tmp_images, plan, seed)
    images_dir = root / "images"
    with atomic_directory(root / "metadata") as meta_dir:
        paths = _write_metadata(meta_dir, table, rows, files)
    paths = [root / "metadata" / p.name for p in paths]
    return SyntheticSource(root=root, images_dir=images_dir, parquet_files=paths, schema=schema, rows=rows,
                           images=written, base_url=base_url.rstrip("/"), columns=dict(SCHEMAS[schema]))


def _check_folder(root: Path) -> None:
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"--out {root}: {parent} is a file, not a folder; choose another --out")
            return


def _write_images(images_dir: Path, plan: dict[str, "np.ndarray"], seed: int) -> int:
    import numpy as np

    written = 0
    rendered: dict[tuple[int, int, int], bytes] = {}
    for url_id in np.unique(plan["url_id"]).tolist():
        if plan["missing"][url_id]:
            continue
        content, w, h = int(plan["content"][url_id]), int(plan["width"][url_id]), int(plan["height"][url_id])
        path = images_dir / _url_path(url_id, False).split("/", 1)[1]
        key = (content, w, h)
        if key in rendered:  # a duplicate-hash row: the very same bytes under a new URL
            path.write_bytes(rendered[key])
        else:
            # Fast compression: flat shapes compress well anyway, and this is the cost of a source.
            _render_image(_scene(seed, content), w, h).save(path, format="PNG", compress_level=1)
            rendered[key] = path.read_bytes()
        written += 1
    return written


def _write_metadata(meta_dir: Path, table: Any, rows: int, files: int) -> list[Path]:
    import numpy as np

    bounds = np.linspace(0, rows, files + 1).astype(int)
    paths = []
    for k in range(files):
        path = meta_dir / f"part-{k:05d}.parquet"
        _write_parquet_atomic(table.slice(bounds[k], bounds[k + 1] - bounds[k]), path)
        paths.append(path)
    return paths


def write_image_folder(out_dir: str | os.PathLike, n: int, *, size: int = 64, seed: int = 0,
                       kinds: Sequence[str] = shapes.KINDS, overwrite: bool = False) -> list[Path]:
    """Write `n` scenes as `NNNNNN.png` with the caption in `NNNNNN.txt`; returns the image paths.

    Refuses a non-empty `out_dir` unless `overwrite`, which replaces the whole folder once the new one
    is complete."""
    root = Path(out_dir)
    if n < 1:
        raise InputError(f"--folder-images must be >= 1, got {n}")
    if not MIN_SIDE <= size <= MAX_SIDE:
        raise InputError(f"--size must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {size}")
    _check_folder(root)
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"--out {root} is a file; choose another --out")
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise OutputExistsError(f"{root} is not empty; pass --overwrite to replace the whole folder or choose another --out")
    rng = random.Random(seed)
    names = []
    with atomic_directory(root) as tmp:
        for i in range(n):
            scene = shapes.sample_scene(rng, kinds)
            scene.render(size).save(tmp / f"{i:06d}.png", format="PNG")
            (tmp / f"{i:06d}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
            names.append(f"{i:06d}.png")
    return [root / name for name in names]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves regular files under the root only: no directory listings, nothing a symlink points to
    outside the root (both answer 404)."""

    def do_GET(self) -> None:
        server = self.server
        with server.log_lock:  # type: ignore[attr-defined]
            server.paths.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    def send_head(self) -> Any:
        root = Path(self.directory).resolve()
        try:
            real = Path(self.translate_path(self.path)).resolve(strict=True)
        except (OSError, RuntimeError):
            real = None
        if real is None or not real.is_file() or not real.is_relative_to(root):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def list_directory(self, path: Any) -> Any:
        self.send_error(404, "File not found")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by http.server
        pass


class ImageServer:
    """A threaded static-file HTTP server on 127.0.0.1 (ephemeral port by default) for `directory`.

        with ImageServer(root) as server:
            source = generate_source(root, base_url=server.url)
            download(...)
    """

    def __init__(self, directory: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requested_paths: list[str] = []  # every GET path, in arrival order (tests count re-downloads)

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("ImageServer is not running; call start() or use it as a context manager")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def start(self) -> "ImageServer":
        _check_folder(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(self.directory))
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be between 0 (any free port) and 65535, got {self.port}")
        try:
            self._httpd = http.server.ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as err:
            raise InputError(f"--port {self.port}: cannot listen on {self.host}:{self.port} ({err.strerror or err}); "
                             "pick another port or 0 for any free one") from None
        self._httpd.daemon_threads = True
        self._httpd.paths = self.requested_paths  # type: ignore[attr-defined]
        self._httpd.log_lock = threading.Lock()  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="meissonic-image-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def serve_forever(self) -> None:
        """Block until interrupted (for `meissonic synth --serve`)."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        finally:
            self.stop()

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
