"""What `tokenize` reads: image shards, image folders and tables, as work units of raw samples.

- webdataset image shards as img2dataset writes them (`NNNNN.tar` + `NNNNN_stats.json`): one unit
  per shard;
- a folder of images (any depth, hidden files skipped) with same-stem `.txt` captions, else the
  caption key of same-stem `.json` metadata (`caption`, `text`, ... or `--caption-col`): units of
  `shard_size` images in path order;
- a table of image paths, URLs or bytes plus captions (`tables.py`): units of `shard_size` rows.

A unit becomes one output shard and is the resume unit. Folder and table units carry a digest of
what they read (file names and sizes, rows), so a rerun over a changed input is refused instead of
mixing two inputs. Nothing here decodes an image: a unit yields `RawSample`s (bytes, or a loader
that reads or fetches them in a decode thread) and `tokenize` decodes them.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any, Callable, Iterator

from meissonic_cli.data.inputs import check_image_shards, unique_key
from meissonic_cli.data.shards import safe_key
from meissonic_cli.errors import InputError
from meissonic_cli.readers import parse_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """One input sample before decoding."""

    key: str
    image: bytes | None
    caption: str
    meta: dict[str, Any]
    error: str | None = None  # set when the sample is unusable before decoding (e.g. no image member)
    load: Callable[[], bytes] | None = None  # reads the image in a decode thread when `image` is None


@dataclass
class WorkUnit:
    """One input shard (or one chunk of an image folder or a table) -> one output shard."""

    index: int
    source: str
    samples: Callable[[], Iterator[RawSample]]
    expected: int | None = None  # sample count when known up front (progress bars)
    # A digest of what the unit reads (file names and sizes, table rows): a rerun refuses to resume
    # a shard made from other content at the same position (a grown folder, an edited table).
    fingerprint: str | None = None


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _shard_samples(tar_path: Path) -> Iterator[RawSample]:
    from meissonic_cli.data.shards import iter_tar_groups

    n = 0
    seen: set[str] = set()
    try:
        for key, fields in iter_tar_groups(tar_path):
            n += 1
            lower = {k.lower(): v for k, v in fields.items()}
            image_ext = next((e for e in IMAGE_EXTS if e in lower), None)
            meta: dict[str, Any] = {}
            error = None
            if "json" in lower:
                try:
                    meta = parse_json(lower["json"].decode("utf-8"), f"{key}.json")
                except (UnicodeDecodeError, InputError) as err:  # invalid, nested too deep, a number too long
                    error = f"unreadable json: {err}"
            if image_ext is None and error is None:
                error = f"no image member (.{'/.'.join(IMAGE_EXTS)}); members: {', '.join(sorted(fields))}"
            caption = lower.get("txt", b"").decode("utf-8", errors="replace").strip()
            meta = meta if isinstance(meta, dict) else {"json": meta}
            if not caption:
                meta["no_caption"] = True
            yield RawSample(unique_key(safe_key(key), seen), lower.get(image_ext) if image_ext else None, caption,
                            meta, error)
    except (tarfile.TarError, EOFError, OSError) as err:
        yield RawSample(f"{safe_key(tar_path.stem)}__truncated", None, "", {},
                        f"input tar {tar_path.name} is damaged after {n} sample(s): {err}")


def _expected_count(tar_path: Path) -> int | None:
    # img2dataset writes NNNNN_stats.json beside each shard with the number of successes.
    stats = tar_path.with_name(tar_path.stem + "_stats.json")
    try:
        return int(parse_json(stats.read_text(), stats.name)["successes"])
    except (OSError, ValueError, KeyError, TypeError, InputError):  # InputError: invalid or nested too deep
        return None


def _folder_samples(root: Path, images: list[Path], keys: list[str], caption_key: str | None = None) -> Iterator[RawSample]:
    from meissonic_cli.data.tables import sidecar_caption

    for path, key in zip(images, keys):
        caption_path = path.with_suffix(".txt")
        meta_path = path.with_suffix(".json")
        meta: dict[str, Any] = {"path": str(path.relative_to(root))}
        error = None
        if meta_path.is_file():
            try:
                loaded = parse_json(meta_path.read_text(encoding="utf-8"), meta_path.name)
                meta = {**loaded, **meta} if isinstance(loaded, dict) else meta
            except (UnicodeDecodeError, InputError) as err:
                error = f"unreadable {meta_path.name}: {err}"
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip() if caption_path.is_file() else ""
        if not caption_path.is_file():  # else the caption in the .json sidecar, if it has one
            caption = sidecar_caption(meta, caption_key) or ""
        if not caption:
            meta["no_caption"] = True
        try:
            data = path.read_bytes()
        except OSError as err:
            data, error = None, f"cannot read {path.name}: {err}"
        yield RawSample(key, data, caption, meta, error)


def discover_units(input_path: str, shard_size: int = 1000, *, image_col: str | None = None,
                   caption_col: str | None = None, url_timeout: float = 10.0) -> tuple[str, list[WorkUnit]]:
    """Work units for `input_path`: ("webdataset", one per .tar), ("folder", chunks of images) or
    ("table", chunks of rows)."""
    from meissonic_cli.data.tables import TABLE_SUFFIXES, is_table

    if _is_glob(input_path):
        # Resolved: a shard's recorded source is the same whatever path or working directory named it.
        tars = sorted(Path(p).resolve() for p in glob(input_path) if p.endswith(".tar"))
        if not tars:
            raise InputError(f"no .tar files match {input_path}; run `meissonic download` first")
    else:
        path = Path(input_path)
        if not path.exists():
            raise InputError(f"input {path} does not exist; give image shards from `meissonic download`, an image "
                             "folder or a table of image paths and captions")
        path = path.resolve()
        if is_table(path):
            return "table", _table_units(path, shard_size, image_col, caption_col, url_timeout)
        if path.is_file():
            if path.suffix != ".tar":
                raise InputError(f"input {path} is neither a .tar shard nor a table ({', '.join(TABLE_SUFFIXES)})")
            tars = [path]
        else:
            tars = sorted(path.glob("*.tar"))
            if not tars:
                return "folder", _folder_units(path, shard_size, caption_col)
    check_image_shards(tars)
    units = [WorkUnit(i, str(t), (lambda t=t: _shard_samples(t)), _expected_count(t)) for i, t in enumerate(tars)]
    return "webdataset", units


def _table_units(path: Path, shard_size: int, image_col: str | None, caption_col: str | None,
                 url_timeout: float) -> list[WorkUnit]:
    from meissonic_cli.data.tables import caption_of, load_image_table, row_source

    table = load_image_table(path, image_col, caption_col)

    def samples(start: int, stop: int) -> Iterator[RawSample]:
        for i in range(start, stop):
            row = table.rows[i]
            image, load, meta, error = row_source(row, table, url_timeout)
            caption = caption_of(row, table)
            meta["row"] = i
            if not caption:
                meta["no_caption"] = True
            # Keys are row numbers: unique whatever the paths are, and a failure names its row.
            yield RawSample(f"row{i:09d}", image, caption, meta, error, load)

    units = []
    for index, start in enumerate(range(0, len(table.rows), shard_size)):
        stop = min(start + shard_size, len(table.rows))
        units.append(WorkUnit(index, f"{path} [{start}:{stop}]", (lambda a=start, b=stop: samples(a, b)), stop - start,
                              _digest(table.rows[start:stop])))
    return units


def _digest(items: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(items, sort_keys=True, default=lambda v: hashlib.sha256(v).hexdigest()
                                     if isinstance(v, (bytes, bytearray)) else str(v)).encode()).hexdigest()[:16]


def _folder_units(root: Path, shard_size: int, caption_key: str | None = None) -> list[WorkUnit]:
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not images:
        raise InputError(
            f"no .tar shards and no images (.{', .'.join(IMAGE_EXTS)}) in {root}; run `meissonic download` "
            "or point the input at a folder of images with same-stem .txt captions"
        )
    keys: list[str] = []
    seen: set[str] = set()
    for p in images:
        base = safe_key(str(p.relative_to(root).with_suffix("")))
        key, n = base, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    units = []
    for i, start in enumerate(range(0, len(images), shard_size)):
        chunk, chunk_keys = images[start:start + shard_size], keys[start:start + shard_size]
        source = f"{root} [{start}:{start + len(chunk)}]"
        digest = _digest([[str(p.relative_to(root)), p.stat().st_size] for p in chunk])
        units.append(WorkUnit(i, source, (lambda c=chunk, k=chunk_keys: _folder_samples(root, c, k, caption_key)),
                              len(chunk), digest))
    return units


__all__ = ["IMAGE_EXTS", "RawSample", "WorkUnit", "discover_units"]
