"""Peak memory and seconds per step of one `sample` of the released 1B architecture, per setting.

    python benchmarks/memory.py --build /tmp/meissonic-1b-random      # once: random weights, released layout (~5.5 GB)
    python benchmarks/memory.py --model /tmp/meissonic-1b-random --out benchmarks/results/memory
    python benchmarks/memory.py --model DIR --settings fp32,bf16 --steps 2 --resolution 1024

The model folder holds random weights in the released layout and sizes: the 1B transformer
(`meissonic_1b()`, float32 files as released), the CLIP ViT-H/14 text tower and the released VQ
(`model/scaffold.py` builds it, as `meissonic info --arch 1b` describes it). Each setting runs in a
fresh Python process: `MeissonicPipeline.from_pretrained(...)` and one `pipe(...)` call at the given
resolution (default 1024x1024: 2x2 compression, a 32x32 grid in the blocks), classifier-free guidance
9 (two rows per step), `--steps` steps (default 1), PIL output.

What is measured:
- CPU: peak resident memory (RSS) over the process's baseline after its imports. The child imports
  torch and the toolkit, reads its RSS, resets the kernel's high-water mark (`/proc/self/clear_refs`,
  5), loads and samples, and reads the high-water mark (`VmHWM`). The difference is what loading and
  sampling add: weights, activations, allocator slack; not the ~0.5 GB torch itself takes.
- CUDA: `torch.cuda.max_memory_allocated()` over the whole load and sample (the CPU figure too).
- s/step: the mean time between the sampler's step callbacks (the first includes one-time work).
- s/image: `seconds_to_step` gives the seconds from the call's start (text encoding included) to the
  end of step 48 and of step 64 when the run has that many steps (the official README's 64, our 48).
Each setting names its `--vq-decode`: `whole` (the default, the official decode) or `banded` (the
low-memory decode; `+banded` rows, and the offload/int4 rows, which exist for small GPUs).
A setting the device cannot run (offload or int4 on CPU) is reported as n/a with the reason.

Writes memory.json and memory.md to --out, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS: dict[str, dict[str, str]] = {
    "fp32": {"dtype": "fp32", "quantize": "none", "offload": "none", "vq_decode": "whole"},
    "bf16": {"dtype": "bf16", "quantize": "none", "offload": "none", "vq_decode": "whole"},
    "bf16+banded": {"dtype": "bf16", "quantize": "none", "offload": "none", "vq_decode": "banded"},
    "bf16+offload": {"dtype": "bf16", "quantize": "none", "offload": "model", "vq_decode": "whole"},
    "int8": {"dtype": "bf16", "quantize": "int8", "offload": "none", "vq_decode": "whole"},
    "int8+banded": {"dtype": "bf16", "quantize": "int8", "offload": "none", "vq_decode": "banded"},
    "int8+offload": {"dtype": "bf16", "quantize": "int8", "offload": "model", "vq_decode": "banded"},
    "int4": {"dtype": "bf16", "quantize": "int4", "offload": "none", "vq_decode": "banded"},
}
GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Phases:
    """Peak RSS per phase of one setting: at each phase's end the kernel's high-water mark (VmHWM) is the
    phase's peak; it is then reset (`clear_refs` 5), so the next phase starts from its own RSS."""

    def __init__(self, baseline_kib: int):
        self.baseline_kib = baseline_kib
        self.peak_kib = baseline_kib
        self.rows: list[dict[str, Any]] = []

    def end(self, name: str) -> None:
        peak, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
        self.peak_kib = max(self.peak_kib, peak)
        self.rows.append({"phase": name, "peak_over_baseline_gib": round((peak - self.baseline_kib) / 2**20, 3),
                          "rss_after_gib": round((rss - self.baseline_kib) / 2**20, 3)})
        Path("/proc/self/clear_refs").write_text("5")

    def wrap(self, obj: Any, method: str, name: str, before: str | None = None) -> None:
        """End a phase before (`before`, if given) and after every call of `obj.method` (`name`)."""
        inner = getattr(obj, method)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before:
                self.end(before)
            out = inner(*args, **kwargs)
            self.end(name)
            return out

        object.__setattr__(obj, method, wrapped)


def _nbytes(t: Any) -> int:
    """Bytes of a tensor, summed over the inner tensors of a tensor subclass (torchao's quantized weights)."""
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
        names = t.__tensor_flatten__()[0]
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_gib(pipe: Any) -> dict[str, Any]:
    """GiB of parameters and buffers per part, with their dtypes."""
    out: dict[str, Any] = {}
    for name in ("transformer", "text_encoder", "vq"):
        part = getattr(pipe, name)
        tensors = [*part.parameters(), *part.buffers()]
        size = sum(_nbytes(t) for t in tensors)
        out[name] = {"gib": round(size / GIB, 3), "dtypes": sorted({str(t.dtype) for t in tensors})}
    return out


def build(folder: str) -> None:
    from meissonic_cli.model.scaffold import build_model_folder
    from meissonic_cli.model.text_encoder import vit_h14_text_config
    from meissonic_cli.model.transformer import meissonic_1b
    from meissonic_cli.model.vq.vqgan import meissonic_vq_config

    build_model_folder(folder, meissonic_1b(), vit_h14_text_config(), meissonic_vq_config(), seed=0)
    print(f"built {folder}")


def child(setting: str, model: str, device: str, resolution: int, steps: int) -> dict[str, Any]:
    """One setting, in this (fresh) process."""
    import torch

    from meissonic_cli.device import resolve_device, resolve_dtype
    from meissonic_cli.errors import InputError
    from meissonic_cli.model.quantize import check_quantize
    from meissonic_cli.sample.offload import check_offload
    from meissonic_cli.sample.pipeline import MeissonicPipeline

    opts = SETTINGS[setting]
    dev = resolve_device(device)
    row: dict[str, Any] = {"setting": setting, **opts, "device": str(dev), "resolution": resolution, "steps": steps}
    try:
        check_quantize(opts["quantize"], dev, resolve_dtype(opts["dtype"]))
        check_offload(opts["offload"], dev)
    except InputError as err:
        return {**row, "status": "n/a", "why": str(err)}
    # Everything loading imports lazily is imported first: the baseline holds the code, not the model.
    import diffusers  # noqa: F401  (the VQ)
    import open_clip  # noqa: F401  (the text encoder)

    import meissonic_cli.model.vq.vqgan  # noqa: F401
    if opts["quantize"] != "none":
        import torchao.quantization  # noqa: F401
    baseline_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    phases = Phases(baseline_kib)
    pipe = MeissonicPipeline.from_pretrained(model, device=dev, dtype=opts["dtype"], quantize=opts["quantize"],
                                             offload=opts["offload"])
    load_s = time.perf_counter() - start
    phases.end("load")
    marks = [time.perf_counter()]

    def tick(step: int, total: int) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        marks.append(time.perf_counter())
        phases.end(f"step {step}")

    phases.wrap(pipe.text_encoder, "encode", "text encode")
    phases.wrap(pipe.vq, "decode", "VQ decode", before="after the last step")
    pipe(["a photo of a red fox in the snow"], negative_prompt="", steps=steps, guidance_scale=9.0,
         height=resolution, width=resolution, seed=0, callback=tick, vq_decode=opts["vq_decode"])
    phases.end("PIL conversion")
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    peak_kib = phases.peak_kib
    row.update(status="ok", baseline_rss_gib=baseline_kib / 2**20, peak_rss_over_baseline_gib=(peak_kib - baseline_kib) / 2**20,
               load_s=load_s, s_per_step=sum(per_step) / len(per_step), torch=torch.__version__,
               threads=torch.get_num_threads(), phases=phases.rows, weights_gib=weight_gib(pipe),
               # sampling seconds up to the end of step N (text encoding included, decode not): the
               # s/image of an N-step run, for the step counts the official README and our default use
               seconds_to_step={n: marks[n] - marks[0] for n in (48, 64) if n < len(marks)})
    if dev.type == "cuda":
        row["peak_vram_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
        row["gpu"] = torch.cuda.get_device_name(dev)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    cuda = any(r.get("peak_vram_gib") is not None for r in rows)
    head = ("| setting | --dtype | --quantize | --offload | --vq-decode | peak " + ("VRAM" if cuda else "RSS over baseline")
            + " | s/step |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            why = r.get("why", r.get("status", "failed"))
            lines.append(f"| {r['setting']} | {r['dtype']} | {r['quantize']} | {r['offload']} | {r['vq_decode']} | "
                         f"n/a ({why}) | n/a |")
            continue
        peak = r["peak_vram_gib"] if cuda else r["peak_rss_over_baseline_gib"]
        lines.append(f"| {r['setting']} | {r['dtype']} | {r['quantize']} | {r['offload']} | {r['vq_decode']} | {peak:.2f} GiB | "
                     f"{r['s_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", help="write the random-weight 1B folder here and exit")
    ap.add_argument("--model", help="the model folder (from --build)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for memory.json and memory.md")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per setting")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the settings that would start after this")
    ap.add_argument("--json", action="store_true", help="print one JSON line (rows) instead of the table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:
        build(args.build)
        return 0
    if not args.model:
        ap.error("--model DIR is required (make one with --build DIR)")
    if args.child:
        print(json.dumps(child(args.child, args.model, args.device, args.resolution, args.steps)))
        return 0
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {', '.join(unknown)}; use {', '.join(SETTINGS)}")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for name in names:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            rows.append({"setting": name, **SETTINGS[name], "status": "skipped", "why": "out of the time budget"})
            continue
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--device", args.device,
               "--resolution", str(args.resolution), "--steps", str(args.steps)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode == 0 and lines:
                rows.append(json.loads(lines[-1]))
            else:
                err = (run.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"setting": name, **SETTINGS[name], "status": "failed", "why": err[:300]})
        except subprocess.TimeoutExpired:
            rows.append({"setting": name, **SETTINGS[name], "status": "failed", "why": f"over {args.timeout:.0f} s"})
        print(json.dumps(rows[-1]), file=sys.stderr)
    table = markdown(rows)
    print(json.dumps({"resolution": args.resolution, "steps": args.steps, "rows": rows}) if args.json else table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        (out / "memory.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
