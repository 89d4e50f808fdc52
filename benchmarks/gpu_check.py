"""The sampler half of benchmarks/gpu_check.sh: seconds per step of the released-size transformer.

    python benchmarks/gpu_check.py [--smoke] [--steps 48] [--fast cache_refresh=3] [--no-compile]

Random weights of the released 1B configuration at 1024x1024 (a 64x64 token grid, 32x32 after the
2x2 compression), bf16, batch 1, classifier-free guidance 9, on one CUDA device: the official sampler
(the default fast loop) and the `--fast` setting (SamplerOptions fields, e.g. the study's fastest:
the feature cache), each eager and with torch.compile (the transformer blocks compiled one by one:
their shapes do not change from step to step, except the cache's active cells at each refresh; the
cache runs through the blocks' own forward). Each measurement is one untimed warm-up
run (which also compiles) and one timed run; the per-step times are taken at every step's end after
a device sync. Prints one JSON line. A time budget (--budget-s) skips what would run past it (the
skipped parts are listed under "skipped").

--smoke runs the same code on the CPU with the tiny test configuration at 64x64 and 4 steps, with
torch.compile's "eager" backend (graph capture without code generation), in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_fast(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if not value:
            raise SystemExit(f"--fast takes FIELD=VALUE pairs, got {part!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@contextlib.contextmanager
def compiled(model: Any, backend: str) -> Iterator[None]:
    """Compile the transformer's blocks one by one; the feature cache runs through the same blocks
    (its active cells change at each refresh: dynamo marks those shapes dynamic after the first)."""
    import torch

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    blocks = [model.transformer_blocks, model.single_transformer_blocks]
    saved_blocks = [list(b) for b in blocks]
    try:
        for group in blocks:
            for i, block in enumerate(list(group)):
                group[i] = torch.compile(block, backend=backend)
        yield
    finally:
        for group, original in zip(blocks, saved_blocks):
            for i, block in enumerate(original):
                group[i] = block


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny configuration, 64x64, 4 steps (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="decoding steps (default 48; 4 with --smoke)")
    ap.add_argument("--fast", default="cache_refresh=3", help="the fast setting: SamplerOptions FIELD=VALUE pairs")
    ap.add_argument("--cfg", type=float, default=9.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip measurements that would start after this")
    args = ap.parse_args(argv)

    import torch

    from meissonic_cli.model.scheduler import MaskGITScheduler
    from meissonic_cli.model.transformer import MeissonicTransformer, meissonic_1b, meissonic_tiny
    from meissonic_cli.sample.pipeline import sample_tokens
    from meissonic_cli.sample.samplers import SamplerOptions

    start = time.perf_counter()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    config = meissonic_tiny() if smoke else meissonic_1b()
    resolution = 64 if smoke else 1024
    steps = args.steps or (4 if smoke else 48)
    grid = (resolution // 16, resolution // 16)
    backend = "eager" if smoke else "inductor"
    fast = SamplerOptions(**parse_fast(args.fast)).validate()

    torch.manual_seed(0)
    with torch.device(device):
        model = MeissonicTransformer(config)
    model = model.to(dtype).eval()
    scheduler = MaskGITScheduler(mask_token_id=config.mask_token_id)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 77, config.joint_attention_dim, generator=g), torch.randn(1, config.pooled_projection_dim, generator=g),
             torch.randn(1, 77, config.joint_attention_dim, generator=g), torch.randn(1, config.pooled_projection_dim, generator=g)]
    text, pooled, neg_text, neg_pooled = (f.to(device, dtype) for f in feats)
    micro = torch.tensor([[resolution, resolution, 0, 0, 6.0]], device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(options: Any) -> list[float]:
        marks: list[float] = []

        def mark(step: int, total: int) -> None:
            sync()
            marks.append(time.perf_counter())

        sync()
        marks.append(time.perf_counter())
        sample_tokens(model, scheduler, text, pooled, micro, grid, steps=steps, guidance_scale=args.cfg,
                      negative_text=neg_text, negative_pooled=neg_pooled, generator=torch.Generator(device).manual_seed(0),
                      callback=mark, sampler=options)
        return [b - a for a, b in zip(marks, marks[1:])]

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters()),
        "resolution": resolution, "dtype": "bf16", "batch": 1, "cfg": args.cfg, "steps": steps,
        "fast_setting": fast.label, "compile_backend": backend, "sampler": {}, "skipped": [],
    }
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    for mode in modes:
        for name, options in (("official", None), ("fast", fast)):
            if time.perf_counter() - start > args.budget_s:
                result["skipped"].append(f"{name}/{mode}")
                continue
            t0 = time.perf_counter()
            try:
                with compiled(model, backend) if mode == "compile" else contextlib.nullcontext():
                    run(options)  # warm-up (and compilation)
                    warm = time.perf_counter() - t0
                    per_step = run(options)
            except Exception as err:  # report and go on: one failure should not hide the other figures
                result["sampler"].setdefault(name, {})[mode] = {"error": f"{type(err).__name__}: {err}"[:300]}
                continue
            result["sampler"].setdefault(name, {})[mode] = {
                "s_per_step": sum(per_step) / len(per_step), f"total_{steps}_steps_s": sum(per_step),
                "first_step_s": per_step[0], "last_step_s": per_step[-1], "warmup_s": warm,
            }
    for mode in modes:
        base = result["sampler"].get("official", {}).get(mode, {}).get("s_per_step")
        other = result["sampler"].get("fast", {}).get(mode, {}).get("s_per_step")
        if base and other:
            result["sampler"]["fast"][mode]["speedup_vs_official"] = base / other
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
