"""Checks on the inputs and outputs of the data stages, before anything is written.

Output folders: `staging_folder` gives a sibling temporary folder that is removed on exit (and by
the next run if this one is killed); `check_output_parent` refuses an output under an existing file.

Image shards `tokenize` reads, checked before any model loads:

- A compressed tar is refused (a small gzip can expand to gigabytes; `safety.open_tar_stream`).
- A shard that img2dataset has not finished is refused: img2dataset writes `NNNNN_stats.json`
  after closing `NNNNN.tar`, so in a folder it wrote (one with `_stats.json` files or our
  `_meissonic/` state) a tar without its stats file is still being written, or was cut off. Reading
  it would mark a token shard complete with a fraction of its samples, and reruns would skip it.
- Keys that collide after `shards.safe_key` (`a b` and `a_b`) get `_1`, `_2`, ... as image folders do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from meissonic_cli.atomic import remove_stale_temporaries
from meissonic_cli.errors import InputError, OutputExistsError
from meissonic_cli.safety import COMPRESSED_ENV, compressed_tars_allowed, compression_of

if TYPE_CHECKING:
    import pyarrow as pa

# The state folder `meissonic download` keeps in its output (download.STATE_DIR).
DOWNLOAD_STATE = "_meissonic"


def check_output_parent(out: Path, flag: str) -> None:
    """Refuse an output path under an existing file (e.g. `-o notes.txt/out`)."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"{flag} {out}: {parent} is a file, not a folder; give another {flag}")
            return


def check_output_apart(out: Path, inputs: Iterable[str], files: Iterable[Path], flag: str = "--out") -> None:
    """Refuse an output folder that is, holds or sits inside an input: replacing it (--overwrite) would
    delete the input, and a rerun would read the output as input."""
    where = out.resolve()
    for file in files:
        if where in Path(file).resolve().parents:
            raise InputError(f"{flag} {out} holds the input {file}; --overwrite would delete it: choose an {flag} "
                             "outside the inputs")
    for item in inputs:
        folder = Path(item)
        if folder.is_dir() and (folder.resolve() == where or folder.resolve() in where.parents):
            raise InputError(f"{flag} {out} is inside the input folder {item}; a rerun would read its own output: "
                             f"choose an {flag} outside the inputs")


@contextlib.contextmanager
def staging_folder(out: Path, flag: str = "--out") -> Iterator[Path]:
    """A fresh `.NAME.tmp-PID-N` folder beside `out` (removed on exit, whatever happens; one left by
    a killed run is removed by the next, see `atomic.remove_stale_temporaries`)."""
    check_output_parent(out, flag)
    remove_stale_temporaries(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise InputError(f"cannot write beside {flag} {out}: {err.strerror or err}") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stats_file(tar: Path) -> Path:
    """img2dataset's stats file of a shard: NNNNN.tar -> NNNNN_stats.json."""
    return tar.with_name(tar.stem + "_stats.json")


def _written_by_img2dataset(folder: Path) -> bool:
    return (folder / DOWNLOAD_STATE).is_dir() or any(folder.glob("*_stats.json"))


def check_image_shards(tars: Iterable[Path]) -> None:
    """Refuse compressed tars and shards img2dataset has not finished (`InputError` naming the file)."""
    allowed = compressed_tars_allowed()
    folders: dict[Path, bool] = {}
    for tar in tars:
        try:
            kind = compression_of(tar)
        except OSError as err:
            raise InputError(f"cannot read input shard {tar}: {err.strerror or err}") from None
        if kind is not None and not allowed:
            raise InputError(f"{tar} is a {kind}-compressed tar; image shards must be plain tars (a small compressed "
                             f"file can expand to gigabytes). Decompress it, or set {COMPRESSED_ENV}=1 if it is trusted")
        folder = tar.parent
        if folder not in folders:
            folders[folder] = _written_by_img2dataset(folder)
        if folders[folder] and not stats_file(tar).is_file():
            raise InputError(f"{tar} has no {stats_file(tar).name}: img2dataset has not finished it (the download is "
                             "still running or was interrupted); rerun `meissonic download` until it completes, then "
                             "tokenize")


def unique_key(base: str, seen: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... when taken; records the result in `seen`."""
    key, n = base, 1
    while key in seen:
        key, n = f"{base}_{n}", n + 1
    seen.add(key)
    return key


__all__ = ["check_image_shards", "check_output_parent", "staging_folder", "stats_file", "unique_key", "url_scheme_mask"]


def url_scheme_mask(urls: "pa.ChunkedArray | pa.Array", schemes: Iterable[str]) -> tuple["pa.Array", dict[str, int]]:
    """(mask of the URLs whose scheme is in `schemes`, {scheme: count} of the non-empty URLs refused).

    A URL without a scheme counts under '(none)'. Only the listed schemes reach img2dataset: by
    default http and https, so a `file://` URL cannot read local files and `ftp://` goes nowhere.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.fill_null(urls.cast(pa.string()), "")
    found = pc.extract_regex(text, r"^\s*(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):")
    scheme = pc.utf8_lower(pc.struct_field(found, [0]))
    ok = pc.fill_null(pc.is_in(scheme, value_set=pa.array(sorted(set(schemes)), pa.string())), False)
    refused = pc.and_(pc.invert(ok), pc.not_equal(pc.utf8_length(text), 0))
    counts: dict[str, int] = {}
    for item in pc.value_counts(pc.fill_null(pc.filter(scheme, refused), "(none)")).to_pylist():
        counts[str(item["values"])] = int(item["counts"])
    return ok, counts
