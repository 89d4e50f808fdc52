"""FID: the Fréchet distance between Inception pool features of two image sets.

The standard numbers come from the TensorFlow Inception graph of 2015 ported to PyTorch
(`pt_inception-2015-12-05-6726825d.pth`, the weights pytorch-fid uses). Its layers are torchvision's
`Inception3` with 1008 classes, except for the pooling inside four kinds of block, where the TF graph
differs from torchvision's re-implementation:
- Mixed_5b-d, Mixed_6b-e and Mixed_7b average-pool their pooling branch without counting the padding;
- Mixed_7c max-pools it.
The feature is the 2048-d average pool. Two input conventions (`--fid-mode`):
- `pytorch-fid` (pytorch-fid's `InceptionV3`): the image in [0, 1], resized to 299x299 with
  `F.interpolate(bilinear, align_corners=False)`, then scaled to [-1, 1] as 2x - 1;
- `clean` (clean-fid's `mode="clean"`): each channel of the uint8 image resized to 299x299 as a float
  image by PIL bicubic, clipped to [0, 255], then normalised as (x - 128) / 128.
Images are prepared one by one (so sizes may differ and the batch size cannot change a feature)
in a small thread pool while the previous batch runs, and go through the network in batches.

The trace of the matrix square root, tr sqrt(S1 S2), is computed without scipy's `sqrtm`, which is
slow at 2048x2048 and inaccurate when the covariances are singular (fewer images than dimensions):
- from statistics (`frechet_distance`): tr sqrt(S1^1/2 S2 S1^1/2) through symmetric eigendecompositions
  (the two products are similar, and the second is symmetric positive semi-definite);
- from features (`fid_from_features`) with few images: S_i = X_i^T X_i / (n_i - 1) for centred X_i, so
  the eigenvalues of S1 S2 are the squared singular values of X1 X2^T over (n1-1)(n2-1), and the
  trace is the nuclear norm of X1 X2^T over sqrt((n1-1)(n2-1)): an n1 x n2 problem instead of D x D.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meissonic_cli.errors import InputError
from meissonic_cli.metrics.clip import adopt_state, load_state_file

FID_CLASSES = 1008
FID_SIZE = 299
FEATURE_DIM = 2048
FID_MODES = ("pytorch-fid", "clean")
# How each mode turns an image into the network's input (recorded in report.json).
RESIZE_RULES = {
    "pytorch-fid": "RGB in [0, 1] -> 299x299 torch bilinear (align_corners=False) -> 2x - 1 (pytorch-fid InceptionV3)",
    "clean": "RGB uint8 -> per channel float PIL bicubic 299x299, clip [0, 255] -> (x - 128) / 128 (clean-fid clean mode)",
}


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _tf_blocks() -> tuple[type, type, type, type]:
    """Subclasses of torchvision's Inception blocks with the TF graph's pooling branch."""
    from torchvision.models import inception as tv

    class BlockA(tv.InceptionA):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))]

    class BlockC(tv.InceptionC):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                d = layer(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))]

    class BlockE(tv.InceptionE):
        pool = staticmethod(_avg_pool_no_pad)

        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            return [self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))]

    class BlockEMax(BlockE):
        pool = staticmethod(_max_pool)

    return BlockA, BlockC, BlockE, BlockEMax


class FIDInception(nn.Module):
    """The FID Inception: images (B, 3, H, W) in [0, 1] -> (B, 2048) pool features."""

    def __init__(self, init_weights: bool = False):
        super().__init__()
        from torchvision.models import inception as tv

        block_a, block_c, block_e, block_e_max = _tf_blocks()
        net = tv.Inception3(num_classes=FID_CLASSES, aux_logits=False, init_weights=init_weights,
                            inception_blocks=[tv.BasicConv2d, block_a, tv.InceptionB, block_c, tv.InceptionD,
                                              block_e, tv.InceptionAux])
        net.Mixed_7c = block_e_max(2048)
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of images in [0, 1] under the pytorch-fid convention (any size; resized here)."""
        x = F.interpolate(images, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        return self.features(2 * x - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2048) features of network inputs already at 299x299 and normalised (see `prepare_image`)."""
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool):
            x = layer(x)
        return torch.flatten(x, 1)


def load_inception(checkpoint: str | Path, device: str | torch.device = "cpu") -> FIDInception:
    """The FID Inception with the local pt_inception weights (or any state dict of the same network)."""
    path = Path(checkpoint)
    state = load_state_file(path)
    state = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state.items()}
    with torch.device("meta"):
        model = FIDInception()
    adopt_state(model.net, state, str(path), "FID Inception (pt_inception-2015-12-05)")
    return model.eval().to(torch.device(device))


def file_digest(path: str | Path) -> str:
    """'sha256:<hex>' of a file (the Inception weights' identity in report.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def prepare_image(image: Any, mode: str = "pytorch-fid") -> torch.Tensor:
    """(3, 299, 299) float32 network input for a PIL image under `mode` (see the module docstring)."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if mode == "clean":
        channels = [np.asarray(Image.fromarray(arr[:, :, c].astype(np.float32), mode="F")
                               .resize((FID_SIZE, FID_SIZE), resample=Image.BICUBIC)).clip(0, 255)
                    for c in range(3)]
        x = torch.from_numpy(np.stack(channels).astype(np.float32))
        return (x - 128) / 128
    if mode != "pytorch-fid":
        raise InputError(f"--fid-mode must be one of {', '.join(FID_MODES)}, got {mode!r}")
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)[None]
    x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)[0]
    return 2 * x - 1


def _prepared_batches(sources: Sequence[Any], load: Callable[[Any], Any], mode: str, batch_size: int,
                      pool: ThreadPoolExecutor) -> Iterator[torch.Tensor]:
    """Batches of prepared inputs; the next batch is decoded and resized while the current one runs."""
    def submit(chunk: Sequence[Any]) -> list[Any]:
        return [pool.submit(lambda s: prepare_image(load(s), mode), src) for src in chunk]

    pending = submit(sources[:batch_size])
    for start in range(0, len(sources), batch_size):
        upcoming = submit(sources[start + batch_size:start + 2 * batch_size])
        yield torch.stack([f.result() for f in pending])
        pending = upcoming


@torch.inference_mode()
def inception_features(model: FIDInception, images: Sequence[Any], device: str | torch.device = "cpu", *,
                       mode: str = "pytorch-fid", batch_size: int = 32, load: Callable[[Any], Any] = lambda x: x,
                       on_batch: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """(N, 2048) float64 features of `images` (PIL images, or anything `load` turns into one).

    Inputs go through the network `batch_size` at a time in channels-last layout (oneDNN's fast
    convolution path on CPU); `on_batch(n)` is called after each batch (progress bars).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    model = model.to(memory_format=torch.channels_last)
    rows = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for batch in _prepared_batches(list(images), load, mode, batch_size, pool):
            x = batch.to(dev).contiguous(memory_format=torch.channels_last)
            rows.append(model.features(x).double().cpu())
            on_batch(len(batch))
    return torch.cat(rows).numpy() if rows else np.zeros((0, FEATURE_DIM))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features; N >= 2."""
    if features.shape[0] < 2:
        raise InputError(f"FID needs at least 2 images per set, got {features.shape[0]} "
                         f"(a meaningful FID needs thousands)")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), for Gaussians fitted to two feature sets."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(f"FID statistics differ in shape: mean {mu1.shape} vs {mu2.shape}, "
                         f"covariance {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    # Rounding can leave a tiny negative number for identical sets; a distance is >= 0.
    return max(value, 0.0)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two (N, D) feature sets; exact, and fast when N1 * N2 <= D * D."""
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise InputError(f"FID needs two (N, D) feature sets of the same D, got {features1.shape} and {features2.shape}")
    n1, n2, d = features1.shape[0], features2.shape[0], features1.shape[1]
    if n1 * n2 > d * d:
        return frechet_distance(*feature_stats(features1), *feature_stats(features2))
    feature_stats(features1[:2]), feature_stats(features2[:2])  # the same "at least 2 images" check
    x1 = features1.astype(np.float64) - features1.mean(axis=0)
    x2 = features2.astype(np.float64) - features2.mean(axis=0)
    scale1, scale2 = 1.0 / (n1 - 1), 1.0 / (n2 - 1)
    tr_covmean = float(np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() * np.sqrt(scale1 * scale2))
    diff = features1.mean(axis=0) - features2.mean(axis=0)
    value = float(diff @ diff + scale1 * (x1 * x1).sum() + scale2 * (x2 * x2).sum() - 2 * tr_covmean)
    return max(value, 0.0)


def load_reference_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`mu`, `sigma` from a pytorch-fid style .npz of precomputed reference statistics."""
    try:
        with np.load(path) as data:
            return data["mu"], data["sigma"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: expected a .npz with 'mu' and 'sigma' (pytorch-fid statistics): {err}") from None


__all__ = ["FEATURE_DIM", "FID_MODES", "FIDInception", "RESIZE_RULES", "feature_stats", "file_digest", "fid_from_features", "frechet_distance", "inception_features",
           "load_inception", "load_reference_stats", "prepare_image"]
