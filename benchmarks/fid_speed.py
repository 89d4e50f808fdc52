"""How fast does `meissonic eval --suite fid` turn images into Inception features, before and after batching?

before: the loop eval ran until issue 21: each image decoded, then one forward of a (1, 3, H, W)
        tensor through `FIDInception.forward` (resize inside), contiguous layout;
after:  `fid.inception_features` at each --batch-sizes value: images decoded and resized to 299 in a
        2-thread pool while the previous batch runs, batches in channels-last layout.

Both read the same PNG files from disk (decode included) with random-weight networks (speed does
not depend on the weights). Runs are paired (before, after b1, after b32, before, ...) so all see the
same machine load; each row reports the median over --repeats of images per wall-second and images
per CPU-second of this process (time.process_time), and the after/before ratio of the medians. The
features of every variant are checked to agree (max relative difference printed).

    python benchmarks/fid_speed.py --images 64 --size 512 --batch-sizes 1,32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from meissonic_cli.metrics.fid import FIDInception, inception_features
from meissonic_cli.metrics.report import open_rgb
from meissonic_cli.model.vq import images_to_tensor


def before(model: FIDInception, paths: list[Path]) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(images_to_tensor([open_rgb(p)])).double() for p in paths]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512, help="side of the square PNGs")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    old, new = FIDInception().eval(), FIDInception().eval()
    new.load_state_dict(old.state_dict())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):
            small = rng.integers(0, 256, (args.size // 16, args.size // 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((args.size, args.size), Image.BICUBIC)
            paths.append(Path(tmp) / f"{i:05d}.png")
            image.save(paths[-1])
        variants = {"before (per image)": lambda: before(old, paths)}
        for b in sizes:
            variants[f"after --batch-size {b}"] = lambda b=b: inception_features(new, paths, batch_size=b, load=open_rgb)
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        feats: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t, c = time.perf_counter(), time.process_time()
                feats[name] = fn()
                wall[name].append(args.images / (time.perf_counter() - t))
                cpu[name].append(args.images / (time.process_time() - c))
    base = "before (per image)"
    print(f"{args.images} PNGs {args.size}x{args.size}, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats} paired runs")
    print(f"{'variant':<24} {'img/s':>8} {'img/cpu-s':>10} {'x wall':>7} {'x cpu':>7} {'max rel diff':>13}")
    scale = np.abs(feats[base]).max()
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        diff = np.abs(feats[name] - feats[base]).max() / scale
        print(f"{name:<24} {w:8.2f} {c:10.2f} {w / statistics.median(wall[base]):7.2f} "
              f"{c / statistics.median(cpu[base]):7.2f} {diff:13.2e}")


if __name__ == "__main__":
    main()
