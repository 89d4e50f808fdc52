"""How far the EMA gets from a random init in a short from-scratch run, with and without warm-up.

Trains the tiny model on random token shards for --steps steps at --ema-decay (default 0.9999) twice,
with --ema-warmup (diffusers' EMAModel schedule) and --no-ema-warmup (the full decay from step 1),
and prints |EMA - init| against |weights - init| (L2 over all trained tensors).

    python benchmarks/ema_warmup.py --steps 100
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from meissonic_cli.data.shards import TokenSample, TokenShardWriter, write_dataset_info
from meissonic_cli.model.transformer import load_state_dict_files
from meissonic_cli.train.config import TrainConfig
from meissonic_cli.train.trainer import Trainer

GRID, DIM, CODES = 4, 32, 64


def random_tokens(root: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(0)
    write_dataset_info(root, {"format": "meissonic-tokens", "version": 1, "resolution": GRID * 16, "grid": [GRID, GRID],
                              "downsample_factor": 16, "codebook_size": CODES, "text_features": "full", "text_dim": DIM,
                              "pooled_dim": DIM, "context_length": 77, "models": {}})
    with TokenShardWriter(root, 0) as w:
        for k in range(n):
            w.write(TokenSample(key=f"s{k:05d}", codes=rng.integers(0, CODES, (GRID, GRID)).astype(np.uint16),
                                micro=np.array([512, 512, 0, 0, 6.0], np.float32), caption=f"sample {k}",
                                text=rng.standard_normal((77, DIM)).astype(np.float16),
                                pooled=rng.standard_normal(DIM).astype(np.float16)))
    return root


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in b) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ema-decay", type=float, default=0.9999)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = random_tokens(Path(tmp) / "data")
        for warmup in (True, False):
            out = Path(tmp) / f"warmup-{warmup}"
            trainer = Trainer(TrainConfig(data=str(data), output=str(out), model="tiny", resolution=GRID * 16, batch_size=4,
                                          max_steps=args.steps, checkpoint_every=args.steps, log_every=args.steps,
                                          cond_dropout=0.0, lr=3e-3, device="cpu", ema_decay=args.ema_decay,
                                          ema_warmup=warmup, curves=False))
            init = {k.removeprefix("transformer."): v.clone() for k, v in trainer.ema.shadow.items()}
            trainer.fit()
            step = out / f"step-{args.steps:08d}"
            ema, weights = load_state_dict_files(step / "transformer_ema"), load_state_dict_files(step / "transformer")
            d_ema, d_w = distance(ema, init), distance(weights, init)
            print(f"ema_warmup={warmup}: |EMA-init| {d_ema:.4f}  |weights-init| {d_w:.4f}  ratio {d_ema / d_w:.4f}  "
                  f"|EMA-weights| {distance(ema, weights):.4f}")


if __name__ == "__main__":
    main()
