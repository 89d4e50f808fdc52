"""Training speed of `meissonic train`: seconds per step, image tokens/s, MFU and peak memory.

    python benchmarks/train_speed.py --arch 1b --feature-compression off --resolution 512 \\
        --precision bf16 --batch 16,24,32 [--steps 10] [--warmup 3] [--gradient-checkpointing] [--json]
    python benchmarks/train_speed.py --arch tiny --set num_layers=2 --set attention_head_dim=32 \\
        --resolution 256 --batch 4 --device cpu

Each run goes through the trainer's own step (`Trainer.train_step`: shard reading, collation,
masking, forward, masked cross-entropy, backward, clipping, AdamW) on a synthetic token dataset
written to a temporary folder (random codes and text features of the model's sizes), on the
current device. `--batch` takes a list: sizes are tried in order and the first that runs out of
memory ends the search, so `--batch 16,24,32,40` finds the largest that fits.

Model FLOPs per step are counted by `torch.utils.flop_counter` on one forward+backward of batch 1
(matmuls, convolutions, attention; linear in the batch); MFU = FLOPs per step / step time /
peak, where the peak is this device's measured dense matmul rate in the training dtype (bf16 for
bf16/fp16 runs, fp32 otherwise; TF32 allowed on GPUs as the trainer allows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from meissonic_cli.data.shards import TokenSample, TokenShardWriter, write_dataset_info  # noqa: E402
from meissonic_cli.model.transformer import NAMED_CONFIGS, TransformerConfig  # noqa: E402
from meissonic_cli.train.config import TrainConfig  # noqa: E402
from meissonic_cli.train.distributed import init_distributed  # noqa: E402
from meissonic_cli.train.trainer import Trainer  # noqa: E402


def model_config(name: str, overrides: list[str], compression: str) -> TransformerConfig:
    config = NAMED_CONFIGS[name]() if name in NAMED_CONFIGS else TransformerConfig.from_json(name)
    values = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        values[key] = json.loads(raw)
    if "attention_head_dim" in values and "axes_dims_rope" not in values:
        # Split the head like the released model does (16/56/56 of 128): 1/8 for axis 0, the rest halved, all even.
        hd = values["attention_head_dim"]
        a0 = 2 * max(1, hd // 16)
        a1 = (hd - a0) // 4 * 2
        values["axes_dims_rope"] = [a0, a1, hd - a0 - a1]
    if "num_attention_heads" in values or "attention_head_dim" in values:
        d = values.get("num_attention_heads", config.num_attention_heads) * values.get("attention_head_dim", config.attention_head_dim)
        values.setdefault("pooled_projection_dim", d)
    config = dataclasses.replace(config, **values)
    if compression != "auto":
        config = dataclasses.replace(config, downsample=compression == "on", upsample=compression == "on")
    return config.validate()


def write_dataset(root: Path, n: int, grid: int, config: TransformerConfig) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d, p = config.joint_attention_dim, config.pooled_projection_dim
    write_dataset_info(root, {
        "format": "meissonic-tokens", "version": 1, "resolution": grid * 16, "grid": [grid, grid], "downsample_factor": 16,
        "codebook_size": config.codebook_size, "text_features": "full", "text_dim": d, "pooled_dim": p,
        "context_length": 77, "models": {},
    })
    with TokenShardWriter(root, 0) as w:
        for i in range(n):
            w.write(TokenSample(
                key=f"s{i:06d}", codes=rng.integers(0, config.codebook_size, (grid, grid)).astype(np.uint16),
                micro=np.array([grid * 16, grid * 16, 0, 0, 6.0], np.float32), caption="benchmark",
                text=rng.standard_normal((77, d)).astype(np.float16), pooled=rng.standard_normal(p).astype(np.float16),
            ))


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device in `dtype`."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 30 if device.type == "cuda" else 5
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(tmp: Path, args: argparse.Namespace, config_path: Path, batch: int, grid: int) -> Trainer:
    cfg = TrainConfig(
        data=str(tmp / "data"), output=str(tmp / f"run-{batch}-{time.monotonic_ns()}"), model=str(config_path),
        resolution=grid * 16, batch_size=batch, max_steps=10**9, checkpoint_every=10**9, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, cond_dropout=0.0, device=args.device,
        log_every=10**9, lr=1e-4,
    )
    return Trainer(cfg, init_distributed(args.device))


def count_flops_per_sample(trainer: Trainer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    trainer.transformer.gradient_checkpointing = False  # count model FLOPs, not recomputation
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    return float(counter.get_total_flops())


def measure(tmp: Path, args: argparse.Namespace, config_path: Path, batch: int, grid: int) -> dict:
    trainer = make_trainer(tmp, args, config_path, batch, grid)
    dev = trainer.device
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        sync(dev)
        step_s = (time.perf_counter() - t) / args.steps
        return {
            "batch": batch, "s_per_step": step_s, "tokens_per_s": batch * grid * grid / step_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        }
    finally:
        trainer.stream.close()
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", "--model", dest="model", default="tiny",
                    help="architecture: a named config (1b, tiny) or a transformer config.json (--model: old spelling)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a TransformerConfig field")
    ap.add_argument("--feature-compression", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", default="8", help="batch size, or a comma list tried in order until one runs out of memory")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = model_config(args.model, args.set, args.feature_compression)
    grid = args.resolution // 16
    batches = [int(b) for b in args.batch.split(",")]
    env = init_distributed(args.device)
    dev = env.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak(dev, torch.float32 if args.precision == "fp32" else torch.bfloat16)

    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp_name:
        tmp = Path(tmp_name)
        config_path = tmp / "config.json"
        config_path.write_text(json.dumps(config.to_json_dict()))
        write_dataset(tmp / "data", max(2 * max(batches), 8), grid, config)

        counter = make_trainer(tmp, args, config_path, 1, grid)
        counter.train_step()
        flops_per_sample = count_flops_per_sample(counter)
        n_params = sum(p.numel() for p in counter.transformer.parameters())
        counter.stream.close()
        del counter
        gc.collect()

        rows = []
        for batch in batches:
            try:
                row = measure(tmp, args, config_path, batch, grid)
            except torch.OutOfMemoryError:
                rows.append({"batch": batch, "oom": True})
                break
            row["flops_per_step"] = flops_per_sample * batch
            row["mfu"] = row["flops_per_step"] / row["s_per_step"] / peak
            rows.append(row)

    blocks_grid = grid // 2 if config.downsample else grid
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model, "overrides": args.set, "parameters": n_params, "downsample": config.downsample,
        "resolution": args.resolution, "token_grid": grid, "blocks_see": f"{blocks_grid}x{blocks_grid} + 77 text",
        "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
        "matmul_peak_tflops": peak / 1e12, "flops_per_sample_step": flops_per_sample, "runs": rows,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train speed: {args.model} ({n_params / 1e6:.1f} M params) at {args.resolution}px, {args.precision}, "
                        f"{report['device']}, measured matmul peak {peak / 1e12:.2f} TFLOP/s")
    for col in ("batch", "s/step", "image tokens/s", "TFLOP/step", "MFU", "peak mem GiB"):
        table.add_column(col, justify="right")
    for r in rows:
        if r.get("oom"):
            table.add_row(str(r["batch"]), "out of memory", "", "", "", "")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        table.add_row(str(r["batch"]), f"{r['s_per_step']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_step'] / 1e12:.2f}",
                      f"{100 * r['mfu']:.1f}%", mem)
    Console().print(table)


if __name__ == "__main__":
    main()
