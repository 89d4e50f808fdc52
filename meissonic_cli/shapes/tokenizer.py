"""The demo's tokenizer: a `PatchVQ` fit on rendered shapes-world scenes in seconds.

`fit_patch_vq` here is `meissonic_cli.model.vq.patch.fit_patch_vq` with the shapes palette and
background filled in; `fit_demo_vq` fits one and saves it as a `vqvae/` folder.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from meissonic_cli.atomic import atomic_directory
from meissonic_cli.errors import ConfigError, OutputExistsError
from meissonic_cli.model.vq import patch
from meissonic_cli.model.vq.patch import PatchVQ
from meissonic_cli.shapes import world as shapes

# Training images drawn large then shrunk (bilinear, antialiased), as the tokenize stage shrinks
# the synthetic source's 96-512 px images: their soft edges need geometries of their own.
SOFT_SCALES: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 5.0, 8.0)


def fit_patch_vq(images: torch.Tensor, **kwargs: Any) -> tuple[PatchVQ, dict[str, Any]]:
    """`patch.fit_patch_vq` for shapes-world images: colours default to the shapes palette, the
    background to the shapes background."""
    kwargs.setdefault("colours", [shapes.PALETTE[c] for c in shapes.COLOURS])
    kwargs.setdefault("background", shapes.BACKGROUND)
    return patch.fit_patch_vq(images, **kwargs)


def demo_images(num_images: int, image_size: int = 64, seed: int = 0, soft_fraction: float = 0.5) -> torch.Tensor:
    """Random shapes scenes `(N, 3, S, S)` in [0, 1]: crisp renders, and a `soft_fraction` of them
    drawn at a `SOFT_SCALES` multiple of the size and shrunk (bilinear, antialiased) like the
    tokenize stage shrinks the synthetic source."""
    from PIL import Image

    from meissonic_cli.model.vq import images_to_tensor

    rng = random.Random(seed)
    images = []
    for _ in range(num_images):
        scene = shapes.sample_scene(rng)
        if rng.random() < soft_fraction:
            side = round(image_size * rng.choice(SOFT_SCALES))
            images.append(shapes.render(scene, side).resize((image_size, image_size), Image.BILINEAR))
        else:
            images.append(shapes.render(scene, image_size))
    return images_to_tensor(images)


def fit_demo_vq(out_folder: str | os.PathLike, image_size: int = 64, seed: int = 0, num_images: int = 3000,
                time_budget_s: float = 45.0, *, patch_size: int = 8, codebook_size: int = 1024,
                soft_fraction: float = 0.5, held_out: int = 256, overwrite: bool = False,
                show_progress: bool = False) -> dict[str, Any]:
    """Fit the demo's tokenizer on `num_images` rendered scenes and save it as a VQ folder at `out_folder`.

    PSNR is measured on `held_out` scenes the fit never saw: `psnr` on crisp renders at
    `image_size`, `psnr_resized` on scenes shrunk from larger renders. The k-means stops early once
    `time_budget_s` (counted from the call) is spent. An existing non-empty `out_folder` is kept
    unless `overwrite`; the folder is written next to it and renamed into place.
    Returns `{psnr, psnr_resized, seconds, codebook_size, grid, image_size, patch_size, num_images,
    kmeans_iterations, converged, folder}`.
    """
    from meissonic_cli.model.vq import psnr

    start = time.monotonic()
    out = Path(out_folder)
    problems = []
    if image_size <= 0 or image_size % patch_size:
        problems.append(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
    if num_images < 1 or held_out < 1:
        problems.append(f"num_images ({num_images}) and held_out ({held_out}) must be at least 1")
    if not 0.0 <= soft_fraction <= 1.0:
        problems.append(f"soft_fraction {soft_fraction} must lie in [0, 1]")
    if problems:
        raise ConfigError(problems)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; pick another folder or pass overwrite=True")

    train = demo_images(num_images, image_size, seed, soft_fraction)
    vq, stats = fit_patch_vq(train, patch_size=patch_size, codebook_size=codebook_size, seed=seed,
                             deadline=start + time_budget_s, show_progress=show_progress)
    # Held-out streams are seeded apart from the training stream so no scene repeats by construction.
    crisp = demo_images(held_out, image_size, seed + 1_000_003, soft_fraction=0.0)
    soft = demo_images(held_out, image_size, seed + 2_000_003, soft_fraction=1.0)
    result: dict[str, Any] = {
        "psnr": psnr(vq.decode(vq.encode(crisp)), crisp),
        "psnr_resized": psnr(vq.decode(vq.encode(soft)), soft),
        "codebook_size": vq.codebook_size,
        "grid": list(vq.grid_size(image_size, image_size)),
        "image_size": image_size,
        "patch_size": patch_size,
        "num_images": num_images,
        "soft_fraction": soft_fraction,
        "seed": seed,
        "kmeans_iterations": stats["kmeans_iterations"],
        "converged": stats["converged"],
    }
    vq.fit_info = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}

    with atomic_directory(out) as tmp:
        vq.save_pretrained(tmp)
    result["seconds"] = time.monotonic() - start
    result["folder"] = str(out)
    return result


__all__ = ["SOFT_SCALES", "demo_images", "fit_demo_vq", "fit_patch_vq"]
