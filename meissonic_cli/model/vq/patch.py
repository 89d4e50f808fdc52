"""A learned patch codebook behind the VQ tokenizer interface: the demo's tokenizer, fit in seconds.

The demo has no VQ weights and no time to train a VQ-GAN on CPU (a tiny diffusers `VQModel` makes
about 20 optimiser steps in 90 s on two busy cores and reconstructs at ~14 dB). Shapes-world images
need far less: an f x f patch is the background, one flat palette colour, or an edge between one
colour and the background. So a code is (colour, geometry), where a geometry is an f x f alpha
mask learned by k-means over the edge patches of rendered scenes, and entry
`bg + alpha * (colour - bg)` of the codebook is that patch in RGB:

    code 0                               the background
    code 1 + c * (G + 1)                 colour c, solid
    code 1 + c * (G + 1) + 1 + g         colour c over the background through geometry g

With 6 colours and `codebook_size` 1024 that is G = 169 geometries and 1021 codes; at 64 px and
f = 8 (an 8 x 8 token grid) held-out PSNR is ~28.7 dB, fitted in 5-20 s on two shared cores.

`PatchVQ` itself knows nothing of shapes: it holds K RGB patches; `encode` picks the nearest
patch in RGB (so JPEG'd or resized inputs still map to the closest code), `decode` tiles them.
It has the `VQTokenizer` interface (`encode`, `decode`, `grid_size`, `downsample_factor`,
`codebook_size`, `from_pretrained`, `save_pretrained`) and saves as a `vqvae/` folder with
`config.json` (`"_class_name": "PatchVQ"`) + `patch_vq.safetensors`; `meissonic_cli.model.vq.load_vq` loads
either kind. `meissonic_cli.shapes.tokenizer` fits one on shapes-world scenes for the demo.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from meissonic_cli.atomic import atomic_write, write_json
from meissonic_cli.config import read_json_object
from meissonic_cli.errors import ConfigError, InputError, ModelFormatError
from meissonic_cli.model.vq.base import CodeGrid
from meissonic_cli.progress import make_progress

PATCH_VQ_CLASS = "PatchVQ"
PATCH_VQ_CONFIG = "config.json"
PATCH_VQ_WEIGHTS = "patch_vq.safetensors"
# A patch whose alpha stays within this of 0 or 1 everywhere is background or solid, not an edge.
_EDGE_EPS = 0.02
_ENCODE_CHUNK = 8192
_ALPHA_LEVELS = 64


class PatchVQ(CodeGrid, nn.Module):
    """Images in [0, 1] <-> grids of codes, each code one f x f RGB patch of a fixed codebook."""

    force_upcast = True  # float32 always: the codebook is tiny and half precision would move ties

    def __init__(self, codebook: torch.Tensor, fit_info: dict[str, Any] | None = None):
        super().__init__()
        if codebook.ndim != 4 or codebook.shape[1] != 3 or codebook.shape[2] != codebook.shape[3]:
            raise ModelFormatError(f"a PatchVQ codebook is (K, 3, f, f); got {tuple(codebook.shape)}")
        self.register_buffer("codebook", codebook.detach().float().contiguous())
        self.downsample_factor: int = int(codebook.shape[2])
        self.codebook_size: int = int(codebook.shape[0])
        self.fit_info: dict[str, Any] = dict(fit_info or {})

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    @property
    def config(self) -> dict[str, Any]:
        return {"_class_name": PATCH_VQ_CLASS, "patch_size": self.downsample_factor,
                "codebook_size": self.codebook_size, "fit": self.fit_info}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices int64 `(B, H/f, W/f)` for float images `(B, 3, H, W)` in [0, 1]: the nearest patch in RGB."""
        h, w = self._grid_of_images(images)
        patches = _to_patches(images.to(self.device, torch.float32), self.downsample_factor).flatten(1)
        if not len(patches):
            return torch.zeros(images.shape[0], h, w, dtype=torch.long, device=self.device)
        return _nearest(patches, self.codebook.flatten(1)).long().reshape(images.shape[0], h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, mode: str = "whole") -> torch.Tensor:
        """Float images `(B, 3, h*f, w*f)` in [0, 1] for code grids `(B, h, w)`: the codebook patches, tiled.
        `mode` (`--vq-decode`): each patch is decoded on its own already, so only auto and whole apply."""
        from meissonic_cli.model.vq_decode import vq_decode_for

        self._check_codes(codes)
        vq_decode_for(self, codes.shape[1] * self.downsample_factor, codes.shape[2] * self.downsample_factor, mode)
        b, h, w = codes.shape
        f = self.downsample_factor
        tiles = self.codebook[codes.to(self.device).long()]  # (B, h, w, 3, f, f)
        return tiles.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * f, w * f).clamp(0, 1)

    # ----- loading and saving

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> "PatchVQ":
        """Load a PatchVQ folder, or a model root holding `vqvae/`. `dtype` is accepted and ignored (always float32)."""
        from meissonic_cli.model.state_io import read_safetensors

        folder = Path(folder)
        if (folder / "vqvae").is_dir():
            folder = folder / "vqvae"
        config_path, weights_path = folder / PATCH_VQ_CONFIG, folder / PATCH_VQ_WEIGHTS
        config = read_json_object(config_path, f"{folder}: expected {PATCH_VQ_CONFIG} (a PatchVQ config); fit one "
                                               f"with patch_vq.fit_demo_vq")
        if config.get("_class_name") != PATCH_VQ_CLASS:
            raise ModelFormatError(f"{config_path}: _class_name is {config.get('_class_name')!r}, expected {PATCH_VQ_CLASS!r}")
        if not weights_path.is_file():
            raise ModelFormatError(f"{folder}: expected {PATCH_VQ_WEIGHTS} next to {PATCH_VQ_CONFIG}")
        tensors = read_safetensors(weights_path)
        codebook = tensors.get("codebook")
        f, k = config.get("patch_size"), config.get("codebook_size")
        if codebook is None or tuple(codebook.shape) != (k, 3, f, f):
            got = None if codebook is None else tuple(codebook.shape)
            raise ModelFormatError(f"{weights_path}: expected a 'codebook' tensor of shape ({k}, 3, {f}, {f}) "
                                   f"as config.json says, got {got}")
        return cls(codebook, config.get("fit") or {}).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` + `patch_vq.safetensors` into `folder` (each file atomically)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        codebook = {"codebook": self.codebook.detach().cpu().contiguous()}
        atomic_write(folder / PATCH_VQ_WEIGHTS, lambda tmp: save_file(codebook, tmp))
        write_json(folder / PATCH_VQ_CONFIG, self.config)


def _to_patches(images: torch.Tensor, f: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B * H/f * W/f, 3, f, f), row-major over the grid."""
    b, c, h, w = images.shape
    return images.reshape(b, c, h // f, f, w // f, f).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, f, f)


# ----- fitting


def _alpha_masks(patches: torch.Tensor, colours: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Alpha `(n, f*f)` in [0, 1] for patches `(n, 3, f, f)`.

    A patch's colour is the one most of its pixels are nearest to (background aside); alpha is
    each pixel's position on the line from the background to that colour.
    """
    n, _, f, _ = patches.shape
    pixels = patches.permute(0, 2, 3, 1).reshape(n, f * f, 3)
    refs = torch.cat([background[None], colours])
    nearest = torch.cdist(pixels.reshape(-1, 3), refs).argmin(1).reshape(n, f * f)
    votes = torch.zeros(n, len(refs)).scatter_add_(1, nearest, torch.ones_like(nearest, dtype=torch.float32))
    colour = votes[:, 1:].argmax(1)
    direction = colours[colour] - background  # (n, 3)
    alpha = ((pixels - background) * direction[:, None]).sum(-1) / (direction * direction).sum(-1)[:, None]
    return alpha.clamp(0, 1)


def _nearest(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for each point: argmin |x - c|^2 = argmin (|c|^2 - 2 x.c)."""
    centre_sq = (centres * centres).sum(1)
    return torch.cat([(centre_sq - 2 * chunk @ centres.T).argmin(1) for chunk in points.split(_ENCODE_CHUNK)])


def _kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, generator: torch.Generator, max_iterations: int,
            deadline: float | None, progress: Any = None) -> tuple[torch.Tensor, int, bool]:
    """Weighted k-means: k-means++ seeding, then Lloyd steps until assignments stop changing,
    `max_iterations`, or `deadline`. Returns (centroids (k, D), Lloyd steps run, converged).
    At least one Lloyd step always runs."""
    sq = (points * points).sum(1)

    def dist_to(i: int) -> torch.Tensor:
        return (sq - 2 * (points @ points[i]) + sq[i]).clamp_(min=0)

    first = int(torch.multinomial(weights, 1, generator=generator)[0])
    centroids = [points[first]]
    closest = dist_to(first)
    for _ in range(1, k):
        # D^2 sampling: far-away patches are likely seeds, so rare edge shapes get their own code.
        cumulative = torch.cumsum(closest * weights, 0)
        target = torch.rand(1, generator=generator) * cumulative[-1]
        pick = int(torch.searchsorted(cumulative, target).clamp(max=len(points) - 1))
        centroids.append(points[pick])
        closest = torch.minimum(closest, dist_to(pick))
    centres = torch.stack(centroids)
    weighted = points * weights[:, None]
    assign = None
    steps, converged = 0, False
    while steps < max_iterations:
        new_assign = _nearest(points, centres)
        steps += 1
        if assign is not None and torch.equal(new_assign, assign):
            converged = True
            break
        assign = new_assign
        sums = torch.zeros_like(centres).index_add_(0, assign, weighted)
        mass = torch.zeros(k).index_add_(0, assign, weights)
        filled = mass > 0  # an emptied cluster keeps its old centre
        centres[filled] = sums[filled] / mass[filled, None]
        if progress is not None:
            progress()
        if deadline is not None and time.monotonic() > deadline:
            break
    return centres, steps, converged


def fit_patch_vq(images: torch.Tensor, *, patch_size: int = 8, codebook_size: int = 1024,
                 colours: Sequence[tuple[int, int, int]],
                 background: tuple[int, int, int], max_patches: int = 50000,
                 max_iterations: int = 50, seed: int = 0, deadline: float | None = None,
                 show_progress: bool = False) -> tuple[PatchVQ, dict[str, Any]]:
    """Fit a `PatchVQ` for flat-colour images `(N, 3, H, W)` in [0, 1] drawn from `colours` on `background`.

    The codebook has 1 + len(colours) * (G + 1) codes with
    G = (codebook_size - 1) // len(colours) - 1 geometries (fewer if there are fewer distinct edge
    patches). At most `max_patches` distinct edge masks are clustered (a random subset beyond that);
    `deadline` (a `time.monotonic()` value) cuts the k-means short. Returns (vq, stats) with stats
    `edge_patches`, `distinct_edges`, `geometries`, `kmeans_iterations`, `converged`.
    """
    palette = list(colours)
    n_colours = len(palette)
    geometries = (codebook_size - 1) // max(n_colours, 1) - 1
    if n_colours == 0 or geometries < 1:
        raise ConfigError(f"codebook_size {codebook_size} is too small for {n_colours} colours; "
                          f"it needs at least {1 + 2 * max(n_colours, 1)} codes")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise InputError(f"expected a non-empty batch of images (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[2] % patch_size or images.shape[3] % patch_size:
        raise InputError(f"image size {images.shape[3]}x{images.shape[2]} is not a multiple of patch_size {patch_size}")
    bg = torch.tensor(background, dtype=torch.float32) / 255.0
    cols = torch.tensor(palette, dtype=torch.float32) / 255.0

    edges = []
    for chunk in images.float().split(256):
        patches = _to_patches(chunk, patch_size)
        # A patch of one flat colour is background or solid, never an edge: skip the labelling.
        flat = patches.flatten(2)
        varied = (flat.amax(2) - flat.amin(2)).amax(1) > 1e-6
        alpha = _alpha_masks(patches[varied], cols, bg)
        is_edge = (alpha.max(1).values > _EDGE_EPS) & (alpha.min(1).values < 1 - _EDGE_EPS)
        edges.append(alpha[is_edge])
    edge_patches = sum(len(e) for e in edges)
    # Crisp renders repeat the same few thousand edge masks over and over: cluster each distinct
    # mask once, weighted by how often it occurs (alpha kept to 1/64, far below what PSNR sees).
    quantised = torch.cat(edges).mul_(_ALPHA_LEVELS).round_().to(torch.uint8)
    if len(quantised):
        points, counts = torch.unique(quantised, dim=0, return_counts=True)
    else:  # images with no edges at all: the codebook is the background and the solid colours
        points, counts = quantised, torch.zeros(0, dtype=torch.long)
    points = points.float() / _ALPHA_LEVELS
    weights = counts.float()
    generator = torch.Generator().manual_seed(seed)
    if len(points) > max_patches:
        keep = torch.randperm(len(points), generator=generator)[:max_patches]
        points, weights = points[keep], weights[keep]
    k = min(geometries, len(points))
    steps, converged = 0, True
    masks = torch.zeros(0, patch_size * patch_size)
    if k:
        with make_progress(show_progress, transient=True) as progress:
            task = progress.add_task(f"k-means: {k} edge shapes from {len(points)} patches", total=max_iterations)
            masks, steps, converged = _kmeans(points, weights, k, generator, max_iterations, deadline,
                                              lambda: progress.advance(task))
    masks = torch.cat([torch.ones(1, patch_size * patch_size), masks]).reshape(-1, 1, patch_size, patch_size)
    entries = [bg.reshape(1, 3, 1, 1).expand(1, 3, patch_size, patch_size)]
    for colour in cols:
        entries.append(bg.reshape(1, 3, 1, 1) + masks * (colour - bg).reshape(1, 3, 1, 1))
    codebook = torch.cat(entries).clamp(0, 1)
    stats = {"edge_patches": edge_patches, "distinct_edges": int(len(points)), "geometries": int(k),
             "kmeans_iterations": steps, "converged": converged}
    return PatchVQ(codebook), stats


__all__ = ["PATCH_VQ_CLASS", "PATCH_VQ_WEIGHTS", "PatchVQ", "fit_patch_vq"]
