"""`--suite fid`: FID of the scored images against a folder of real images or saved statistics.

Conventions (recorded in report.json under `fid`):
- which files count: `images.scored_images` on both sides (grids and report files excluded, and listed);
- `--fid-mode pytorch-fid` (default) equals pytorch-fid's `calculate_fid_given_paths`; `clean` equals
  clean-fid's `compute_fid(mode="clean")` (see `fid.py` for the two resize rules);
- the Inception weights are identified by their file's sha256, so two FIDs are comparable only when
  mode and digest agree.

A folder reference also writes `fid_reference_stats.npz` (mu, sigma and how they were made) to the
report folder; given back as `--reference`, it is checked against this run's mode and weights. An
`.npz` without that record (e.g. pytorch-fid's `--save-stats`) is used with a warning. A warning also
marks an FID from fewer than 2,048 images on a side: the covariance of N < 2048 features has rank
N - 1 < 2048, and such FIDs are biased upward and not comparable with published ones (10k-50k images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from meissonic_cli.atomic import atomic_write
from meissonic_cli.errors import InputError
from meissonic_cli.metrics.fid import (
    FEATURE_DIM,
    RESIZE_RULES,
    feature_stats,
    fid_from_features,
    file_digest,
    frechet_distance,
    inception_features,
    load_inception,
)
from meissonic_cli.metrics.images import scored_images

REFERENCE_STATS = "fid_reference_stats.npz"
MIN_IMAGES = FEATURE_DIM  # below this, the covariance is rank-deficient
CONVENTIONS = {"pytorch-fid": "pytorch-fid (calculate_fid_given_paths)", "clean": "clean-fid (compute_fid, mode='clean')"}


def _read_stats(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """mu, sigma and the provenance record (empty when the file has none)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
            meta = {k: data[k].item() for k in ("fid_mode", "inception_digest", "images") if k in data.files}
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: expected a .npz with 'mu' and 'sigma' (pytorch-fid statistics): {err}") from None
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise InputError(f"{path}: expected mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}) of Inception "
                         f"pool features, got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"{path}: mu or sigma holds NaN or infinite values")
    return mu, sigma, meta


def _write_stats(path: Path, features: np.ndarray, mode: str, digest: str) -> None:
    mu, sigma = feature_stats(features)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, fid_mode=np.array(mode), inception_digest=np.array(digest),
                     images=np.array(len(features)))

    atomic_write(path, save)


def _check_provenance(reference: Path, provenance: dict[str, Any], mode: str, digest: str, warnings: list[str]) -> None:
    if not provenance:
        warnings.append(f"--reference {reference.name} does not say how it was made (FID mode, Inception weights, "
                        f"image count): its FID is comparable only if it was computed with {CONVENTIONS[mode]} "
                        f"and pt_inception-2015-12-05 weights; a folder reference avoids the doubt")
        return
    if provenance.get("fid_mode") != mode:
        raise InputError(f"--reference {reference}: statistics made with --fid-mode {provenance.get('fid_mode')}; "
                         f"rerun with --fid-mode {provenance.get('fid_mode')} (FIDs of two modes differ)")
    if provenance.get("inception_digest") != digest:
        raise InputError(f"--reference {reference}: statistics made with other Inception weights "
                         f"({provenance.get('inception_digest')}, this run: {digest})")


def score_fid(items_paths: Sequence[Path], reference: Path, checkpoint: Path, *, mode: str, batch_size: int,
              device: Any, out: Path, add_task: Callable[[str, int], Callable[[int], None]]) -> dict[str, Any]:
    """The report.json `fid` entry: value, convention, counts, exclusions and warnings.

    `add_task(label, total)` returns the callback that advances a progress bar by n images.
    """
    digest = file_digest(checkpoint)
    model = load_inception(checkpoint, device)
    from meissonic_cli.metrics.report import open_rgb

    def features(paths: Sequence[Path], label: str) -> np.ndarray:
        return inception_features(model, paths, device, mode=mode, batch_size=batch_size, load=open_rgb,
                                  on_batch=add_task(label, len(paths)))

    generated_dir = items_paths[0].parent
    _, gen_excluded = scored_images(generated_dir)
    warnings: list[str] = []
    ref_excluded: Optional[list[str]] = None
    provenance: dict[str, Any] = {}
    if reference.is_file():  # checked before any image goes through the network
        mu, sigma, provenance = _read_stats(reference)
        _check_provenance(reference, provenance, mode, digest, warnings)
        value = frechet_distance(*feature_stats(features(items_paths, "FID features")), mu, sigma)
        n_ref = provenance.get("images")
    else:
        ref_paths, ref_excluded = scored_images(reference)
        if len(ref_paths) < 2:
            raise InputError(f"--reference {reference}: FID needs at least 2 reference images, found {len(ref_paths)}")
        generated = features(items_paths, "FID features")
        if reference.resolve() == generated_dir.resolve() and list(ref_paths) == list(items_paths):
            ref = generated  # the same folder: its features are already computed
        else:
            ref = features(ref_paths, "FID reference")
        value = fid_from_features(generated, ref)
        n_ref = len(ref_paths)
        _write_stats(out / REFERENCE_STATS, ref, mode, digest)
    counts = [("generated", len(items_paths))] + ([("reference", n_ref)] if isinstance(n_ref, int) else [])
    small = [f"{n} {side}" for side, n in counts if n < MIN_IMAGES]
    if small:
        warnings.append(f"FID from {' and '.join(small)} images: below {MIN_IMAGES:,} per side the feature covariance "
                        f"is rank-deficient and FID is biased upward; compare only FIDs of equal image counts "
                        f"(published FIDs use 10k-50k)")
    return {"value": value, "mode": mode, "convention": CONVENTIONS[mode], "resize": RESIZE_RULES[mode],
            "inception": {"weights": str(checkpoint), "digest": digest},
            "images": len(items_paths), "reference": str(reference), "reference_images": n_ref,
            "excluded": {"generated": gen_excluded, "reference": ref_excluded},
            **({"reference_stats": provenance} if reference.is_file() else {"reference_stats_written": REFERENCE_STATS}),
            "warnings": warnings}


__all__ = ["CONVENTIONS", "MIN_IMAGES", "REFERENCE_STATS", "score_fid"]
