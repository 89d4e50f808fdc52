"""Your own images as `tokenize` input: a table of image paths or URLs plus captions.

A table is one `.parquet`, `.csv`, `.tsv` or `.jsonl` file with a row per image:

- the image column (`--image-col`, default: the first of `IMAGE_CANDIDATES` present, any case)
  holds a local path — relative paths are relative to the table's folder, as in a Hugging Face
  `metadata.jsonl` — or an `http(s)://` URL, or the image bytes themselves (a binary column, or the
  `{"bytes", "path"}` struct a Hugging Face image column is stored as in parquet);
- the caption column (`--caption-col`, default: detected as `curate` does: `caption`, `text`, ...)
  holds the caption; an empty cell is kept as an image without caption and counted;
- every other column is kept in the sample's metadata, so `--score-key` (default `aesthetic`) and
  LAION's `WIDTH`/`HEIGHT` feed the micro-conditions as they do from shards.

URLs are fetched by `tokenize`'s decode threads, one request each with a timeout, no retries; a
failed fetch is one failed sample like a corrupt image, and a rerun fetches the unfinished output
shards' URLs again. Other schemes (`file://`, `s3://`, `ftp://`) are refused per row. For more than
a few thousand URLs use `meissonic download` first: it retries, resizes while fetching, and keeps
the bytes, so later runs never fetch again.
"""

from __future__ import annotations

import csv
import math
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from meissonic_cli.data.curate import ROLE_CANDIDATES, detect_columns
from meissonic_cli.errors import InputError
from meissonic_cli.safety import DEFAULT_URL_SCHEMES, max_member_bytes, url_scheme

if TYPE_CHECKING:
    import pyarrow as pa

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson")
# Names of the image column, in order of preference (compared case-insensitively); the URL names
# are curate's, so a curated LAION parquet works as a table too.
IMAGE_CANDIDATES: tuple[str, ...] = ("image", "image_path", "path", "file_name", "filename", "file",
                                     *ROLE_CANDIDATES["url"])
USER_AGENT = "meissonic-tokenize"


def is_table(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in TABLE_SUFFIXES


def read_table(path: Path) -> "pa.Table":
    """The whole table, whatever its format; `InputError` naming the file when it cannot be read."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            import pyarrow.csv as pacsv

            delimiter = "\t" if suffix == ".tsv" else ","
            with open(path, newline="", encoding="utf-8-sig") as f:
                names = next(csv.reader(f, delimiter=delimiter), [])
            # Every column as text: a caption of digits stays a caption, a path such as 0001.jpg keeps
            # its zeros; numbers in metadata are read back as numbers where they are used.
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                                  convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
        import pyarrow.json as pajson

        return pajson.read_json(path)
    except (pa.ArrowException, OSError, ValueError, csv.Error) as err:
        raise InputError(f"cannot read {path} as a {suffix[1:]} table ({err}); expected one row per image with an "
                         "image path or URL and a caption") from None


def find_column(present: list[str], override: str | None, candidates: tuple[str, ...], flag: str) -> str | None:
    """`override` (must be present) or the first candidate present; case-insensitive, exact case first."""
    lower: dict[str, list[str]] = {}
    for name in present:
        lower.setdefault(name.lower(), []).append(name)

    def find(name: str) -> str | None:
        options = lower.get(name.lower(), [])
        return name if name in options else (options[0] if options else None)

    if override:
        col = find(override)
        if col is None:
            raise InputError(f"{flag} {override!r} is not a column of the table; columns present: {', '.join(present)}")
        return col
    return next((c for c in map(find, candidates) if c is not None), None)


@dataclass
class ImageTable:
    """A table read for `tokenize`: the rows as dicts, and which columns hold the image and the caption."""

    path: Path
    rows: list[dict[str, Any]]
    image_col: str
    caption_col: str


def load_image_table(path: Path, image_col: str | None = None, caption_col: str | None = None) -> ImageTable:
    table = read_table(path)
    present = list(table.column_names)
    image = find_column(present, image_col, IMAGE_CANDIDATES, "--image-col")
    if image is None:
        raise InputError(f"{path} has no image column (looked for {', '.join(IMAGE_CANDIDATES)}); columns present: "
                         f"{', '.join(present)}; pass --image-col NAME")
    if caption_col:
        caption = find_column(present, caption_col, (), "--caption-col")
    else:
        caption = detect_columns([c for c in present if c != image], {}).get("caption")
    if caption is None:
        raise InputError(f"{path} has no caption column (looked for {', '.join(ROLE_CANDIDATES['caption'])}); columns "
                         f"present: {', '.join(present)}; pass --caption-col NAME")
    if table.num_rows == 0:
        raise InputError(f"{path} has no rows")
    return ImageTable(path, table.to_pylist(), image, caption)


def _clean(value: Any) -> Any:
    """A JSON-safe metadata value: NaN and infinities become null, bytes are left out."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def fetch_url(url: str, timeout: float) -> bytes:
    """One GET of an http(s) URL: its body, at most `safety.max_member_bytes()` bytes; raises on any failure."""
    if url_scheme(url) not in DEFAULT_URL_SCHEMES:
        raise ValueError(f"refusing to fetch {url!r}: only http and https URLs are fetched")
    limit = max_member_bytes()
    request = urllib.request.Request(url.strip(), headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - scheme checked above
        data = response.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{url} is over {limit:,} bytes (MEISSONIC_MAX_MEMBER_BYTES)")
    return data


def _read_file(path: Path, shown: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file {shown}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{shown} is a folder, not an image file") from None


def row_source(row: dict[str, Any], table: ImageTable, timeout: float) -> tuple[bytes | None, Callable[[], bytes] | None,
                                                                                 dict[str, Any], str | None]:
    """(image bytes now, or a loader for the decode threads, metadata, error) of one table row."""
    value = row.get(table.image_col)
    meta = {k: _clean(v) for k, v in row.items() if k not in (table.image_col, table.caption_col)}
    if isinstance(value, dict):  # a Hugging Face image struct: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            if value.get("path"):
                meta[table.image_col] = str(value["path"])
            return bytes(value["bytes"]), None, meta, None
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return (bytes(value), None, meta, None) if value else (None, None, meta, "empty image bytes")
    if value is None or not str(value).strip():
        return None, None, meta, f"no image: the {table.image_col} cell is empty"
    text = str(value).strip()
    meta[table.image_col] = text
    scheme = url_scheme(text)
    if scheme in DEFAULT_URL_SCHEMES:
        return None, (lambda: fetch_url(text, timeout)), meta, None
    if len(scheme) > 1:  # one letter is a Windows drive (C:\photos\x.jpg)
        return None, None, meta, (f"{scheme}:// URLs are not fetched (http and https only): give a local path, or "
                                  "fetch them with `meissonic download` first")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = table.path.parent / path
    return None, (lambda: _read_file(path, text)), meta, None


def caption_of(row: dict[str, Any], table: ImageTable) -> str:
    value = row.get(table.caption_col)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()


def sidecar_caption(meta: dict[str, Any], key: str | None) -> str | None:
    """The caption in an image's `.json` sidecar: under `key` (any case), else the first caption name present."""
    if not isinstance(meta, dict):
        return None
    present = [k for k in meta if isinstance(k, str)]
    found = find_column(present, None, (key,) if key else ("txt", *ROLE_CANDIDATES["caption"]), "--caption-col")
    value = meta.get(found) if found else None
    return str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


__all__ = ["IMAGE_CANDIDATES", "ImageTable", "TABLE_SUFFIXES", "caption_of", "fetch_url", "find_column", "is_table",
           "load_image_table", "read_table", "row_source", "sidecar_caption"]
