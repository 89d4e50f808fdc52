"""Samplers beyond the official one (`meissonic_cli.sample.samplers`) and the feature cache (`sample.cache`)."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from meissonic_cli.errors import ConfigError, InputError
from meissonic_cli.model.scheduler import MaskGITScheduler
from meissonic_cli.model.transformer import MeissonicTransformer, meissonic_tiny
from meissonic_cli.sample import samplers
from meissonic_cli.sample.cache import FeatureCache
from meissonic_cli.sample.pipeline import MeissonicPipeline, guidance_batch, masked_logits, sample_tokens
from meissonic_cli.sample.samplers import SamplerOptions, differential_probs, halton_order, mask_counts

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = (8, 8)


def _model(downsample: bool = True) -> MeissonicTransformer:
    torch.manual_seed(0)
    return MeissonicTransformer(meissonic_tiny(downsample=downsample, upsample=downsample)).eval()


def _features(model: MeissonicTransformer, b: int = 2):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    text = torch.randn(2 * b, 77, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2 * b, cfg.pooled_projection_dim, generator=g)
    micro = torch.tensor([[128.0, 128.0, 0.0, 0.0, 6.0]] * b)
    return text[b:], pooled[b:], micro, text[:b], pooled[:b]


def _sample(model, sampler=None, steps=8, per_row=False, cfg=9.0, exact=False, init_tokens=None, trace=None, seed=3):
    text, pooled, micro, neg_text, neg_pooled = _features(model)
    gen = ([torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)] if per_row
           else torch.Generator().manual_seed(seed))
    return sample_tokens(model, MaskGITScheduler(mask_token_id=model.config.mask_token_id), text, pooled, micro, GRID,
                         steps=steps, guidance_scale=cfg, negative_text=neg_text, negative_pooled=neg_pooled,
                         generator=gen, exact=exact, init_tokens=init_tokens, sampler=sampler, trace=trace)


# ----------------------------------------------------------------------------------------------
# The default stays the official sampler


@pytest.mark.parametrize("exact", [False, True])
def test_default_options_are_the_official_sampler_bit_for_bit(exact: bool) -> None:
    model = _model()
    assert torch.equal(_sample(model, None, exact=exact), _sample(model, SamplerOptions(), exact=exact))
    assert torch.equal(_sample(model, None, exact=exact, per_row=True),
                       _sample(model, SamplerOptions(schedule="cosine"), exact=exact, per_row=True))


@pytest.mark.parametrize("per_row,cfg", [(False, 9.0), (True, 9.0), (False, 1.0)])
def test_generalised_loop_reproduces_the_official_fast_loop(monkeypatch, per_row: bool, cfg: float) -> None:
    """With the official settings forced through `run_sampler_loop`, the tokens equal the official loop's:
    the new loop shares its mask counts, draws and random stream."""
    model = _model()
    official = _sample(model, None, steps=12, per_row=per_row, cfg=cfg)
    monkeypatch.setattr(SamplerOptions, "is_official", lambda self, scheduler: False)
    assert torch.equal(_sample(model, SamplerOptions(), steps=12, per_row=per_row, cfg=cfg), official)


def test_exact_refuses_other_samplers() -> None:
    with pytest.raises(InputError, match="exact"):
        _sample(_model(), SamplerOptions(order="halton"), exact=True)


@pytest.mark.parametrize("bad", [dict(order="zigzag"), dict(schedule="cubic"), dict(noise_reg=-1.0),
                                 dict(differential=1.5), dict(cache_refresh=-2)])
def test_bad_options_name_their_flag(bad: dict) -> None:
    with pytest.raises(InputError, match="--" + next(iter(bad)).replace("_", "-")):
        SamplerOptions(**bad).validate()


# ----------------------------------------------------------------------------------------------
# Schedules and orders


@pytest.mark.parametrize("schedule", samplers.SCHEDULES)
def test_schedules_reveal_at_least_one_token_per_step_and_all_at_the_end(schedule: str) -> None:
    for steps in (1, 4, 12, 48):
        table = mask_counts(schedule, steps, 64)
        assert len(table) == steps and table[-1] == 0
        # Each step reveals at least one token, except that one stays masked until the last step (the official rule).
        assert all(a > b or a == b == 1 for a, b in zip([64] + table, table))
    if schedule in ("cosine", "linear"):
        assert mask_counts(schedule, 48, 64) == MaskGITScheduler(masking_schedule=schedule).masked_after_step(48, 64)


def test_schedule_shapes_differ_as_named() -> None:
    """sqrt reveals most tokens early, square most late, linear in between."""
    early = {s: mask_counts(s, 8, 256)[1] for s in ("sqrt", "linear", "square")}
    assert early["sqrt"] < early["linear"] < early["square"]


def test_halton_order_visits_every_cell_once_spread_out() -> None:
    for h, w in [(8, 8), (16, 16), (3, 5), (64, 64)]:
        order = halton_order(h, w)
        assert sorted(order) == list(range(h * w))

    def min_distance(order, n):
        cells = [divmod(p, 16) for p in order[:n]]
        return min(math.dist(a, b) for a, b in itertools.combinations(cells, 2))

    shuffled = []
    for seed in range(50):
        cells = list(range(256))
        random.Random(seed).shuffle(cells)
        shuffled.append(min_distance(cells, 16))
    # The first 16 of 256 cells lie far apart: twice as far as in a random order, on average.
    assert min_distance(halton_order(16, 16), 16) >= 2 * sum(shuffled) / len(shuffled)


def _record_steps(monkeypatch) -> list:
    seen = []
    original = samplers._step

    def recording(options, scheduler, group, logits, positions, latents, *args):
        out = original(options, scheduler, group, logits, positions, latents, *args)
        seen.append((positions.clone(), out[0].clone(), group.offsets))
        return out

    monkeypatch.setattr(samplers, "_step", recording)
    return seen


@pytest.mark.parametrize("order", ["halton", "random", "confidence"])
@pytest.mark.parametrize("schedule", ["linear", "sqrt"])
def test_every_order_keeps_the_schedules_mask_counts(monkeypatch, order: str, schedule: str) -> None:
    model = _model()
    seen = _record_steps(monkeypatch)
    codes = _sample(model, SamplerOptions(order=order, schedule=schedule), steps=6)
    table = mask_counts(schedule, 6, 64)
    counts = [(latents.reshape(2, -1) == model.config.mask_token_id).sum(1).tolist() for _, latents, _ in seen]
    assert counts == [[c, c] for c in table]
    assert ((codes >= 0) & (codes < model.config.codebook_size)).all()


def test_halton_reveals_positions_in_its_order_from_a_random_start(monkeypatch) -> None:
    model = _model()
    seen = _record_steps(monkeypatch)
    _sample(model, SamplerOptions(order="halton"), steps=4)
    order = torch.tensor(halton_order(*GRID))
    revealed_before = torch.zeros(2, 64, dtype=torch.bool)
    offsets = seen[0][2]
    for positions, latents, _ in seen:
        known = latents.reshape(2, -1) != model.config.mask_token_id
        for row in range(2):
            rolled = torch.roll(order, -int(offsets[row]))
            n = int(known[row].sum())
            assert set(rolled[:n].tolist()) == set(known[row].nonzero()[:, 0].tolist())
        assert (known | ~revealed_before).all()  # revealed tokens stay revealed
        revealed_before = known


def test_samplers_are_reproducible_and_seed_dependent() -> None:
    model = _model()
    for options in (SamplerOptions(order="halton"), SamplerOptions(order="random"), SamplerOptions(noise_reg=2.0),
                    SamplerOptions(differential=0.75)):
        a, b = _sample(model, options, seed=5), _sample(model, options, seed=5)
        assert torch.equal(a, b)
        assert not torch.equal(a, _sample(model, options, seed=6))


def test_init_tokens_come_back_unchanged_with_other_samplers() -> None:
    model = _model()
    init = _sample(model, None, steps=4).clone()
    init[:, 2:6, 1:5] = model.config.mask_token_id
    keep = init != model.config.mask_token_id
    for options in (SamplerOptions(order="halton"), SamplerOptions(differential=0.5, cache_refresh=2)):
        out = _sample(model, options, steps=5, init_tokens=init)
        assert torch.equal(out[keep], init[keep]) and (out != model.config.mask_token_id).all()


# ----------------------------------------------------------------------------------------------
# The inference tricks


def test_noise_regularization_scale_follows_the_cosine() -> None:
    assert samplers.noise_reg_factor(0, 9) == pytest.approx(1.0)
    assert samplers.noise_reg_factor(4, 9) == pytest.approx(0.0, abs=1e-12)
    assert samplers.noise_reg_factor(8, 9) == pytest.approx(1.0)
    assert samplers.noise_reg_factor(0, 1) == 1.0
    model = _model()
    assert not torch.equal(_sample(model, SamplerOptions(noise_reg=50.0), steps=4), _sample(model, None, steps=4))


def test_differential_probs_replace_the_calmest_positions_with_the_change() -> None:
    g = torch.Generator().manual_seed(0)
    previous = torch.randn(2, 10, 16, generator=g).softmax(-1)
    probs = previous.clone()
    probs[:, :6] = torch.randn(2, 6, 16, generator=g).softmax(-1)  # positions 6..9 did not move at all
    out = differential_probs(probs, previous, 0.4)
    assert torch.allclose(out.sum(-1), torch.ones(2, 10))
    # The four unmoved positions are replaced by the (floored, normalised) change: uniform here.
    assert torch.allclose(out[:, 6:], torch.full((2, 4, 16), 1 / 16))
    assert torch.equal(out[:, :6], probs[:, :6])
    assert torch.equal(differential_probs(probs, previous, 0.0), probs)
    moved = probs - previous
    full = differential_probs(probs, previous, 1.0)
    top = moved[:, :6].argmax(-1)
    assert torch.equal(full[:, :6].argmax(-1), top)  # draws follow where the belief moves


# ----------------------------------------------------------------------------------------------
# The feature cache


def _cache_setup(downsample: bool):
    model = _model(downsample)
    text, pooled, micro, neg_text, neg_pooled = _features(model)
    cond = model.prepare_conditioning(*guidance_batch(text, pooled, micro, neg_text, neg_pooled, 9.0), GRID)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.codebook_size, (2, *GRID), generator=g)
    mask = torch.rand(2, *GRID, generator=g) < 0.5
    tokens[mask] = model.config.mask_token_id
    # Every row must list the same number of positions: take the first n masked of each row.
    n = int(mask.reshape(2, -1).sum(1).min())
    positions = torch.stack([row.nonzero()[:n, 0] for row in mask.reshape(2, -1)])
    return model, cond, tokens, positions


def _guided(model, hidden):
    uncond, guided = hidden.chunk(2)
    return model.mlm_layer.logits_tokens(uncond + 9.0 * (guided - uncond))


@pytest.mark.parametrize("downsample", [True, False])
def test_cache_full_and_same_state_cached_steps_equal_the_uncached_forward(downsample: bool) -> None:
    model, cond, tokens, positions = _cache_setup(downsample)
    t = torch.tensor([5])
    with torch.inference_mode():
        reference = masked_logits(model, tokens, t, cond, positions, 9.0)
        cache = FeatureCache(model, cond, refresh=4, mask_id=model.config.mask_token_id)
        full = _guided(model, cache.hidden(tokens, t, positions, 0))
        assert cache.last_was_full
        # Nothing changed since the full forward: the cached keys/values are exact, so is the cached step.
        cached = _guided(model, cache.hidden(tokens, t, positions, 1))
        assert not cache.last_was_full
    assert torch.allclose(full, reference, atol=1e-5, rtol=1e-5)
    assert torch.allclose(cached, reference, atol=1e-5, rtol=1e-5)


def test_cache_refreshes_every_n_steps_and_reports_its_logit_differences() -> None:
    model = _model()
    trace: dict = {}
    codes = _sample(model, SamplerOptions(cache_refresh=3), steps=8, trace=trace)
    assert trace["full_forwards"] == [3] and trace["cached_forwards"] == [5]  # full at steps 0, 3, 6
    assert len(trace["max_abs"]) == 5 and all(m >= a >= 0 for m, a in zip(trace["max_abs"], trace["mean_abs"]))
    assert (codes != model.config.mask_token_id).all()


# ----------------------------------------------------------------------------------------------
# Through the pipeline and the sample command


def test_pipeline_and_sample_record_the_sampler(tiny_model_dir: Path, tmp_path: Path) -> None:
    from meissonic_cli.sample.sample import SampleConfig, run_sample

    pipe = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    codes = pipe(["a red circle"], steps=4, seed=0, output_type="codes", height=64, width=64,
                 sampler=SamplerOptions(order="halton", cache_refresh=2))
    assert codes.shape[0] == 1
    cfg = SampleConfig(model=str(tiny_model_dir), prompt=["a red circle"], out=str(tmp_path / "out"), steps=3,
                       resolution="64", device="cpu", order="random", differential=0.5)
    run_sample(cfg, progress=False, pipeline=pipe)
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert sidecar["sampler"] == "random+diff0.5"
    with pytest.raises(ConfigError, match="--order"):
        SampleConfig(model="m", prompt=["p"], order="spiral").validate()
    with pytest.raises(ConfigError, match="--exact"):
        SampleConfig(model="m", prompt=["p"], order="halton", exact=True).validate()


# ----------------------------------------------------------------------------------------------
# The study and the GPU check's CPU smoke run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sampler_study_writes_table_plot_and_resumes(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("sampler_study", REPO / "benchmarks" / "sampler_study.py")
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sampler_study", study)  # dataclasses look their module up
    spec.loader.exec_module(study)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.json").write_text(json.dumps({"checkpoint": str(tiny_model_dir), "budget": "small"}))
    args = ["--demo", str(demo), "--out", str(tmp_path / "study"), "--steps", "2,4", "--seeds", "0,1",
            "--settings", "official,halton cfg1,cache 2", "--max-prompts", "3", "--speed-repeats", "1",
            "--exactness-steps", "4", "--threads", "1"]
    result = study.main(args)
    rows = {(r["setting"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {(s, n) for s in ("official", "halton cfg1", "cache 2") for n in (2, 4)}
    assert rows[("official", 4)]["evaluations"] == 8 and rows[("halton cfg1", 4)]["evaluations"] == 4
    assert all(r["seeds"] == 2 and r["images"] == 6 and 0 <= r["overall"] <= 1 for r in rows.values())
    assert result["exactness"][0]["cached_steps"] == 2 and result["speed"][1]["setting"] == "cache 2"
    for name in ("study.md", "study.json", "study.png", "cells.jsonl"):
        assert (tmp_path / "study" / name).stat().st_size > 0
    assert "| halton cfg1 | `--order halton --guidance-scale 1` | 4 | 4 |" in (tmp_path / "study" / "study.md").read_text()
    cells = (tmp_path / "study" / "cells.jsonl").read_text()
    study.main(args[:-6] + ["--speed-repeats", "0", "--exactness-steps", "0"])  # every cell is done: nothing resampled
    assert (tmp_path / "study" / "cells.jsonl").read_text() == cells


@pytest.mark.slow
def test_gpu_check_smoke_prints_one_json_line_with_every_figure() -> None:
    import subprocess

    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    sampler = out["sampler"]["sampler"]
    for name in ("official", "fast"):
        for mode in ("eager", "compile"):
            assert sampler[name][mode]["s_per_step"] > 0 and sampler[name][mode]["total_4_steps_s"] > 0
    assert out["sampler"]["fast_setting"] == "confidence+cache3"
    assert out["train"]["s_per_step"] > 0 and out["train"]["mfu_vs_measured_matmul"] > 0
    memory = {r["setting"]: r for r in out["memory"]["rows"]}
    assert memory["int8"]["peak_rss_over_baseline_gib"] > 0 and memory["int8+offload"]["status"] == "n/a"
    fid = out["fid"]
    assert fid["gflop_per_image"] > 0 and fid["matmul_peak_gflops"] > 0
    assert {"before (per image)", "after --batch-size 4"} <= set(fid["variants"])
    assert all(v["img_per_s"] > 0 and v["max_rel_diff"] < 1e-5 for v in fid["variants"].values())
