"""The token shard format: what `meissonic tokenize` writes and `meissonic train` reads.

A token dataset is one directory:

    dataset.json              settings shared by every shard (see below)
    tokens-00000.tar          a webdataset tar of samples
    tokens-00000.stats.json   written LAST: its presence is what makes tokens-00000.tar complete
    tokens-00001.tar
    ...

A tar without its stats file is incomplete (an interrupted run): readers ignore it and
`tokenize` redoes it. Tars are written under a temporary name and renamed into place, and the stats
file is written (atomically) only after the rename.

Each sample is a group of tar members named `<key>.<field>` (webdataset's convention: the key is
the member name up to the first dot of its base name, so keys contain no dots):

| field        | content                                                                  |
|--------------|--------------------------------------------------------------------------|
| `codes.npy`  | uint16 `(h, w)` VQ code grid                                             |
| `text.npy`   | float16 `(77, D)` penultimate CLIP hidden states (text mode `full` only) |
| `pooled.npy` | float16 `(P,)` projected pooled CLIP embedding (modes `full`, `pooled`)  |
| `micro.npy`  | float32 `(5,)` `[orig_width, orig_height, crop_top, crop_left, score]`   |
| `txt`        | the caption, utf-8                                                       |
| `json`       | the source sample's metadata (a JSON object)                             |

`.npy` members are plain `numpy.save` output (no pickles). `dataset.json` holds: `format`
("meissonic-tokens"), `version`, `resolution`, `grid` `[h, w]`, `text_features` (`full`, `pooled`
or `none`), `text_dim` (D), `pooled_dim` (P), `context_length`, `codebook_size`,
`downsample_factor`, `crop` and `models` (what produced the codes and the text features).

A shard's stats file holds `count` (samples written), `members` (tar members written), `failed` and
`failures` (per-sample errors: key and reason), `bytes` (tar size) and `source` (the input it came
from), plus counters from the tokenizer. The stats file is a claim: `verify_shard` checks the tar's
size and member count against it before a rerun skips the shard or training reads it.

Reading: `list_token_shards` lists complete shards in order; `read_token_shard(path, start)`
iterates one shard from a sample offset; `ShardStream` is the reader everything else uses (training,
tests, tools): a rank's share of the shards, seeded shuffling, epochs and an exactly resumable cursor.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from meissonic_cli.atomic import write_json
from meissonic_cli.errors import InputError
from meissonic_cli.readers import INT
from meissonic_cli.safety import open_tar_stream, read_member

if TYPE_CHECKING:  # numpy is imported where used: `meissonic --help` imports this module
    import numpy as np

FORMAT_NAME = "meissonic-tokens"
FORMAT_VERSION = 1
DATASET_INFO = "dataset.json"
SHARD_PREFIX = "tokens-"
STATS_SUFFIX = ".stats.json"
TEXT_MODES = ("full", "pooled", "none")
MICRO_FIELDS = ("orig_width", "orig_height", "crop_top", "crop_left", "score")


@dataclass
class TokenSample:
    """One training sample: a code grid, its text features and micro-conditions."""

    key: str
    codes: np.ndarray  # uint16 (h, w)
    micro: np.ndarray  # float32 (5,) = orig_width, orig_height, crop_top, crop_left, score
    caption: str = ""
    text: np.ndarray | None = None  # float16 (77, D), text mode "full"
    pooled: np.ndarray | None = None  # float16 (P,), text modes "full" and "pooled"
    meta: dict[str, Any] = field(default_factory=dict)


def shard_name(index: int) -> str:
    """`tokens-NNNNN.tar` for shard `index`."""
    return f"{SHARD_PREFIX}{index:05d}.tar"


def stats_path(shard: str | Path) -> Path:
    """The stats file that marks `tokens-NNNNN.tar` complete: `tokens-NNNNN.stats.json`."""
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(".tar")] + STATS_SUFFIX)


def is_complete(shard: str | Path) -> bool:
    return Path(shard).is_file() and stats_path(shard).is_file()


def safe_key(name: str) -> str:
    """A sample key webdataset readers group correctly: no dots, slashes or spaces."""
    out = "".join(c if (c.isalnum() or c in "-_") else "_" for c in name)
    return out or "_"


def _npy(array: np.ndarray) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class TokenShardWriter:
    """Writes one token shard: tar under a temporary name, rename, then the stats file last.

    Use as a context manager; on an exception nothing is left under the final names.
    """

    def __init__(self, directory: str | Path, index: int, source: str = ""):
        import webdataset as wds

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / shard_name(index)
        self.source = source
        self.count = 0
        self.members = 0
        self.failures: list[dict[str, str]] = []
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        # A fixed mtime makes a rerun produce byte-identical tars.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self._keys: set[str] = set()
        self._closed = False

    def write(self, sample: TokenSample) -> None:
        import numpy as np

        if sample.key != safe_key(sample.key):
            raise ValueError(f"sample key {sample.key!r} must be made with shards.safe_key")
        if sample.key in self._keys:
            raise ValueError(f"duplicate sample key {sample.key!r} in {self.path.name}")
        codes = np.asarray(sample.codes)
        if codes.ndim != 2 or codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"codes for {sample.key!r} must be a 2-D grid of ids in uint16 range")
        micro = np.asarray(sample.micro, dtype=np.float32)
        if micro.shape != (5,):
            raise ValueError(f"micro-conditions for {sample.key!r} must have shape (5,), got {micro.shape}")
        obj: dict[str, Any] = {
            "__key__": sample.key,
            "codes.npy": _npy(codes.astype(np.uint16)),
            "micro.npy": _npy(micro),
            "txt": sample.caption.encode("utf-8"),
            "json": json.dumps(sample.meta, sort_keys=True, default=str).encode("utf-8"),
        }
        if sample.text is not None:
            obj["text.npy"] = _npy(np.asarray(sample.text, dtype=np.float16))
        if sample.pooled is not None:
            obj["pooled.npy"] = _npy(np.asarray(sample.pooled, dtype=np.float16))
        self._tar.write(obj)
        self.members += len(obj) - 1  # every field but __key__ is one member
        self._keys.add(sample.key)
        self.count += 1

    def add_failure(self, key: str, reason: str) -> None:
        """Record a sample that could not be tokenized (it is listed in the stats file)."""
        self.failures.append({"key": key, "error": reason})

    def close(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the tar, move it into place and write the stats file; returns the stats."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        stats = {
            "shard": self.path.name,
            "source": self.source,
            "count": self.count,
            "members": self.members,
            "failed": len(self.failures),
            "failures": self.failures,
            "bytes": self.path.stat().st_size,
            **(extra_stats or {}),
        }
        write_json(stats_path(self.path), stats, sort_keys=True)
        self._closed = True
        return stats

    def abort(self) -> None:
        """Drop the partial tar; the shard stays incomplete."""
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
        except Exception:  # the stream may already be broken; we are discarding it anyway
            pass
        self._file.close()
        if self._tmp.exists():
            self._tmp.unlink()

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def remove_stale_temp_files(directory: str | Path, index: int) -> None:
    """Delete temporary tars an interrupted writer of shard `index` left behind."""
    prefix = f".{shard_name(index)}.tmp-"
    for p in Path(directory).glob(prefix + "*"):
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reading


def _missing_hint(directory: Path) -> str:
    return f"run `meissonic tokenize --out {directory}` first"


def list_token_shards(directory: str | Path) -> list[Path]:
    """Complete shards (those with a stats file) of a token dataset, sorted by name; a shard that does
    not hold what its stats file claims (`verify_shard`) is an error naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"token dataset {directory} does not exist; {_missing_hint(directory)}")
    shards = sorted(p for p in directory.glob(f"{SHARD_PREFIX}*.tar") if stats_path(p).is_file())
    if not shards:
        raise InputError(
            f"no complete token shards (tokens-NNNNN.tar with its .stats.json) in {directory}; {_missing_hint(directory)}"
        )
    for shard in shards:
        damage = verify_shard(shard)
        if damage:
            raise InputError(f"{directory}: {damage}; rerun `meissonic tokenize` with the same settings to redo it")
    return shards


# The shapes of the two JSON files of a token dataset (`readers.check_shape`).
DATASET_SCHEMA: dict[str, Any] = {
    "format": str, "version": INT, "resolution": INT, "grid": list, "downsample_factor": INT, "codebook_size": INT,
    "text_features": str, "text_dim": (INT, None), "pooled_dim": (INT, None), "context_length": INT,
    "crop": str, "models": dict, "micro_conditions": list, "input": str, "input_kind": str,
}
STATS_SCHEMA: dict[str, Any] = {"shard": str, "source": (str, None), "count": INT, "members": INT, "failed": INT,
                                "failures": list, "bytes": INT, "input_fingerprint": (str, None)}


def read_dataset_info(directory: str | Path) -> dict[str, Any]:
    """The token dataset's `dataset.json`, its shape checked (`DATASET_SCHEMA`)."""
    from meissonic_cli.readers import read_json_object

    path = Path(directory) / DATASET_INFO
    if not path.is_file():
        raise InputError(f"{path} not found: not a token dataset; {_missing_hint(Path(directory))}")
    info = read_json_object(path, "token dataset settings", DATASET_SCHEMA, required=("format",))
    if info.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: format is {info.get('format')!r}, expected {FORMAT_NAME!r}")
    grid = info.get("grid")
    if grid is not None and not (len(grid) == 2 and all(isinstance(g, int) and not isinstance(g, bool) and 0 < g
                                                        for g in grid)):
        raise InputError(f"{path}: 'grid' must be [height, width] in codes, got {grid!r}")
    return info


def write_dataset_info(directory: str | Path, info: dict[str, Any]) -> None:
    """Write `dataset.json` atomically (every rank may write the same content)."""
    write_json(Path(directory) / DATASET_INFO, info, sort_keys=True)


def read_shard_stats(shard: str | Path) -> dict[str, Any]:
    """The stats file of a complete shard, its shape checked (`STATS_SCHEMA`)."""
    from meissonic_cli.readers import read_json_object

    path = stats_path(shard)
    if not path.is_file():
        raise InputError(f"{shard} is incomplete (no {path.name}); rerun `meissonic tokenize` to finish it")
    return read_json_object(path, "shard stats", STATS_SCHEMA, required=("count", "bytes"))


def verify_shard(shard: str | Path) -> str | None:
    """Why the complete-looking `shard` does not hold what its stats file claims (None when it does):
    the tar's size must equal `bytes`, and its members `members` (or, for stats without it, its
    samples `count`). A tar that ends early or is cut fails one of the two."""
    shard = Path(shard)
    stats = read_shard_stats(shard)
    size = shard.stat().st_size
    if size != stats["bytes"]:
        return f"{shard.name} is {size:,} bytes, its stats file records {stats['bytes']:,}"
    members, keys = 0, set()
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                members += 1
                keys.add(split_member_name(member.name)[0])
    except (tarfile.TarError, EOFError, OSError) as err:
        return f"{shard.name} is not a readable tar ({err})"
    if "members" in stats and members != stats["members"]:
        return f"{shard.name} holds {members} members, its stats file records {stats['members']}"
    if len(keys) != stats["count"]:
        return f"{shard.name} holds {len(keys)} samples, its stats file records {stats['count']}"
    return None


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/key.field.ext` -> (`dir/key`, `field.ext`), webdataset's grouping rule."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), (ext if dot else "")


def iter_tar_groups(path: str | Path, max_member_bytes: int | None = None,
                    allow_compressed: bool | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {field: bytes})` for consecutive members of a tar sharing a key.

    Raises `tarfile.TarError` (or `EOFError`) if the tar is truncated; the groups read before
    the damage have been yielded by then. A compressed tar, or a member over `max_member_bytes`
    (default `safety.max_member_bytes()`), raises `InputError` (see `meissonic_cli.safety`).
    """
    with open_tar_stream(path, allow_compressed) as tar:
        key: str | None = None
        group: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_member_name(member.name)
            data = read_member(tar, member, path, max_member_bytes)
            if k != key:
                if key is not None:
                    yield key, group
                key, group = k, {}
            group[ext] = data
        if key is not None:
            yield key, group


def _load_npy(data: bytes) -> np.ndarray:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def _load_field(fields: dict[str, bytes], name: str, key: str, source: str) -> np.ndarray:
    """One .npy member; pickled (object) or unreadable arrays are refused, never unpickled, and so are
    floating-point arrays holding NaN or infinity (`tokenize` never writes them: the file was damaged)."""
    import numpy as np

    try:
        array = _load_npy(fields[name])
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{source}: sample {key!r} has an unreadable {name} ({str(e).splitlines()[0]}); "
                         "not a token shard written by `meissonic tokenize`") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{source}: sample {key!r} has non-finite values (NaN or infinity) in {name}; the shard is "
                         "damaged: re-run `meissonic tokenize` for it, or remove it and its .stats.json")
    return array


def decode_sample(key: str, fields: dict[str, bytes], source: str = "") -> TokenSample:
    """Turn one tar group into a `TokenSample`."""
    if "codes.npy" not in fields or "micro.npy" not in fields:
        raise InputError(f"{source}: sample {key!r} lacks codes.npy or micro.npy; not a token shard")
    return TokenSample(
        key=key,
        codes=_load_field(fields, "codes.npy", key, source),
        micro=_load_field(fields, "micro.npy", key, source),
        caption=fields.get("txt", b"").decode("utf-8"),
        text=_load_field(fields, "text.npy", key, source) if "text.npy" in fields else None,
        pooled=_load_field(fields, "pooled.npy", key, source) if "pooled.npy" in fields else None,
        meta=json.loads(fields["json"]) if fields.get("json") else {},
    )


def read_token_shard(path: str | Path, start: int = 0) -> Iterator[TokenSample]:
    """Samples of one shard in order, skipping the first `start` (to resume mid-shard)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"token shard {path} not found")
    try:
        for i, (key, fields) in enumerate(iter_tar_groups(path)):
            if i >= start:
                yield decode_sample(key, fields, str(path))
    except (tarfile.TarError, EOFError) as err:
        raise InputError(f"{path}: damaged tar ({err}); delete it and its stats file and rerun `meissonic tokenize`") from None


def rank_shards(shards: list[Path], rank: int = 0, world_size: int = 1) -> list[Path]:
    """The shards rank `rank` of `world_size` reads: every `world_size`-th, starting at `rank`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
    mine = shards[rank::world_size]
    if not mine:
        raise InputError(
            f"{len(shards)} token shard(s) cannot feed {world_size} ranks; tokenize into at least {world_size} shards "
            "or train on fewer ranks"
        )
    return mine


@dataclass
class DataCursor:
    """Where a stream continues: epoch, position in that epoch's shard order, samples taken from that shard."""

    epoch: int = 0
    position: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "offset": self.offset}


class ShardStream:
    """The one reader of token datasets: an exactly resumable stream of samples over a list of shards.

    Each epoch visits the shards in a seeded order and each shard's samples in a seeded order (a
    whole shard is read into memory for that); the next shard is read in a background thread.
    The cursor always points at the next sample, so a checkpoint taken between batches resumes at
    the same sample. Endless by default (training); `epochs=1` reads every sample once and stops.
    `ShardStream.open(directory, rank=, world_size=)` streams one rank's share of a dataset.
    """

    def __init__(self, shards: list[Path], *, seed: int = 0, shuffle: bool = False, cursor: DataCursor | None = None,
                 epochs: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.shards = list(shards)
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.cursor = cursor or DataCursor()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self._loaded: dict[tuple[int, int], Any] = {}

    @classmethod
    def open(cls, directory: str | Path, *, rank: int = 0, world_size: int = 1, **kwargs: Any) -> "ShardStream":
        """Stream rank `rank`'s share (see `rank_shards`) of the complete shards in `directory`."""
        return cls(rank_shards(list_token_shards(directory), rank, world_size), **kwargs)

    def _order(self, epoch: int) -> list[int]:
        import numpy as np

        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        return order

    def _read(self, epoch: int, position: int) -> list[TokenSample]:
        import numpy as np

        index = self._order(epoch)[position]
        samples = list(read_token_shard(self.shards[index]))
        if self.shuffle:
            # Shuffle from key order, not file order: img2dataset writes a shard's images in the order
            # their downloads finish, so the same data would otherwise train in another order each time.
            samples.sort(key=lambda sample: sample.key)
            perm = np.random.default_rng([self.seed, epoch, index, 1]).permutation(len(samples))
            samples = [samples[i] for i in perm]
        return samples

    def _following(self, epoch: int, position: int) -> tuple[int, int]:
        return (epoch, position + 1) if position + 1 < len(self.shards) else (epoch + 1, 0)

    def _finished(self, epoch: int) -> bool:
        return self.epochs is not None and epoch >= self.epochs

    def _get(self, key: tuple[int, int]) -> Any:
        if key not in self._loaded:
            self._loaded[key] = self._pool.submit(self._read, *key)
        return self._loaded[key]

    def __next__(self) -> TokenSample:
        empty_in_a_row = 0
        while True:
            c = self.cursor
            if not self.shards or self._finished(c.epoch):
                self.close()
                raise StopIteration
            key = (c.epoch, c.position)
            samples = self._get(key).result()
            following = self._following(*key)
            if not self._finished(following[0]):
                self._get(following)  # prefetch
            if c.offset < len(samples):
                sample = samples[c.offset]
                c.offset += 1
                if c.offset >= len(samples):
                    self._advance()
                return sample
            empty_in_a_row += 1
            if self.epochs is None and empty_in_a_row > len(self.shards):
                raise InputError(f"every token shard of this rank is empty ({self.shards[0].parent}); rerun `meissonic tokenize`")
            self._advance()

    def __iter__(self) -> Iterator[TokenSample]:
        return self

    def cursor_record(self) -> dict[str, Any]:
        """The cursor plus the name of the shard it points into, for a checkpoint's data_cursor.json."""
        shard = self.shards[self._order(self.cursor.epoch)[self.cursor.position]]
        return {**self.cursor.to_dict(), "shard": shard.name}

    def _advance(self) -> None:
        c = self.cursor
        self._loaded.pop((c.epoch, c.position), None)
        c.epoch, c.position = self._following(c.epoch, c.position)
        c.offset = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ShardStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = [
    "DATASET_INFO",
    "DataCursor",
    "ShardStream",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MICRO_FIELDS",
    "TEXT_MODES",
    "TokenSample",
    "TokenShardWriter",
    "is_complete",
    "verify_shard",
    "iter_tar_groups",
    "decode_sample",
    "list_token_shards",
    "rank_shards",
    "read_dataset_info",
    "read_shard_stats",
    "read_token_shard",
    "remove_stale_temp_files",
    "safe_key",
    "shard_name",
    "split_member_name",
    "stats_path",
    "write_dataset_info",
]
