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

Where the ceiling is: the network's arithmetic per image is counted with torch's FlopCounterMode
(convolutions and matmuls, x2 per multiply-add) and each variant's images/s is converted to GFLOP/s,
printed against the FLOP/s of a large float32 matmul measured in the same run (the same peak
`sample_speed.py` uses): no batching can push images/s past peak / (FLOP per image).

    python benchmarks/fid_speed.py --images 64 --size 512 --batch-sizes 1,32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
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


def before(model: FIDInception, paths: list[Path], device: torch.device) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(images_to_tensor([open_rgb(p)]).to(device)).double().cpu() for p in paths]).numpy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flop_per_image(model: FIDInception) -> float:
    """FLOPs of one 299x299 image through the network (convolutions and matmuls, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.features(torch.zeros(1, 3, 299, 299))
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512, help="side of the square PNGs")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check runs it on cuda)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    device = torch.device(args.device)
    old, new = FIDInception().eval(), FIDInception().eval()
    new.load_state_dict(old.state_dict())
    old, new = old.to(device), new.to(device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):
            small = rng.integers(0, 256, (args.size // 16, args.size // 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((args.size, args.size), Image.BICUBIC)
            paths.append(Path(tmp) / f"{i:05d}.png")
            image.save(paths[-1])
        variants = {"before (per image)": lambda: before(old, paths, device)}
        for b in sizes:
            variants[f"after --batch-size {b}"] = lambda b=b: inception_features(new, paths, device, batch_size=b, load=open_rgb)
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        feats: dict[str, np.ndarray] = {}
        warm = paths[:2]
        before(old, warm, device)  # first calls pay for oneDNN/cuDNN setup: not timed
        for b in sizes:
            inception_features(new, warm, device, batch_size=b, load=open_rgb)
        for _ in range(args.repeats):
            for name, fn in variants.items():
                sync(device)
                t, c = time.perf_counter(), time.process_time()
                feats[name] = fn()
                sync(device)
                wall[name].append(args.images / (time.perf_counter() - t))
                cpu[name].append(args.images / (time.process_time() - c))
    from sample_speed import matmul_peak

    flops, peak = flop_per_image(FIDInception().eval()), matmul_peak(device, torch.float32, seconds=1.0)
    base = "before (per image)"
    scale = np.abs(feats[base]).max()
    rows = {name: {"img_per_s": statistics.median(wall[name]), "img_per_cpu_s": statistics.median(cpu[name]),
                   "x_wall": statistics.median(wall[name]) / statistics.median(wall[base]),
                   "gflops": statistics.median(wall[name]) * flops / 1e9,
                   "max_rel_diff": float(np.abs(feats[name] - feats[base]).max() / scale)} for name in variants}
    if args.json:
        print(json.dumps({"device": str(device), "images": args.images, "size": args.size, "repeats": args.repeats,
                          "gflop_per_image": flops / 1e9, "matmul_peak_gflops": peak / 1e9, "variants": rows}))
        return
    print(f"{args.images} PNGs {args.size}x{args.size}, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats} paired runs")
    print(f"network: {flops / 1e9:.2f} GFLOP per image; float32 matmul peak {peak / 1e9:.1f} GFLOP/s, so at most "
          f"{peak / flops:.1f} img/s if every FLOP ran at matmul speed")
    print(f"{'variant':<24} {'img/s':>8} {'img/cpu-s':>10} {'x wall':>7} {'x cpu':>7} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'max rel diff':>13}")
    for name, row in rows.items():
        print(f"{name:<24} {row['img_per_s']:8.2f} {row['img_per_cpu_s']:10.2f} {row['x_wall']:7.2f} "
              f"{row['img_per_cpu_s'] / rows[base]['img_per_cpu_s']:7.2f} {row['gflops']:8.1f} "
              f"{row['gflops'] * 1e9 / peak:8.0%} {row['max_rel_diff']:13.2e}")


if __name__ == "__main__":
    main()
