"""Guidance distillation on the demo model: teacher (classifier-free guidance, two evaluations per step) vs
the distilled student (one evaluation per step), shapes accuracy per evaluation and seconds per image.

    python benchmarks/distill_study.py --demo DEMO_OUT --out OUT [--steps 4,8,16] [--seeds 0,1,2,3]
        [--prompts 600] [--prompt-seed 2026] [--split test|dev] [--student CKPT | --distill-max-steps N]
        [--student-guidance 1.5,...] [--settings NAMES] [--threads N] [--paper-cost R]

1. Distil (unless --student names a finished student): `meissonic distill` with the recipe
   pipelines/distill/demo_distill.yaml, its paths pointed at DEMO_OUT (teacher = the demo's trained
   checkpoint from report.json, data = DEMO_OUT/tokens), output OUT/distill. The wall time of the run and
   its seconds per optimizer step are recorded (OUT/distill_time.json, with the load average before and
   after); a finished run is reused.
2. Held-out captions: scenes drawn with the shapes world's scene sampler (`shapes.world.sample_scene`)
   from random.Random(--prompt-seed), captions that are among the benchmark's 78 prompts dropped, each
   caption once, the first --prompts of them: the test split, the one the table reports. `--split dev`
   draws --dev-prompts other captions (random.Random(--dev-seed), none of the test split's) for choosing
   a recipe or a sampling scale without looking at the test split. They are scored with the benchmark's
   scorer (`shapes.bench.score_image`, which parses any shapes caption).
3. Cells: teacher with guidance at the demo's scale (confidence = official order, and Halton order),
   teacher without guidance (cfg 1), and the student at each --student-guidance (one forward per step,
   the scale fed to its embedding), at every --steps and sampler seed, with the demo's temperatures; all
   on the same captions and seeds. Cells (with every image's 0/1 score) are appended to OUT/cells.jsonl
   as they finish, so a rerun resumes; teacher cells do not depend on the student and serve every student.
4. Standard errors: each caption's mean over the seeds is one observation (so both the caption and the
   seed variation are in it); `overall ± s.e.` and, against the teacher's official 16 steps, the paired
   difference on the same captions and seeds with its standard error. The targets are judged at cells
   fixed in advance: the student at the first --student-guidance, official order, 8 and 16 steps.

Writes OUT/study.md (table, targets), OUT/study.json and OUT/study.png (overall accuracy against
evaluations per image; sampler_study's PIL plot). Copy study.md/png to docs/distill_study.* to publish.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler_study import ATTRIBUTES, fmt, mean_rows, parse_ints, plot, run_cells  # noqa: E402

RECIPE = REPO / "pipelines" / "distill" / "demo_distill.yaml"


def held_out_prompts(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """`n` distinct captions of random shapes-world scenes that are not benchmark prompts (nor in `exclude`)."""
    from meissonic_cli.shapes import bench, world

    benchmark = {p.text for p in world.benchmark_prompts()}
    rng, out, seen = random.Random(seed), [], set(exclude)
    for _ in range(200 * n):
        caption = world.sample_scene(rng).caption()
        if caption in benchmark or caption in seen or bench.parse_prompt(caption) is None:
            continue
        seen.add(caption)
        out.append(caption)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} distinct held-out captions found; ask for fewer --prompts")


def run_distillation(demo: Path, teacher: Path, out: Path, max_steps: int) -> tuple[Path, dict[str, Any]]:
    """Distil with the demo recipe (paths pointed at `demo`); the last checkpoint and the timing."""
    from meissonic_cli.train.checkpoint import latest_checkpoint
    from meissonic_cli.train.distill import distill, load_distill_config

    run = out / "distill"
    timing_path = out / "distill_time.json"
    overrides: dict[str, Any] = {"data": str(demo / "tokens"), "output": str(run), "teacher": str(teacher)}
    if max_steps:
        overrides.update(max_steps=max_steps, checkpoint_every=max_steps)
    cfg = load_distill_config(RECIPE, overrides).validate()
    final = run / f"step-{cfg.max_steps:08d}"
    if final.is_dir() and timing_path.is_file():
        return final, json.loads(timing_path.read_text())
    if run.exists():
        cfg.resume = "auto"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = distill(cfg)
    seconds = time.perf_counter() - t0
    timing = {"seconds": seconds, "steps": result.steps - result.start_step, "batch_size": cfg.batch_size,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "seconds_per_step": seconds / max(1, result.steps - result.start_step), "max_steps": cfg.max_steps,
              "resumed_from": result.start_step, "recipe": str(RECIPE.relative_to(REPO)),
              "command": f"meissonic distill --config {RECIPE.relative_to(REPO)} --data {demo / 'tokens'} --teacher "
                         f"{teacher} --out {run}" + (f" --max-steps {max_steps} --checkpoint-every {max_steps}" if max_steps else "")}
    timing_path.write_text(json.dumps(timing, indent=1))
    return latest_checkpoint(run) or final, timing


def split_prompts(args: argparse.Namespace) -> list[str]:
    """The captions of --split: test = the first --prompts held-out captions from random.Random(--prompt-seed);
    dev (for choosing settings before the test split is looked at) = --dev-prompts captions from
    random.Random(--dev-seed), none of the test split's."""
    test = held_out_prompts(args.prompts, args.prompt_seed)
    if args.split == "test":
        return test
    return held_out_prompts(args.dev_prompts, args.dev_seed, frozenset(test))


class Study:
    def __init__(self, args: argparse.Namespace):
        import torch

        from meissonic_cli.sample.pipeline import MeissonicPipeline
        from meissonic_cli.sample.sample import parse_temperature
        from meissonic_cli.shapes.demo import BUDGETS, IMAGE_SIZE
        from meissonic_cli.train.checkpoint import latest_checkpoint

        demo = Path(args.demo)
        report_path = demo / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        # The demo's trained checkpoint: report.json names it; without a report (a demo stopped after its
        # train stage) the newest checkpoint in DEMO_OUT/run.
        teacher = args.teacher or report.get("checkpoint") or latest_checkpoint(demo / "run")
        if not teacher:
            raise SystemExit(f"no trained checkpoint in {demo}: run `meissonic demo --out {demo}` first, or give --teacher")
        self.teacher_path = Path(teacher)
        budget = BUDGETS[args.budget or report.get("budget", "full")]
        self.cfg, self.temperature = budget.cfg, parse_temperature(budget.temperature)
        self.token_temperature = budget.token_temperature
        if args.threads:
            torch.set_num_threads(args.threads)
        out = Path(args.out)
        if args.student:
            # A student distilled by an earlier run of this script keeps that run's timing.
            timing_path = out / "distill_time.json"
            inside = Path(args.student).resolve().is_relative_to((out / "distill").resolve())
            self.student_path = Path(args.student)
            self.timing = json.loads(timing_path.read_text()) if inside and timing_path.is_file() else {}
        else:
            self.student_path, self.timing = run_distillation(demo, self.teacher_path, out, args.distill_max_steps)
        self.teacher = MeissonicPipeline.from_pretrained(self.teacher_path, device="cpu", dtype="fp32")
        self.student = MeissonicPipeline.from_pretrained(self.student_path, device="cpu", dtype="fp32")
        if not self.student.transformer.config.guidance_embeds:
            raise SystemExit(f"{self.student_path} is not a guidance-distilled model (guidance_embeds false)")
        self.prompts = split_prompts(args)
        self.size = IMAGE_SIZE
        self.grid = self.teacher.check_resolution(self.size, self.size)
        self.text, self.pooled = self.teacher.encode_prompts(self.prompts)
        self.neg_text, self.neg_pooled = self.teacher.encode_prompts([""] * len(self.prompts))
        self.micro = self.teacher._micro_conds(None, len(self.prompts), self.size, self.size)

    def settings(self, student_guidance: list[float]) -> list[dict[str, Any]]:
        out = [{"setting": "teacher official", "model": "teacher", "order": "confidence", "cfg": self.cfg},
               {"setting": "teacher halton", "model": "teacher", "order": "halton", "cfg": self.cfg},
               {"setting": "teacher cfg1", "model": "teacher", "order": "confidence", "cfg": 1.0}]
        for g in student_guidance:
            for order in ("confidence", "halton"):
                name = student_name(order, g, self.cfg)
                out.append({"setting": name, "model": "student", "order": order, "cfg": g})
        return out

    def cell(self, setting: dict[str, Any], steps: int, seed: int) -> dict[str, Any]:
        import torch

        from meissonic_cli.model.vq import tensor_to_images
        from meissonic_cli.sample.pipeline import sample_tokens
        from meissonic_cli.sample.samplers import SamplerOptions
        from meissonic_cli.shapes import bench

        pipe = self.student if setting["model"] == "student" else self.teacher
        guided = setting["cfg"] > 1.0 and setting["model"] == "teacher"
        t0 = time.perf_counter()
        codes = sample_tokens(
            pipe.transformer, pipe.scheduler, self.text, self.pooled, self.micro, self.grid, steps=steps,
            guidance_scale=setting["cfg"], negative_text=self.neg_text, negative_pooled=self.neg_pooled,
            temperature=self.temperature, generator=torch.Generator().manual_seed(seed * 1_000_003),
            num_codes=pipe._num_codes(), token_temperature=self.token_temperature,
            sampler=SamplerOptions(order=setting["order"]))
        seconds = time.perf_counter() - t0
        with torch.inference_mode():
            images = tensor_to_images(pipe.vq.decode(codes))
        scores = [bench.score_image(im, p) for im, p in zip(images, self.prompts)]
        summary = bench.summarize(scores)
        n = len(self.prompts)
        # Per image (in caption order): 1 when every attribute the caption tests is right; for the standard errors.
        per_image = [int(bool(r["overall"])) for r in scores]
        return {"setting": setting["setting"], "steps": steps, "seed": seed, "images": n, "per_image": per_image,
                "evaluations": steps * (2 if guided else 1), "cfg": setting["cfg"], "order": setting["order"],
                "seconds_per_image": seconds / n, "seconds_per_step": seconds / steps,
                **{a: summary[a] for a in ATTRIBUTES}}


def paired_step_cost(demo: Path, teacher: Path, repeats: int) -> dict[str, Any]:
    """Seconds per optimizer step of `train` (the demo's recipe) and of `distill` (the demo recipe), measured
    alternately on the same machine state (best of `repeats` rounds of 3 steps each); their ratio."""
    import tempfile

    from meissonic_cli.train.config import load_train_config
    from meissonic_cli.train.distill import DistillTrainer, load_distill_config
    from meissonic_cli.train.trainer import Trainer

    best = {"train": float("inf"), "distill": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        train_cfg = load_train_config(REPO / "pipelines" / "demo_train.yaml", {
            "data": str(demo / "tokens"), "output": f"{tmp}/t", "model": "", "init": str(teacher), "base_model": ""})
        trainers = {"train": Trainer(train_cfg.validate()), "distill": DistillTrainer(load_distill_config(RECIPE, {
            "data": str(demo / "tokens"), "output": f"{tmp}/d", "teacher": str(teacher)}).validate())}
        for r in range(repeats):
            for name in (("train", "distill") if r % 2 == 0 else ("distill", "train")):
                trainer = trainers[name]
                trainer.train_step()  # warm
                t0 = time.perf_counter()
                for _ in range(3):
                    trainer.train_step()
                best[name] = min(best[name], (time.perf_counter() - t0) / 3)
        for trainer in trainers.values():
            trainer.stream.close()
    return {"train_s_per_step": best["train"], "distill_s_per_step": best["distill"],
            "ratio": best["distill"] / best["train"], "batch_size": 32}


def paper_cost_1b(ratio: float, mfu: float = 0.4, peak_tflops: float = 989.0) -> dict[str, Any]:
    """FLOPs of the 1B model (1024 px: 64x64 tokens, 2x2 compression) counted on the meta device, and what a
    distillation sample costs on paper: teacher 2 forwards + student forward and backward (3 forwards)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from meissonic_cli.model.transformer import build_on_meta, meissonic_1b

    cfg = meissonic_1b()
    model = build_on_meta(cfg)
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 64, 64, dtype=torch.long), torch.zeros(1, 77, cfg.joint_attention_dim),
              torch.zeros(1, cfg.pooled_projection_dim), torch.zeros(1), micro_conds=torch.zeros(1, 5))
    forward = float(counter.get_total_flops())
    per_sample = 5 * forward
    rate = mfu * peak_tflops * 1e12
    return {"forward_tflop": forward / 1e12, "distill_tflop_per_sample": per_sample / 1e12,
            "train_tflop_per_sample": 3 * forward / 1e12, "flop_ratio": 5 / 3, "measured_cpu_ratio": ratio,
            "assumed": f"H100 bf16 dense peak {peak_tflops:g} TFLOP/s at {mfu:.0%} MFU",
            "samples_per_gpu_hour": rate * 3600 / per_sample}


REFERENCE = ("teacher official", 16)


def with_errors(rows: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` plus standard errors of overall accuracy, counted over captions (each caption's mean over the
    seeds is one observation, so the seeds' and the captions' variation are both in it): `overall_se`, and
    against the teacher's official 16 steps on the same captions and seeds, the paired difference
    `diff_vs_reference` and its `diff_se`."""
    import statistics

    def per_caption(name: str, steps: int) -> dict[int, list[int]]:
        return {c["seed"]: c["per_image"] for c in cells if c["setting"] == name and c["steps"] == steps and c.get("per_image")}

    def se(values: list[float]) -> Optional[float]:
        return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None

    ref = per_caption(*REFERENCE)
    for row in rows:
        mine = per_caption(row["setting"], row["steps"])
        row["overall_se"] = row["diff_vs_reference"] = row["diff_se"] = None
        if not mine:
            continue
        seeds = sorted(mine)
        row["overall_se"] = se([statistics.fmean(mine[s][i] for s in seeds) for i in range(len(mine[seeds[0]]))])
        common = sorted(set(mine) & set(ref))
        if common and (row["setting"], row["steps"]) != REFERENCE:
            diffs = [statistics.fmean(mine[s][i] - ref[s][i] for s in common) for i in range(len(mine[common[0]]))]
            row["diff_vs_reference"], row["diff_se"] = statistics.fmean(diffs), se(diffs)
    return rows


def student_name(order: str, g: float, cfg: float) -> str:
    return f"student {'official' if order == 'confidence' else order}" + ("" if g == cfg else f" g{g:g}")


def targets(rows: list[dict[str, Any]], g: float, cfg: float) -> list[str]:
    """The issue's two quality targets, judged at cells fixed in advance: the student at guidance `g` (the first
    --student-guidance), official order, at 8 steps (8 evaluations) and at 16 steps (16 evaluations), each
    against the teacher's official 16 guided steps (32 evaluations) on the same captions and seeds."""
    ref = next((r for r in rows if (r["setting"], r["steps"]) == REFERENCE), None)
    if ref is None:
        return ["the teacher at 16 guided steps was not run"]
    out = []
    name = student_name("confidence", g, cfg)
    for steps, (yes, no), goal in ((8, ("reached", "NOT reached"), "reaches"), (16, ("not worse", "WORSE"), "is not worse than")):
        row = next((r for r in rows if r["setting"] == name and r["steps"] == steps), None)
        if row is None:
            out.append(f"{name} at {steps} steps was not run")
            continue
        diff = row["overall"] - ref["overall"]
        paired = (f"; paired difference {row['diff_vs_reference']:+.3f} ± {row['diff_se']:.3f} (standard error over "
                  "captions)" if row.get("diff_se") is not None else "")
        out.append(f"{name} at {steps} steps ({row['evaluations']} evaluations) {goal} the teacher's official 16 steps "
                   f"(32 evaluations)? {row['overall']:.3f} vs {ref['overall']:.3f}: {yes if diff >= 0 else no} "
                   f"({diff:+.3f}{paired})")
    return out


def markdown(rows: list[dict[str, Any]], order: list[str], extra: dict[str, Any]) -> str:
    lines = ["# Guidance distillation study: teacher (CFG, 2 evaluations/step) vs student (1 evaluation/step)", "",
             extra["scale"], "", extra["distill"], "",
             "| setting | guidance | steps | evaluations | color | shape | position | count | overall ± s.e. | "
             "vs teacher 16 steps (paired) | seeds' spread | s/image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        for r in sorted((r for r in rows if r["setting"] == name), key=lambda r: r["steps"]):
            se = f" ± {r['overall_se']:.3f}" if r.get("overall_se") is not None else ""
            diff = (f"{r['diff_vs_reference']:+.3f} ± {r['diff_se']:.3f}" if r.get("diff_se") is not None else
                    ("reference" if (name, r["steps"]) == REFERENCE else "-"))
            spread = f"± {r['overall_spread']:.3f}" if r["overall_spread"] is not None else "-"
            lines.append(f"| {name} | {extra['cfg'][name]:g} | {r['steps']} | {r['evaluations']} | {fmt(r['color'])} | "
                         f"{fmt(r['shape'])} | {fmt(r['position'])} | {fmt(r['count'])} | {fmt(r['overall'])}{se} | "
                         f"{diff} | {spread} | {fmt(r['seconds_per_image'], 4)} |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in extra["targets"]]
    if extra.get("cost"):
        lines += ["", "## Cost", "", extra["cost"]]
    lines += ["", "![accuracy vs evaluations](distill_study.png)", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="a `meissonic demo` output folder (report.json, tokens/, the checkpoint)")
    ap.add_argument("--out", required=True, help="folder for distill/, cells.jsonl, study.md, study.json, study.png")
    ap.add_argument("--steps", default="4,8,16")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--prompts", type=int, default=600, help="held-out captions of the test split")
    ap.add_argument("--prompt-seed", type=int, default=2026, help="seed of the scene sampler that draws the test split")
    ap.add_argument("--split", choices=("test", "dev"), default="test", help="test: the captions the table reports; dev: "
                    "other held-out captions, for choosing the student's settings without looking at the test split")
    ap.add_argument("--dev-prompts", type=int, default=200, help="captions of the dev split")
    ap.add_argument("--dev-seed", type=int, default=7, help="seed of the scene sampler that draws the dev split")
    ap.add_argument("--settings", default="", help="comma-separated setting names to run (default: all); e.g. "
                    "'teacher official,student official'")
    ap.add_argument("--teacher", default="", help="the teacher checkpoint (default: the demo's, from report.json or run/)")
    ap.add_argument("--budget", default="", help="the demo budget whose sampler settings apply (default: report.json's, else full)")
    ap.add_argument("--student", default="", help="a finished student (checkpoint folder); skips the distillation")
    ap.add_argument("--distill-max-steps", type=int, default=0, help="override the recipe's max_steps (0 = the recipe's)")
    ap.add_argument("--student-guidance", default="", help="comma-separated scales for the student (default: the demo's); "
                    "the first is the one the targets are judged at")
    ap.add_argument("--report-only", action="store_true", help="run no new cell: the report over the cells already in OUT")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's choice)")
    ap.add_argument("--paper-cost", type=int, default=0, help="rounds of the paired train/distill step timing, and the "
                    "1B cost on paper from it (0 = skip)")
    args = ap.parse_args(argv)
    steps_list, seeds = parse_ints(args.steps), parse_ints(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    guidance = [float(x) for x in args.student_guidance.split(",") if x.strip()] or [study.cfg]
    settings = study.settings(guidance)
    if args.settings:
        wanted = {x.strip() for x in args.settings.split(",")}
        settings = [s for s in settings if s["setting"] in wanted]
    # A cell is reused when it was run on the same captions with the same model (teacher cells do not depend
    # on the student, so one teacher run serves every student compared in OUT).
    split_key = {"teacher": str(study.teacher_path), "images": len(study.prompts), "split": args.split,
                 "prompt_seed": args.prompt_seed if args.split == "test" else args.dev_seed}

    def key_of(setting_name: str) -> dict[str, Any]:
        return {**split_key, "student": str(study.student_path) if setting_name.startswith("student") else ""}

    by_name = {s["setting"]: s for s in settings}
    plan = [(s["setting"], steps, seed) for steps in steps_list for s in settings for seed in seeds
            if not (s["setting"] == "teacher cfg1" and steps < 8)]
    cells = run_cells(out / "cells.jsonl", lambda c: all(c.get(k) == v for k, v in key_of(c["setting"]).items()), plan,
                      lambda name, steps, seed: {**study.cell(by_name[name], steps, seed), **key_of(name)},
                      run_new=not args.report_only)
    names = [s["setting"] for s in settings]
    cells = [c for c in cells if c["setting"] in names and c["steps"] in steps_list and c["seed"] in seeds]
    rows = with_errors(mean_rows(cells), cells)
    import torch

    t = study.timing
    distill_line = (f"Distillation: {t['steps']} steps of batch {t['batch_size']} in {t['seconds']:.0f} s "
                    f"({t['seconds_per_step']:.3f} s/step) on this machine" + (
                        f" (1-minute load average {t['load_average_before'][0]:.1f} before, {t['load_average_after'][0]:.1f} "
                        "after)" if t.get("load_average_before") else "") + f"; `{t['command']}`." if t else
                    f"Student: {study.student_path} (distilled earlier; no timing in this run).")
    drawn = (f"random.Random({args.prompt_seed})" if args.split == "test" else
             f"random.Random({args.dev_seed}), the dev split: none of the test split's {args.prompts}")
    scale = (f"Teacher: {study.teacher_path} (the demo's). Student: {study.student_path}. {len(study.prompts)} held-out "
             f"captions (shapes-world scenes from {drawn}, none of the benchmark's 78) x "
             f"{len(seeds)} sampler seeds ({', '.join(map(str, seeds))}) per cell, {study.size} px; temperature "
             f"{study.temperature}, token temperature {study.token_temperature}. CPU, {torch.get_num_threads()} torch "
             "threads; s/image is the sampling loop only (all prompts in one batch).")
    extra = {"scale": scale, "distill": distill_line, "targets": targets(rows, guidance[0], study.cfg),
             "cfg": {s["setting"]: s["cfg"] for s in settings}}
    if args.paper_cost:
        cost_path = out / "step_cost.json"
        if not cost_path.is_file():
            cost_path.write_text(json.dumps(paired_step_cost(Path(args.demo), study.teacher_path, args.paper_cost), indent=1))
        step_cost = json.loads(cost_path.read_text())
        paper = paper_cost_1b(step_cost["ratio"])
        extra["cost"] = (
            f"Per-step cost (paired, best of {args.paper_cost} rounds, batch 32, this machine): train "
            f"{step_cost['train_s_per_step']:.3f} s/step, distill {step_cost['distill_s_per_step']:.3f} s/step, ratio "
            f"{step_cost['ratio']:.2f} (on paper 5/3 = 1.67: the teacher's two forwards plus the student's forward and "
            f"backward, against forward and backward). On paper at 1B scale (1024 px, 64x64 tokens): one forward "
            f"{paper['forward_tflop']:.2f} TFLOP (counted on the meta device), a distillation sample "
            f"{paper['distill_tflop_per_sample']:.1f} TFLOP; at {paper['assumed']} that is "
            f"{paper['samples_per_gpu_hour']:,.0f} distillation samples per GPU-hour (the demo's {t.get('steps', 0)} "
            f"steps x {t.get('batch_size', 32)} = {t.get('steps', 0) * t.get('batch_size', 32):,} samples would take "
            f"{t.get('steps', 0) * t.get('batch_size', 32) / paper['samples_per_gpu_hour']:.2f} GPU-hours).")
        extra["paper_cost"] = {**paper, **step_cost}
    (out / "study.md").write_text(markdown(rows, names, extra))
    result = {"rows": rows, "cells": cells, **extra, "timing": t, "prompts": study.prompts}
    (out / "study.json").write_text(json.dumps(result, indent=1))
    plot(rows, names, out / "study.png", f"distillation: {len(study.prompts)} held-out prompts x {len(seeds)} seeds")
    print(f"wrote {out / 'study.md'}, {out / 'study.json'}, {out / 'study.png'}")
    for line in extra["targets"]:
        print(line)
    return result


if __name__ == "__main__":
    main()
