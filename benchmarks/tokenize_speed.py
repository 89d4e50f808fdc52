"""Tokenize throughput (images/s) and bytes per sample for each --text-features mode.

    python benchmarks/tokenize_speed.py [--model DIR | --preset tiny|small|released] [--images 32]
        [--resolution 256] [--batch-size 8] [--device cpu] [--dtype fp32] [--modes full,pooled,none] [--json]

The benchmark writes its own images (synthetic shape scenes with captions, a little larger than
the resolution so the resize and crop run) and tokenizes them once per mode with `meissonic_cli.data.tokenize`,
timing the encode loop (model loading excluded). Without --model it builds a folder with random
weights: `tiny` (the test-sized parts), `small` (VQ f=16 with 8192 codes and narrow channels, CLIP
text width 256 x 4 layers) or `released` (the released VQ architecture and the ViT-H-14 text tower;
writes ~1.6 GB of random weights to a temporary folder and is slow on CPU). It also prints the
payload per sample of the released model's features at 256/512/1024 px, which is what sets
storage at LAION scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_preset(root: Path, preset: str) -> Path:
    from meissonic_cli.model.text_encoder import (
        ClipTokenizer,
        TextEncoder,
        TextEncoderConfig,
        tiny_text_config,
        vit_h14_text_config,
    )
    from meissonic_cli.model.vq.vqgan import VQTokenizer, meissonic_vq_config, tiny_vq_config

    if preset == "tiny":
        vq_cfg, text_cfg = tiny_vq_config(), tiny_text_config()
    elif preset == "small":
        vq_cfg = {**meissonic_vq_config(), "block_out_channels": [32, 64, 64, 128, 128], "layers_per_block": 1}
        text_cfg = TextEncoderConfig(width=256, layers=4, heads=4, intermediate_size=1024, embed_dim=256)
    elif preset == "released":
        vq_cfg, text_cfg = meissonic_vq_config(), vit_h14_text_config()
    else:
        raise SystemExit(f"unknown preset {preset!r}; use tiny, small or released")
    VQTokenizer.from_config(vq_cfg).save_pretrained(root / "vqvae")
    TextEncoder(text_cfg).save_pretrained(root / "text_encoder")
    ClipTokenizer().save_pretrained(root / "tokenizer")
    return root


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="released-layout folder with vqvae/ and text_encoder/ (default: build --preset)")
    ap.add_argument("--preset", default="tiny", help="random-weight parts when --model is not given: tiny, small, released")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modes", default="full,pooled,none")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of tables")
    args = ap.parse_args(argv)

    from meissonic_cli.data.tokenize import TokenizeConfig, feature_bytes, tokenize
    from meissonic_cli.shapes.source import write_image_folder

    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as tmp:
        tmp_path = Path(tmp)
        model = Path(args.model) if args.model else build_preset(tmp_path / "model", args.preset)
        images = tmp_path / "images"
        write_image_folder(images, args.images, size=args.resolution + args.resolution // 4, seed=0)
        rows = []
        for mode in args.modes.split(","):
            cfg = TokenizeConfig(input=str(images), out=str(tmp_path / f"tokens-{mode}"), model=str(model),
                                 resolution=args.resolution, text_features=mode, batch_size=args.batch_size,
                                 device=args.device, dtype=args.dtype, workers=args.workers)
            res = tokenize(cfg, rank=0, world_size=1, show_progress=False)
            rows.append({"mode": mode, "images": res.images, "seconds": round(res.seconds, 3),
                         "images_per_second": round(res.images_per_second, 2),
                         "bytes_per_sample": round(res.bytes_per_sample, 1), "payload": res.feature_bytes})
    released = {r: feature_bytes((r // 16, r // 16), 1024, 1024) for r in (256, 512, 1024)}
    report = {"model": args.model or f"preset:{args.preset}", "resolution": args.resolution, "device": args.device,
              "dtype": args.dtype, "batch_size": args.batch_size, "runs": rows, "released_payload_bytes": released}
    if args.json:
        print(json.dumps(report))
        return report
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"tokenize {args.images} images at {args.resolution}px ({report['model']}, {args.device}, {args.dtype})")
    for col in ("--text-features", "images/s", "seconds", "bytes/sample (tar)", "payload"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["mode"], f"{r['images_per_second']:.2f}", f"{r['seconds']:.2f}", f"{r['bytes_per_sample']:,.0f}",
                  ", ".join(f"{k} {v:,}" for k, v in r["payload"].items()))
    console = Console()
    console.print(t)
    t2 = Table(title="released model (f=16, D=P=1024): payload bytes per sample")
    for col in ("resolution", "codes", "text (full only)", "pooled", "full", "pooled mode", "none"):
        t2.add_column(col, justify="right")
    for r, b in released.items():
        full = b["codes"] + b["micro"] + b["text"] + b["pooled"]
        t2.add_row(str(r), f"{b['codes']:,}", f"{b['text']:,}", f"{b['pooled']:,}", f"{full:,}",
                   f"{full - b['text']:,}", f"{b['codes'] + b['micro']:,}")
    console.print(t2)
    return report


if __name__ == "__main__":
    main()
