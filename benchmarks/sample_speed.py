"""Speed of the sampling loop (transformer + scheduler, with classifier-free guidance).

    python benchmarks/sample_speed.py (--model DIR | --arch medium|1b|tiny) [--resolution 512] [--steps 48]
        [--batch 1] [--cfg 9] [--device cpu] [--dtype fp32] [--threads N] [--repeats 1] [--warmup-steps 2]
        [--compare-official-style] [--compile] [--sampler FIELD=VALUE,...] [--json]

--model is a released-layout folder of which only transformer/ is needed; --arch builds random
weights instead: `medium` is the conformance timing config (4 + 8 blocks, 8 heads x 64, text width
1024, read from cases.json `timing_medium_cpu`), `1b` the released configuration, `tiny` the test
one. Text features are random (the text encoder runs once per call, outside the loop), the token grid
is resolution / 16 (the released VQ factor).

It times `pipeline.sample_tokens` end to end (every step: transformer forward with CFG batch
[uncond, cond] and the scheduler step) and prints seconds per step, the total, and the achieved
FLOP/s against the peak of a large matmul measured in the same run. FLOPs are counted analytically
(matmuls, convolutions and attention; elementwise work is not counted), for the work each loop
really does: the fast loop runs the head only at still-masked positions and its last layer once per
guided row.

--compare-official-style also times our `exact` loop, which does the work the official loop does
(full forward with conditioning recomputed every step, logits for every position, the official
scheduler step with draws for every position), alternating the two loops `--repeats` times, and
reports the ratio. Both loops use the same weights and features. The official model's own CPU time
recorded in cases.json (0.66 s per forward at batch 2 on a 32x32 grid, 2 threads, another CPU) is
printed as a secondary reference.

--compile also times the fast loop with the transformer's blocks compiled (`model/compiled.py`, what
`sample --compile` does) on a copy of the same weights, in the same alternation; the official-style loop
stays eager (the official pipeline does not compile). Compilation happens in the warm-up run, and the
compiled loop's tokens are compared with the eager fast loop's (count of differing tokens printed).

--sampler runs the fast loop with `samplers.SamplerOptions` (e.g. `cache_refresh=3` or `order=halton`);
FLOPs are then still counted for the plain fast loop (the cache does less work than counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VQ_FACTOR = 16
TEXT_TOKENS = 77


def conformance_dir() -> Path:
    return Path(os.environ.get("MEISSONIC_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))


def medium_reference() -> dict:
    path = conformance_dir() / "cases.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found (set MEISSONIC_CONFORMANCE_DIR); --arch medium reads its timing_medium_cpu")
    return json.loads(path.read_text())["timing_medium_cpu"]


def build_transformer(args, dtype, device):
    import torch

    from meissonic_cli.model.transformer import MeissonicTransformer, TransformerConfig, meissonic_1b, meissonic_tiny

    if args.model:
        return MeissonicTransformer.from_pretrained(args.model, dtype=dtype, device=device)
    if args.config == "medium":
        config = TransformerConfig(**medium_reference()["config"]).validate()
    elif args.config == "1b":
        config = meissonic_1b()
    elif args.config == "tiny":
        config = meissonic_tiny()
    else:
        raise SystemExit(f"unknown --arch {args.config!r}; use medium, 1b or tiny")
    torch.manual_seed(0)
    with torch.device(device):
        model = MeissonicTransformer(config)
    return model.to(dtype).eval()


def forward_flops(config, rows: int, grid_h: int, grid_w: int, text_len: int, head_positions: int,
                  head_out_rows: int, with_context: bool = True, token_rows: int | None = None) -> float:
    """Multiply-add FLOPs (x2) of one forward over `rows` sequences.

    head_positions: positions (summed over rows) through the head's first layer; head_out_rows:
    positions through its last (D -> codebook) layer. with_context: include the text projection and
    the pooled/micro-condition MLPs (hoisted out of the fast loop). token_rows: rows whose tokens are
    embedded (default `rows`; the fast loop embeds the tokens shared by the guidance rows once). The
    embedding's 1x1 conv is counted at every position, an upper bound for the fast loop, which runs
    it once per distinct token id.
    """
    d, k = config.inner_dim, config.codebook_size
    token_rows = rows if token_rows is None else token_rows
    n_full = grid_h * grid_w
    n = n_full // 4 if config.downsample else n_full
    s = text_len + n
    f = token_rows * n_full * d * d  # embed 1x1 conv
    if config.downsample:
        f += token_rows * n * 4 * d * d + rows * n * d * 4 * d  # 2x2 strided conv + transposed conv
    f += token_rows * n * d * d + rows * n * d * d  # project_to_hidden / project_from_hidden
    if with_context:
        f += rows * text_len * config.joint_attention_dim * d
    blocks = config.num_layers + config.num_single_layers
    f += blocks * rows * s * 12 * d * d  # qkv + out/mlp projections: 12 D^2 per token in both block kinds
    f += blocks * rows * 2 * s * s * d  # QK^T and AV
    f += rows * d * (config.num_layers * 12 * d + config.num_single_layers * 3 * d)  # AdaLN modulation
    # the timestep MLP (one row: the timestep is shared), and the pooled/micro-condition MLPs with the context
    f += (256 * d + d * d) + (0 if not with_context else rows * ((config.pooled_projection_dim + 1280) * d + 3 * d * d))
    f += head_positions * d * d + head_out_rows * d * k
    return 2.0 * f


def loop_flops(config, scheduler_table: list[int], batch: int, guided: bool, grid_h: int, grid_w: int,
               exact: bool) -> float:
    rows = 2 * batch if guided else batch
    n_full = grid_h * grid_w
    total = 0.0
    masked = n_full
    for remaining in scheduler_table:
        if exact:
            total += forward_flops(config, rows, grid_h, grid_w, TEXT_TOKENS, rows * n_full, rows * n_full, True)
        else:
            total += forward_flops(config, rows, grid_h, grid_w, TEXT_TOKENS, rows * masked, batch * masked, False,
                                   token_rows=batch)
        masked = remaining
    return total


def matmul_peak(device, dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul (best of repeated runs)."""
    import torch

    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    a @ b
    sync(device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or best == math.inf:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="released-layout folder (only transformer/ is needed)")
    ap.add_argument("--arch", "--config", dest="config", default=None,
                    help="random weights of this architecture instead of --model: medium, 1b or tiny (--config: old spelling)")
    ap.add_argument("--resolution", default=None, help="pixels, square or WxH (default 1024 for 1b, else 512)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=9.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each loop, alternating (median reported)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps of an untimed run first")
    ap.add_argument("--compare-official-style", action="store_true", help="also time the exact (official-work) loop")
    ap.add_argument("--compile", action="store_true", help="also time the fast loop with compiled blocks")
    ap.add_argument("--sampler", default="", help="SamplerOptions FIELD=VALUE pairs for the fast loop, e.g. cache_refresh=3")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.config):
        ap.error("give exactly one of --model DIR or --arch medium|1b|tiny")

    import torch

    from meissonic_cli.model.scheduler import MaskGITScheduler
    from meissonic_cli.sample.pipeline import resolve_device, resolve_dtype, sample_tokens
    from meissonic_cli.sample.sample import parse_resolution
    from meissonic_cli.sample.samplers import SamplerOptions

    pairs = [p.partition("=") for p in args.sampler.split(",") if p.strip()]
    options = SamplerOptions(**{k.strip(): json.loads(v) if v.strip()[:1].isdigit() else v.strip() for k, _, v in pairs})
    options.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model = build_transformer(args, dtype, device)
    cfg = model.config
    width, height = parse_resolution(args.resolution or ("1024" if args.config == "1b" else "512"))
    multiple = VQ_FACTOR * (2 if cfg.downsample else 1)
    if width % multiple or height % multiple:
        raise SystemExit(f"--resolution {width}x{height} must be a multiple of {multiple}")
    grid = (height // VQ_FACTOR, width // VQ_FACTOR)
    scheduler = MaskGITScheduler(mask_token_id=cfg.mask_token_id)
    guided = args.cfg > 1.0

    g = torch.Generator().manual_seed(0)
    feats = {
        "text": torch.randn(args.batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
        "pooled": torch.randn(args.batch, cfg.pooled_projection_dim, generator=g),
        "negative_text": torch.randn(args.batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
        "negative_pooled": torch.randn(args.batch, cfg.pooled_projection_dim, generator=g),
    }
    feats = {k: v.to(device, dtype) for k, v in feats.items()}
    micro = torch.tensor([[width, height, 0, 0, 6.0]] * args.batch, device=device)

    models = {"fast": model, "exact": model}
    if args.compile:
        import copy

        from meissonic_cli.model.compiled import compile_blocks

        models["compiled"] = copy.deepcopy(model)
        compile_blocks(models["compiled"])

    def run(mode: str, steps: int) -> tuple[list[float], "torch.Tensor"]:
        """Seconds of each step of one sampling call, and its tokens."""
        gen = torch.Generator(device=device).manual_seed(0)
        marks = []

        def mark(step: int, total: int) -> None:
            sync(device)
            marks.append(time.perf_counter())

        sync(device)
        marks.append(time.perf_counter())
        exact = mode == "exact"
        tokens = sample_tokens(models[mode], scheduler, feats["text"], feats["pooled"], micro, grid, steps=steps,
                               guidance_scale=args.cfg, negative_text=feats["negative_text"],
                               negative_pooled=feats["negative_pooled"], generator=gen, exact=exact, callback=mark,
                               sampler=None if exact else options)
        return [b - a for a, b in zip(marks, marks[1:])], tokens

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    modes = ["fast"] + (["compiled"] if args.compile else []) + (["exact"] if args.compare_official_style else [])
    if args.warmup_steps:
        for mode in modes:
            run(mode, args.warmup_steps)
    # On a shared machine the load changes during the run: the loops alternate (order reversed every
    # repeat) and the matmul peak is measured before each repeat; the best peak is the reference.
    runs: dict[str, list[list[float]]] = {m: [] for m in modes}
    outputs: dict[str, "torch.Tensor"] = {}
    peaks = []
    for r in range(args.repeats):
        peaks.append(matmul_peak(device, dtype, seconds=0.5))
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            seconds, outputs[mode] = run(mode, args.steps)
            runs[mode].append(seconds)
    peak = max(peaks)

    table = scheduler.masked_after_step(args.steps, grid[0] * grid[1])
    result = {
        "config": args.config or str(args.model), "params": sum(p.numel() for p in model.parameters()),
        "resolution": f"{width}x{height}", "grid": list(grid), "steps": args.steps, "batch": args.batch,
        "cfg": args.cfg, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "repeats": args.repeats,
        "sampler": options.label,
        "peak_matmul_gflops": peak / 1e9,
    }
    prefixes = {"fast": "", "compiled": "compiled_", "exact": "official_style_"}
    for mode in modes:
        totals = [sum(steps) for steps in runs[mode]]
        total = statistics.median(totals)
        # Step i does the same work in every repeat, so its fastest repeat is the least disturbed one.
        best = sum(min(steps[i] for steps in runs[mode]) for i in range(args.steps))
        flops = loop_flops(cfg, table, args.batch, guided, grid[0], grid[1], mode == "exact")
        prefix = prefixes[mode]
        result[prefix + "seconds_per_step"] = total / args.steps
        result[prefix + "total_seconds"] = total
        result[prefix + "runs_seconds"] = totals
        result[prefix + "best_seconds_per_step"] = best / args.steps
        result[prefix + "gflop_per_step"] = flops / args.steps / 1e9
        result[prefix + "achieved_gflops"] = flops / total / 1e9
        result[prefix + "fraction_of_peak"] = flops / total / peak
        result[prefix + "best_fraction_of_peak"] = flops / best / peak
    # Each repeat runs the loops back to back, so their ratio shares that repeat's load.
    if args.compare_official_style:
        result["speedup_vs_official_style"] = result["official_style_seconds_per_step"] / result["seconds_per_step"]
        result["best_speedup_vs_official_style"] = (result["official_style_best_seconds_per_step"]
                                                    / result["best_seconds_per_step"])
        result["paired_speedups"] = [sum(e) / sum(f) for f, e in zip(runs["fast"], runs["exact"])]
    if args.compile:
        result["compiled_speedup_vs_eager"] = result["seconds_per_step"] / result["compiled_seconds_per_step"]
        result["compiled_paired_speedups_vs_eager"] = [sum(f) / sum(c) for f, c in zip(runs["fast"], runs["compiled"])]
        result["compiled_tokens_differing"] = int((outputs["compiled"] != outputs["fast"]).sum())
        if args.compare_official_style:
            result["compiled_speedup_vs_official_style"] = (result["official_style_seconds_per_step"]
                                                            / result["compiled_seconds_per_step"])
            result["compiled_paired_speedups_vs_official_style"] = [
                sum(e) / sum(c) for c, e in zip(runs["compiled"], runs["exact"])]
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if args.config == "medium":
        ref = medium_reference()
        result["reference_official_forward_s"] = ref["mean_s"]
        result["reference_note"] = (f"official model forward, batch {ref['batch']}, grid {ref['token_grid']}, "
                                    f"{ref['threads']} threads, another CPU (cases.json timing_medium_cpu)")

    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['config']} ({result['params'] / 1e6:.1f}M params) at {result['resolution']} "
              f"(grid {grid[0]}x{grid[1]}), batch {args.batch}, cfg {args.cfg}, {args.steps} steps, "
              f"{result['device']} {result['dtype']}, threads {result['threads']}")
        print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s")
        names = {"fast": "fast loop", "compiled": "fast loop, compiled", "exact": "official-style (exact) loop"}
        for mode in modes:
            p = prefixes[mode]
            print(f"{names[mode]}: {result[p + 'seconds_per_step']:.4f} s/step (median run), {result[p + 'total_seconds']:.2f} s "
                  f"total, {result[p + 'gflop_per_step']:.1f} GFLOP/step, {result[p + 'achieved_gflops']:.1f} GFLOP/s "
                  f"({100 * result[p + 'fraction_of_peak']:.0f}% of peak); fastest repeat of each step: "
                  f"{result[p + 'best_seconds_per_step']:.4f} s/step ({100 * result[p + 'best_fraction_of_peak']:.0f}% of peak)")
        if args.compare_official_style:
            print(f"speedup per step vs official-style: {result['speedup_vs_official_style']:.2f}x (median runs), "
                  f"{result['best_speedup_vs_official_style']:.2f}x (fastest repeat of each step), per repeat "
                  f"{', '.join(f'{x:.2f}x' for x in result['paired_speedups'])}")
        if args.compile:
            print(f"compiled vs eager fast loop: {result['compiled_speedup_vs_eager']:.2f}x (median runs), per repeat "
                  f"{', '.join(f'{x:.2f}x' for x in result['compiled_paired_speedups_vs_eager'])}; "
                  f"tokens differing from eager: {result['compiled_tokens_differing']}")
            if args.compare_official_style:
                print(f"compiled vs official-style: {result['compiled_speedup_vs_official_style']:.2f}x (median runs), "
                      f"per repeat {', '.join(f'{x:.2f}x' for x in result['compiled_paired_speedups_vs_official_style'])}")
        if "peak_memory_gb" in result:
            print(f"peak GPU memory: {result['peak_memory_gb']:.2f} GB")
        if "reference_official_forward_s" in result:
            print(f"reference: {result['reference_note']}: {result['reference_official_forward_s']:.2f} s per forward")
    return result


if __name__ == "__main__":
    main()
