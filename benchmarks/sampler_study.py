"""Quality per transformer evaluation of the samplers, on the demo's trained model and its shapes benchmark.

    python benchmarks/sampler_study.py --demo DEMO_OUT --out OUT [--steps 4,8,12,16,24,32] [--seeds 0,1]
        [--settings official,halton,...] [--max-prompts N] [--batch N] [--threads N] [--speed-repeats 3]

DEMO_OUT is a `meissonic demo` output folder (its report.json names the trained checkpoint and the
budget, whose sampler settings - guidance, temperatures - every setting here starts from). For each
sampler setting, step count and sampler seed, the shapes benchmark prompts are sampled (all in one
batch by default), decoded, and scored in memory with the benchmark's scorer (`shapes.bench.score_image`,
what `meissonic eval --suite shapes` uses). Per cell it records the per-attribute accuracies, the
transformer evaluations per image (steps, twice with classifier-free guidance), and the seconds per
image of the sampling loop (text features are computed once, outside the timing; decoding and scoring
are not timed). Cells are appended to OUT/cells.jsonl as they finish, so a rerun resumes.

Then it writes OUT/study.md (the table, the targets, the cache's exactness and a paired speed check),
OUT/study.json and OUT/study.png (overall accuracy against evaluations, one line per setting; drawn with
PIL). Every row can be reproduced with `meissonic eval --suite shapes --prompts shapes --model CKPT`
and the setting's flags (printed in the table).

The speed check (--speed-repeats) alternates the official sampler and each cached setting at 16 steps
on the same prompts and reports the best of the repeats for each: on a shared machine the single timed
run of a cell is noisy, the paired minimum much less so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ATTRIBUTES = ("color", "shape", "position", "count", "overall")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    flags: dict[str, Any]  # SampleConfig fields (CLI flags) on top of the demo's sampler settings
    guided: bool = True  # False: classifier-free guidance off (cfg 1), half the evaluations

    def options(self) -> Any:
        from meissonic_cli.sample.samplers import SamplerOptions

        return SamplerOptions(**{k: v for k, v in self.flags.items() if k in SamplerOptions.__dataclass_fields__})

    def cli(self) -> str:
        parts = [f"--{k.replace('_', '-')} {v}" for k, v in self.flags.items()]
        if not self.guided:
            parts.append("--guidance-scale 1")
        return " ".join(parts) or "(defaults)"


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("official", {}),
    Setting("halton", {"order": "halton"}),
    Setting("random", {"order": "random"}),
    Setting("halton/linear", {"order": "halton", "schedule": "linear"}),
    Setting("confidence/arccos", {"schedule": "arccos"}),
    Setting("noise-reg 2", {"noise_reg": 2.0}),
    Setting("differential 0.75", {"differential": 0.75}),
    Setting("cache 2", {"cache_refresh": 2}),
    Setting("cache 3", {"cache_refresh": 3}),
    Setting("official cfg1", {}, guided=False),
    Setting("halton cfg1", {"order": "halton"}, guided=False),
]}
DEFAULT_SETTINGS = ("official", "halton", "random", "confidence/arccos", "noise-reg 2", "differential 0.75", "cache 2",
                    "cache 3", "official cfg1", "halton cfg1")


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise SystemExit(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def run_cells(cells_path: Path, keep: Callable[[dict[str, Any]], bool], plan: Iterable[tuple[str, int, int]],
              run: Callable[[str, int, int], dict[str, Any]], run_new: bool = True) -> list[dict[str, Any]]:
    """The cells of `cells_path` that `keep` accepts, plus each (setting, steps, seed) of `plan` not among them,
    run with `run` (unless not `run_new`) and appended to the file as it finishes, so a rerun resumes."""
    cells = [json.loads(line) for line in cells_path.read_text().splitlines() if line.strip()] if cells_path.is_file() else []
    cells = [c for c in cells if keep(c)]
    done = {(c["setting"], c["steps"], c["seed"]) for c in cells}
    for name, steps, seed in plan:
        if (name, steps, seed) in done or not run_new:
            continue
        cell = run(name, steps, seed)
        cells.append(cell)
        with cells_path.open("a") as fh:
            fh.write(json.dumps(cell) + "\n")
        print(f"{name:>24} {steps:>3} steps seed {seed}: overall {cell['overall']:.3f}, "
              f"{cell['seconds_per_image']:.4f} s/image", flush=True)
    return cells


# ----------------------------------------------------------------------------------------------
# Running the cells


class Study:
    def __init__(self, args: argparse.Namespace):
        import torch

        from meissonic_cli.sample.pipeline import MeissonicPipeline
        from meissonic_cli.sample.sample import parse_temperature
        from meissonic_cli.shapes import world
        from meissonic_cli.shapes.demo import BUDGETS, IMAGE_SIZE

        report_path = Path(args.demo) / "report.json"
        if not report_path.is_file():
            raise SystemExit(f"{report_path} not found: run `meissonic demo --out {args.demo}` first")
        report = json.loads(report_path.read_text())
        self.checkpoint = Path(report.get("checkpoint") or Path(args.demo) / "model")
        budget = BUDGETS[report.get("budget", "full")]
        self.cfg, self.temperature = budget.cfg, parse_temperature(budget.temperature)
        self.token_temperature = budget.token_temperature
        self.demo_report = report
        if args.threads:
            torch.set_num_threads(args.threads)
        self.pipe = MeissonicPipeline.from_pretrained(self.checkpoint, device="cpu", dtype="fp32")
        prompts = world.benchmark_prompts()
        if args.max_prompts and args.max_prompts < len(prompts):
            # A fixed random subset: evenly spaced picks would follow the list's shape cycles (every third
            # position prompt has the same shape), a biased, easier subset.
            import random

            keep = sorted(random.Random(0).sample(range(len(prompts)), args.max_prompts))
            prompts = [prompts[i] for i in keep]
        self.prompt_set = "all" if len(prompts) == 78 else f"random0-{len(prompts)}"
        self.prompts = prompts
        self.batch = args.batch or len(prompts)
        self.size = IMAGE_SIZE
        self.grid = self.pipe.check_resolution(self.size, self.size)
        texts = [p.text for p in prompts]
        self.text, self.pooled = self.pipe.encode_prompts(texts)
        self.neg_text, self.neg_pooled = self.pipe.encode_prompts([""] * len(texts))
        self.micro = self.pipe._micro_conds(None, len(texts), self.size, self.size)

    def sample(self, setting: Setting, steps: int, seed: int, trace: Optional[dict] = None) -> tuple[Any, float]:
        """Codes (N, h, w) for every prompt, and the seconds of the sampling loops."""
        import torch

        from meissonic_cli.sample.pipeline import sample_tokens

        outs, seconds = [], 0.0
        guidance = self.cfg if setting.guided else 1.0
        for start in range(0, len(self.prompts), self.batch):
            rows = slice(start, min(len(self.prompts), start + self.batch))
            gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
            t0 = time.perf_counter()
            codes = sample_tokens(
                self.pipe.transformer, self.pipe.scheduler, self.text[rows], self.pooled[rows], self.micro[rows],
                self.grid, steps=steps, guidance_scale=guidance, negative_text=self.neg_text[rows],
                negative_pooled=self.neg_pooled[rows], temperature=self.temperature, generator=gen,
                num_codes=self.pipe._num_codes(), token_temperature=self.token_temperature,
                sampler=setting.options(), trace=trace)
            seconds += time.perf_counter() - t0
            outs.append(codes)
        return torch.cat(outs), seconds

    def score(self, codes: Any) -> dict[str, Any]:
        import torch

        from meissonic_cli.model.vq import tensor_to_images
        from meissonic_cli.shapes import bench

        with torch.inference_mode():
            images = tensor_to_images(self.pipe.vq.decode(codes))
        return bench.summarize([bench.score_image(im, p) for im, p in zip(images, self.prompts)])

    def cell(self, setting: Setting, steps: int, seed: int) -> dict[str, Any]:
        from meissonic_cli.sample.samplers import evaluations

        codes, seconds = self.sample(setting, steps, seed)
        summary = self.score(codes)
        n = len(self.prompts)
        return {"setting": setting.name, "steps": steps, "seed": seed, "images": n,
                "evaluations": evaluations(steps, setting.guided), "seconds_per_image": seconds / n,
                "seconds_per_step": seconds / steps, **{a: summary[a] for a in ATTRIBUTES}}


# ----------------------------------------------------------------------------------------------
# Summaries


def mean_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, steps): the seeds' mean of every number, and the seeds' spread of overall."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["setting"], c["steps"]), []).append(c)
    rows = []
    for (name, steps), cs in groups.items():
        row = {"setting": name, "steps": steps, "seeds": len(cs), "evaluations": cs[0]["evaluations"],
               "images": sum(c["images"] for c in cs)}
        for key in (*ATTRIBUTES, "seconds_per_image", "seconds_per_step"):
            values = [c[key] for c in cs if c.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
        overall = [c["overall"] for c in cs]
        row["overall_spread"] = (max(overall) - min(overall)) / 2 if len(overall) > 1 else None
        rows.append(row)
    return rows


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], order: list[str], extra: dict[str, Any]) -> str:
    lines = ["# Sampler study: shapes benchmark accuracy per transformer evaluation", ""]
    lines.append(extra["scale"])
    lines += ["", "| setting | flags | steps | evaluations | color | shape | position | count | overall (± seeds) "
                  "| s/image | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        for r in sorted((r for r in rows if r["setting"] == name), key=lambda r: r["steps"]):
            spread = f" ± {r['overall_spread']:.3f}" if r["overall_spread"] is not None else ""
            lines.append(f"| {name} | `{SETTINGS[name].cli()}` | {r['steps']} | {r['evaluations']} | {fmt(r['color'])} | "
                         f"{fmt(r['shape'])} | {fmt(r['position'])} | {fmt(r['count'])} | {fmt(r['overall'])}{spread} | "
                         f"{fmt(r['seconds_per_image'], 4)} | {fmt(r['seconds_per_step'], 3)} |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in extra["targets"]]
    lines += ["", "## Best setting per budget (evaluations per image)", ""]
    lines += ["| at most | setting | steps | overall |", "|---|---|---|---|"]
    for b in extra["best"]:
        lines.append(f"| {b['budget']} | {b['setting']} | {b['steps']} | {fmt(b['overall'])} |")
    if extra.get("exactness"):
        lines += ["", "## Cache exactness (guided logits at the masked positions, cached vs uncached forward at the "
                      "same state)", "", "| setting | steps | cached steps | max abs diff | mean abs diff | "
                      "logit std (for scale) |", "|---|---|---|---|---|---|"]
        for e in extra["exactness"]:
            lines.append(f"| {e['setting']} | {e['steps']} | {e['cached_steps']} | {e['max_abs']:.4f} | "
                         f"{e['mean_abs']:.5f} | {e['logit_std']:.3f} |")
    if extra.get("speed"):
        lines += ["", "## Paired speed check (best of repeats, same prompts, alternating)", "",
                  "| setting | steps | s/image | speed-up vs official |", "|---|---|---|---|"]
        for s in extra["speed"]:
            lines.append(f"| {s['setting']} | {s['steps']} | {s['seconds_per_image']:.4f} | {s['speedup']:.2f}x |")
    lines += ["", "![accuracy vs evaluations](study.png)", ""]
    return "\n".join(lines)


def best_per_budget(rows: list[dict[str, Any]], budgets: list[int]) -> list[dict[str, Any]]:
    out = []
    for budget in budgets:
        fits = [r for r in rows if r["evaluations"] <= budget and r["overall"] is not None]
        if fits:
            best = max(fits, key=lambda r: (r["overall"], -r["evaluations"]))
            out.append({"budget": budget, "setting": best["setting"], "steps": best["steps"], "overall": best["overall"]})
    return out


def targets(rows: list[dict[str, Any]], speed: list[dict[str, Any]]) -> list[str]:
    out = []
    ref = next((r for r in rows if r["setting"] == "official" and r["steps"] == 16), None)
    if ref is not None:
        cheap = [r for r in rows if r["evaluations"] <= 8]
        best = max(cheap, key=lambda r: r["overall"]) if cheap else None
        if best is None:
            out.append("no setting with at most 8 evaluations was run")
        else:
            verdict = "reached" if best["overall"] >= ref["overall"] else "not reached"
            out.append(f"official sampler at 16 steps ({ref['evaluations']} evaluations): overall {ref['overall']:.3f}; "
                       f"best with <= 8 evaluations: {best['setting']} at {best['steps']} steps ({best['evaluations']} "
                       f"evaluations), overall {best['overall']:.3f}: {verdict}")
    for name in sorted({r["setting"] for r in rows if r["setting"].startswith("cache")}):
        for r in sorted((r for r in rows if r["setting"] == name), key=lambda r: r["steps"]):
            base = next((o for o in rows if o["setting"] == "official" and o["steps"] == r["steps"]), None)
            if base is None or not r["seconds_per_image"]:
                continue
            out.append(f"{name} at {r['steps']} steps: {base['seconds_per_image'] / r['seconds_per_image']:.2f}x fewer "
                       f"s/image than official (single runs), overall {r['overall'] - base['overall']:+.3f}")
    for s in speed:
        out.append(f"paired speed check: {s['setting']} at {s['steps']} steps is {s['speedup']:.2f}x the official "
                   f"sampler's speed (best of repeats)")
    return out


# ----------------------------------------------------------------------------------------------
# The plot (PIL: matplotlib is not a dependency)


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]


def plot(rows: list[dict[str, Any]], order: list[str], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 900, 560, 70, 230, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    evals = [r["evaluations"] for r in rows]
    accs = [r["overall"] for r in rows if r["overall"] is not None]
    if not evals or not accs:
        image.save(path)
        return
    x0, x1 = math.log2(max(1, min(evals))) - 0.2, math.log2(max(evals)) + 0.2
    y0, y1 = max(0.0, math.floor(min(accs) * 10) / 10), min(1.0, math.ceil(max(accs) * 10) / 10)
    if y1 <= y0:
        y1 = y0 + 0.1

    def xy(e: float, a: float) -> tuple[float, float]:
        x = left + (math.log2(e) - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - (a - y0) / (y1 - y0) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for e in sorted(set(evals)):
        x, _ = xy(e, y0)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 6, height - bottom + 8), str(e), fill="black", font=font)
    steps = 10
    for i in range(steps + 1):
        a = y0 + (y1 - y0) * i / steps
        _, y = xy(1, a)
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left, y, width - right, y], fill=(235, 235, 235))
        draw.text((left - 40, y - 6), f"{a:.2f}", fill="black", font=font)
    draw.text((left + (width - left - right) // 2 - 150, height - 25),
              "transformer evaluations per image (log scale; CFG counts twice)", fill="black", font=font)
    draw.text((8, top - 25), "shapes overall accuracy (mean of seeds)", fill="black", font=font)
    draw.text((left + 260, 8), title, fill="black", font=font)
    for k, name in enumerate(order):
        pts = sorted((r["evaluations"], r["overall"]) for r in rows if r["setting"] == name and r["overall"] is not None)
        if not pts:
            continue
        colour = COLOURS[k % len(COLOURS)]
        xys = [xy(e, a) for e, a in pts]
        if len(xys) > 1:
            draw.line(xys, fill=colour, width=2)
        for x, y in xys:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 10 + 18 * k
        draw.line([width - right + 15, ly + 6, width - right + 40, ly + 6], fill=colour, width=3)
        draw.text((width - right + 46, ly), name, fill="black", font=font)
    image.save(path)


# ----------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="a `meissonic demo` output folder (report.json, the checkpoint)")
    ap.add_argument("--out", required=True, help="folder for cells.jsonl, study.md, study.json, study.png")
    ap.add_argument("--steps", default="4,8,12,16,24,32")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                    help=f"comma-separated, from: {', '.join(SETTINGS)}")
    ap.add_argument("--max-prompts", type=int, default=0, help="use this many benchmark prompts, a fixed random subset (0 = all 78)")
    ap.add_argument("--batch", type=int, default=0, help="prompts sampled together (0 = all)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's choice)")
    ap.add_argument("--speed-repeats", type=int, default=3, help="paired speed check repeats (0 = skip)")
    ap.add_argument("--exactness-steps", type=int, default=16, help="steps of the cache exactness run (0 = skip)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    steps_list, seeds = parse_ints(args.steps), parse_ints(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    key = (len(study.prompts), str(study.checkpoint), study.prompt_set)
    # Step counts outermost, in the order given: a run cut short still compares every setting.
    cells = run_cells(out / "cells.jsonl", lambda c: (c.get("images"), c.get("checkpoint"), c.get("prompt_set", "all")) == key,
                      [(name, steps, seed) for steps in steps_list for name in names for seed in seeds],
                      lambda name, steps, seed: {**study.cell(SETTINGS[name], steps, seed), "checkpoint": str(study.checkpoint),
                                                 "prompt_set": study.prompt_set})
    cells = [c for c in cells if c["setting"] in names and c["steps"] in steps_list and c["seed"] in seeds]
    rows = mean_rows(cells)

    exactness = []
    if args.exactness_steps:
        import torch

        for name in names:
            setting = SETTINGS[name]
            if setting.options().cache_refresh <= 1:
                continue
            trace: dict = {}
            study.sample(setting, args.exactness_steps, seeds[0], trace=trace)
            codes = torch.full((len(study.prompts), *study.grid), study.pipe.scheduler.config.mask_token_id)
            scale = study.pipe.logits(codes, [p.text for p in study.prompts], guidance_scale=study.cfg,
                                      timestep=args.exactness_steps - 1).float().std().item()
            exactness.append({"setting": name, "steps": args.exactness_steps, "cached_steps": len(trace["max_abs"]),
                              "max_abs": max(trace["max_abs"]), "mean_abs": statistics.fmean(trace["mean_abs"]),
                              "logit_std": scale})
    speed = []
    cached = [n for n in names if SETTINGS[n].options().cache_refresh > 1]
    if args.speed_repeats and cached and "official" in names:
        best: dict[str, float] = {}
        for r in range(args.speed_repeats):
            for name in (["official"] + cached)[:: 1 if r % 2 == 0 else -1]:
                _, seconds = study.sample(SETTINGS[name], 16, seeds[0])
                best[name] = min(best.get(name, math.inf), seconds / len(study.prompts))
        speed = [{"setting": n, "steps": 16, "seconds_per_image": best[n], "speedup": best["official"] / best[n]}
                 for n in ["official"] + cached]

    budgets = sorted({r["evaluations"] for r in rows})
    scale = (f"Model: {study.checkpoint} (the demo's, budget {study.demo_report.get('budget')}); "
             f"{len(study.prompts)} of 78 benchmark prompts x {len(seeds)} sampler seeds ({', '.join(map(str, seeds))}) "
             f"per cell, batch {study.batch}, {study.size} px; sampler base: guidance {study.cfg}, temperature "
             f"{study.temperature}, token temperature {study.token_temperature}. CPU, "
             f"{__import__('torch').get_num_threads()} torch threads; s/image is the sampling loop only.")
    extra = {"scale": scale, "targets": targets(rows, speed), "best": best_per_budget(rows, budgets),
             "exactness": exactness, "speed": speed}
    (out / "study.md").write_text(markdown(rows, names, extra))
    result = {"rows": rows, "cells": cells, **extra, "settings": {n: SETTINGS[n].cli() for n in names}}
    (out / "study.json").write_text(json.dumps(result, indent=1))
    plot(rows, names, out / "study.png", f"sampler study: {len(study.prompts)} prompts x {len(seeds)} seeds, demo model")
    print(f"wrote {out / 'study.md'}, {out / 'study.json'}, {out / 'study.png'}")
    return result


if __name__ == "__main__":
    main()
