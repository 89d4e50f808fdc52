"""Whole vs banded VQ decode of the released VQ (random weights) at one resolution: peak memory, time, difference.

    python benchmarks/vq_decode.py                       # 1024x1024, both modes
    python benchmarks/vq_decode.py --resolution 512 --out benchmarks/results/vq_decode

The VQ is the released aMUSEd VQ-GAN config (`meissonic_vq_config()`, float32 as `force_upcast` asks)
with random weights (seed 0); the codes are uniform random ids (seed 0). Each mode runs in a fresh
Python process, which builds the VQ, reads its RSS, resets the kernel's high-water mark
(`/proc/self/clear_refs`, 5), decodes once and reads `VmHWM`: the peak is what the decode adds over the
loaded VQ. The processes save their float output; the parent reports the largest absolute difference of
the banded output from the whole one and how many 8-bit pixel values differ after the pipeline's
clamp-and-round to uint8. Writes vq_decode.json to --out when given, and prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, resolution: int, out: str) -> dict[str, Any]:
    import torch

    from meissonic_cli.model.vq.vqgan import VQTokenizer, meissonic_vq_config

    vq = VQTokenizer.from_config(meissonic_vq_config(), seed=0)
    grid = resolution // vq.downsample_factor
    codes = torch.randint(0, vq.codebook_size, (1, grid, grid), generator=torch.Generator().manual_seed(0))
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    image = vq.decode_raw(codes, mode)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    torch.save({"raw": image}, out)
    return {"mode": mode, "seconds": seconds, "peak_over_loaded_vq_gib": (peak - baseline) / 2**20,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--modes", default="whole,banded")
    ap.add_argument("--out", default=None, help="folder for vq_decode.json")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.resolution, args.save)))
        return 0
    import torch

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            save = str(Path(tmp) / f"{mode}.pt")
            cmd = [sys.executable, __file__, "--child", mode, "--resolution", str(args.resolution), "--save", save]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode or not lines:
                rows.append({"mode": mode, "status": "failed", "why": (run.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            rows.append(json.loads(lines[-1]))
            images[mode] = torch.load(save, weights_only=True)["raw"]
            print(json.dumps(rows[-1]), file=sys.stderr)
    report: dict[str, Any] = {"resolution": args.resolution, "rows": rows}
    if "whole" in images and "banded" in images:
        whole, banded = images["whole"], images["banded"]
        to8 = lambda x: (x.float().clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731  (the pipeline's rounding)
        differ = to8(whole) != to8(banded)
        report.update(max_abs_diff=float((whole - banded).abs().max()), values=whole.numel(),
                      uint8_values_differing=int(differ.sum()),
                      uint8_max_diff=int((to8(whole).int() - to8(banded).int()).abs().max()),
                      time_ratio_banded_over_whole=next(r["seconds"] for r in rows if r["mode"] == "banded")
                      / next(r["seconds"] for r in rows if r["mode"] == "whole"))
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vq_decode.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
