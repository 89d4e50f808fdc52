"""Which files of a folder `meissonic eval` scores: one rule for generated images and FID references alike.

A folder's images to score are its regular, non-hidden files with an image suffix (`IMAGE_SUFFIXES`),
except files that are not samples: the grids `sample --grid` and `eval` write (`NON_SAMPLE_NAMES`).
Sub-folders are not searched (pytorch-fid does not either). Everything else in the folder that is not
an image's `NAME.json` sidecar (report.json, report.md, notes, grids) is listed as excluded, and
report.json records that list for each side of an FID.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Images that sample/edit/eval write beside the samples and that are not samples themselves.
NON_SAMPLE_NAMES = ("grid.png",)


def scored_images(folder: Path) -> tuple[list[Path], list[str]]:
    """(images to score, sorted; names of the other files, sidecars of scored images left out)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in NON_SAMPLE_NAMES]
    kept = {p.name for p in images} | {p.with_suffix(".json").name for p in images}
    excluded = [p.name for p in files if p.name not in kept]
    return images, excluded


__all__ = ["IMAGE_SUFFIXES", "NON_SAMPLE_NAMES", "scored_images"]
