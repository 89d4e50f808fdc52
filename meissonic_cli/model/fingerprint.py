"""A short digest that tells model folders apart, for the sidecars of `sample` and `edit`.

A rerun into an output folder skips images that are already there; it must not count another
model's images as its own. The digest covers every config file of the folder in full and every
weight file by its size and sampled content (the first and last MiB and 16 slices in between), so it
costs milliseconds even for the 1B model's gigabytes, yet changes when the weights are retrained.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
_HEAD = 1 << 20
_SLICE = 1 << 16
_SLICES = 16
_cache: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path, size: int, h: "hashlib._Hash") -> None:
    with open(path, "rb") as f:
        if path.suffix.lower() not in WEIGHT_SUFFIXES or size <= 2 * _HEAD + _SLICES * _SLICE:
            h.update(f.read())
            return
        h.update(f.read(_HEAD))
        for i in range(1, _SLICES + 1):
            f.seek(_HEAD + (size - 2 * _HEAD) * i // (_SLICES + 1))
            h.update(f.read(_SLICE))
        f.seek(size - _HEAD)
        h.update(f.read(_HEAD))


def model_fingerprint(root: str | os.PathLike) -> str:
    """'sha256:<16 hex>' of the files under `root` (hidden files and folders skipped)."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _cache:
            one = hashlib.sha256()
            _file_digest(path, st.st_size, one)
            _cache[key] = one.hexdigest()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{_cache[key]}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()[:16]


__all__ = ["model_fingerprint"]
