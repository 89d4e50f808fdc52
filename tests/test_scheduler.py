"""The MaskGIT scheduler against the official reference chains and schedule tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meissonic_cli.errors import ConfigError, InputError, ModelFormatError
from meissonic_cli.model.scheduler import MaskGITScheduler, SchedulerConfig


@pytest.fixture(scope="module")
def reference(conformance_dir: Path):
    meta = json.loads((conformance_dir / "cases.json").read_text())["scheduler"]
    return meta, load_file(str(conformance_dir / "scheduler.safetensors"))


def _scheduler(meta: dict) -> MaskGITScheduler:
    return MaskGITScheduler(mask_token_id=meta["mask_token_id"], masking_schedule=meta["masking_schedule"])


def test_set_timesteps_exact(reference) -> None:
    meta, tensors = reference
    sched = _scheduler(meta)
    checked = 0
    for name in tensors:
        if not name.startswith("set_timesteps."):
            continue
        variant, what = name.split(".")[1:]
        n = int(variant[1:].split("_")[0])
        temperature = float(variant.split("scalar")[1]) if "scalar" in variant else (2, 0)
        sched.set_timesteps(n, temperature=temperature)
        ours = sched.timesteps if what == "timesteps" else sched.temperatures
        assert ours.dtype == tensors[name].dtype and torch.equal(ours, tensors[name]), name
        checked += 1
    assert checked == 11


def _chain_steps(meta: dict, tensors: dict, chain: str):
    info = meta["chains"][chain]
    for step in info["steps"]:
        prefix = f"{chain}.step{step['i']}."
        yield step, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("chain", ["chain_full_2x8x8_n6", "chain_partial_2x8x8_n4", "chain_flat_1x64_n4"])
def test_chains_reproduced_from_recorded_draws(reference, chain: str) -> None:
    meta, tensors = reference
    sched = _scheduler(meta)
    sched.set_timesteps(meta["chains"][chain]["n"])
    sample = None
    for step, t in _chain_steps(meta, tensors, chain):
        if sample is None:
            sample = t["sample_in"]
        assert torch.equal(sample, t["sample_in"])
        assert sched.timesteps[step["i"]].item() == step["timestep"]
        out = sched.step_with_draws(t["model_output"], step["timestep"], sample,
                                    t["rng.multinomial_ids"], t.get("rng.uniform"))
        assert torch.equal(out.pred_original_sample, t["pred_original_sample"])
        assert torch.equal(out.prev_sample, t["prev_sample"])
        masked = (out.prev_sample == meta["mask_token_id"]).reshape(out.prev_sample.shape[0], -1).sum(1)
        assert masked.tolist() == step["num_masked_out"]
        sample = out.prev_sample


@pytest.mark.parametrize("chain", ["chain_full_2x8x8_n6", "chain_partial_2x8x8_n4", "chain_flat_1x64_n4"])
def test_chains_reproduced_with_seeded_generator(reference, chain: str) -> None:
    meta, tensors = reference
    info = meta["chains"][chain]
    sched = _scheduler(meta)
    sched.set_timesteps(info["n"])
    generator = torch.Generator().manual_seed(info["generator_seed"])
    sample = None
    for step, t in _chain_steps(meta, tensors, chain):
        sample = t["sample_in"] if sample is None else sample
        out = sched.step(t["model_output"], torch.tensor([step["timestep"]]), sample, generator=generator)
        assert torch.equal(out.prev_sample, t["prev_sample"]), f"{chain} step {step['i']}"
        sample = out.prev_sample


def test_rng_free_tables(conformance_dir: Path) -> None:
    tables = json.loads((conformance_dir / "cases.json").read_text())["scheduler"]["tables"]
    sched = MaskGITScheduler()
    for name, table in tables.items():
        n, length = (int(x[1:]) for x in name.split("_"))
        assert sched.masked_after_step(n, length) == table["masked_after_step_official"], name
        assert table["effective_from_full_mask"] == table["masked_after_step_official"]
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == table["timesteps"]
        raw = [int(sched.raw_mask_len(i, length)) if i < n - 1 else 0 for i in range(n)]
        assert raw == table["mask_len_raw_float32"], name
    # The float32 pitfall: cos(pi/3) rounds below 0.5.
    assert [MaskGITScheduler().masked_after_step(48, length)[31] for length in (64, 1024, 4096)] == [31, 511, 2047]


def test_official_step_follows_the_table_from_all_mask() -> None:
    sched = MaskGITScheduler(mask_token_id=64)
    n, b, length = 12, 2, 48
    sched.set_timesteps(n)
    generator = torch.Generator().manual_seed(0)
    sample = torch.full((b, length), 64)
    logits = torch.randn(b, length, 64, generator=generator)
    counts = []
    for t in sched.timesteps:
        sample = sched.step(logits, t, sample, generator=generator).prev_sample
        counts.append((sample == 64).sum(1).tolist())
    assert counts == [[c, c] for c in sched.masked_after_step(n, length)]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_fast_step_keeps_the_official_counts(schedule: str) -> None:
    sched = MaskGITScheduler(mask_token_id=64, masking_schedule=schedule)
    n, b, (h, w) = 10, 3, (6, 8)
    sched.set_timesteps(n, temperature=3.0)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(b, h * w, 64, generator=generator) * 3
    sample = torch.full((b, h, w), 64)
    positions = torch.arange(h * w).repeat(b, 1)
    table = sched.masked_after_step(n, h * w)
    for i in range(n):
        picked = torch.gather(logits, 1, positions[..., None].expand(-1, -1, 64))
        out = sched.step_masked(picked, positions, sample, i, generator=generator)
        known_before = sample != 64
        assert torch.equal(out.prev_sample[known_before], sample[known_before])  # decided tokens stay
        assert out.masked_positions.shape == (b, table[i])
        still = (out.prev_sample == 64).reshape(b, -1)
        assert still.sum(1).tolist() == [table[i]] * b
        assert torch.equal(torch.gather(still, 1, out.masked_positions), torch.ones_like(out.masked_positions, dtype=torch.bool))
        assert ((out.pred_original_sample >= 0) & (out.pred_original_sample < 64)).all()
        sample, positions = out.prev_sample, out.masked_positions
    assert (sample != 64).all()


def test_fast_step_matches_official_given_the_same_draws(monkeypatch) -> None:
    """With the draws of the masked positions shared, both steps decode and re-mask the same tokens."""
    sched = MaskGITScheduler(mask_token_id=64)
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(3)
    b, length = 2, 40
    sample = torch.randint(0, 64, (b, length), generator=g)
    masked_cols = torch.stack([torch.randperm(length, generator=g)[:30].sort().values for _ in range(b)])
    sample.scatter_(1, masked_cols, 64)
    logits = torch.randn(b, length, 64, generator=g) * 2

    ids_full = torch.randint(0, 64, (b, length), generator=g)
    u_full = torch.rand(b, length, generator=g)
    official = sched.step_with_draws(logits, sched.timesteps[2], sample, ids_full, u_full)

    # Replay the official draws for the masked positions through the fast step's own RNG calls.
    calls = iter([torch.gather(ids_full, 1, masked_cols).reshape(-1, 1), torch.gather(u_full, 1, masked_cols)])
    monkeypatch.setattr(torch, "multinomial", lambda probs, num, generator=None: next(calls))
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, a, b_, generator=None: self.copy_(next(calls)))
    picked = torch.gather(logits, 1, masked_cols[..., None].expand(-1, -1, 64))
    fast = sched.step_masked(picked, masked_cols, sample, 2)
    monkeypatch.undo()
    assert torch.equal(fast.pred_original_sample, official.pred_original_sample)
    assert torch.equal(fast.prev_sample, official.prev_sample)


def test_seeded_runs_are_reproducible() -> None:
    sched = MaskGITScheduler(mask_token_id=64)
    sched.set_timesteps(5)
    logits = torch.randn(1, 64, 4, 4)
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(42)
        outs.append(sched.step(logits, 4, torch.full((1, 4, 4), 64), generator=g).prev_sample)
    assert torch.equal(*outs)


def test_config_files_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "model"
    MaskGITScheduler(mask_token_id=71, masking_schedule="linear").save_config(root / "scheduler")
    data = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert data == {"_class_name": "Scheduler", "mask_token_id": 71, "masking_schedule": "linear"}
    for folder in (root, root / "scheduler"):
        assert MaskGITScheduler.from_config_dir(folder).config == SchedulerConfig(71, "linear")

    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(data, _diffusers_version="0.30", warp=1)))
    with pytest.raises(ModelFormatError, match="unknown scheduler field.*warp"):
        MaskGITScheduler.from_config_dir(root)
    with pytest.raises(ModelFormatError, match="expected .*scheduler_config.json"):
        MaskGITScheduler.from_config_dir(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="masking_schedule"):
        MaskGITScheduler(masking_schedule="sigmoid")

    sched = MaskGITScheduler(mask_token_id=64)
    with pytest.raises(InputError, match="set_timesteps"):
        sched.step(torch.zeros(1, 4, 64), 3, torch.full((1, 4), 64))
    sched.set_timesteps(4)
    with pytest.raises(InputError, match="not one of"):
        sched.step(torch.zeros(1, 4, 64), 9, torch.full((1, 4), 64))
    with pytest.raises(ConfigError):
        sched.set_timesteps(0)


# ---------------------------------------------------------------------------------------------
# The fast step against a recomputation from its own random draws (issue 15: mutation survivors)


def _fast_step_reference(sched: MaskGITScheduler, logits: torch.Tensor, positions: torch.Tensor, sample: torch.Tensor,
                         i: int, seed: int, ratio: float, inverse_cdf: bool):
    """What step_masked documents: draw a token per masked position (multinomial, or inverse CDF), then
    M uniforms, from one generator in that order; re-mask the mask_len least confident."""
    from meissonic_cli.model.scheduler import _gumbel, draw_categorical

    g = torch.Generator().manual_seed(seed)
    b, m, k = logits.shape
    probs = logits.float().softmax(-1)
    if inverse_cdf:
        draws = draw_categorical(probs.reshape(-1, k), g).view(b, m)
    else:
        draws = torch.multinomial(probs.reshape(-1, k), 1, generator=g)[:, 0].view(b, m)
    pred = sample.reshape(b, -1).scatter(1, positions, draws)
    n = sched.num_inference_steps
    if i == n - 1:
        return pred, positions[:, :0]
    raw = int(sched.raw_mask_len(i, pred.shape[1], ratio))
    mask_len = min(m, max(1, min(m - 1, raw)))
    uniform = torch.rand(b, m, generator=g)
    confidence = torch.log(torch.gather(probs, -1, draws[..., None])[..., 0].clamp(1e-20)) + sched.temperatures[i] * _gumbel(uniform)
    still = torch.gather(positions, 1, confidence.topk(mask_len, dim=-1, largest=False).indices).sort(-1).values
    return pred.scatter(1, still, sched.config.mask_token_id), still


@pytest.mark.parametrize("draw", ["multinomial", "inverse_cdf"])
@pytest.mark.parametrize("step_index,ratio", [(1, 1.0), (3, 0.5), (6, 0.25), (7, 1.0)])
def test_fast_step_equals_the_documented_rule_from_its_draws(draw: str, step_index: int, ratio: float) -> None:
    # (3, 0.5): the ratio halves mask_len (8, not 16); (6, 0.25): raw is 1, so exactly one stays masked.
    sched = MaskGITScheduler(mask_token_id=32)
    sched.set_timesteps(8, temperature=(4.0, 1.0))
    g = torch.Generator().manual_seed(step_index)
    b, length, m = 2, 24, 20
    positions = torch.stack([torch.randperm(length, generator=g)[:m].sort().values for _ in range(b)])
    sample = torch.randint(0, 32, (b, length), generator=g).scatter(1, positions, 32)
    logits = torch.randn(b, m, 32, generator=g)
    torch.manual_seed(1234)  # the global RNG must not matter
    out = sched.step_masked(logits, positions, sample, step_index, torch.Generator().manual_seed(7),
                            starting_mask_ratio=ratio, draw=draw)
    torch.manual_seed(99)
    again = sched.step_masked(logits, positions, sample, step_index, torch.Generator().manual_seed(7),
                              starting_mask_ratio=ratio, draw=draw)
    prev, still = _fast_step_reference(sched, logits, positions, sample, step_index, 7, ratio, draw == "inverse_cdf")
    assert torch.equal(out.prev_sample, prev) and torch.equal(out.masked_positions, still)
    assert torch.equal(again.prev_sample, prev)
    assert out.pred_original_sample.dtype == sample.dtype


def test_fast_step_noise_decides_between_equally_confident_tokens() -> None:
    """With flat logits only the Gumbel noise orders the positions, so seeds re-mask different ones."""
    sched = MaskGITScheduler(mask_token_id=16)
    sched.set_timesteps(4, temperature=2.0)
    positions = torch.arange(16)[None]
    sample = torch.full((1, 16), 16)
    picks = {tuple(sched.step_masked(torch.zeros(1, 16, 16), positions, sample, 0,
                                     torch.Generator().manual_seed(s)).masked_positions[0].tolist())
             for s in range(6)}
    assert len(picks) > 1


def test_fast_step_edge_cases() -> None:
    sched = MaskGITScheduler(mask_token_id=8)
    sched.set_timesteps(4)
    sample = torch.tensor([[1, 8, 3, 4]])
    # One masked position before the last step: it is drawn, then re-masked (at least one stays masked).
    out = sched.step_masked(torch.zeros(1, 1, 8), torch.tensor([[1]]), sample, 0, torch.Generator().manual_seed(0))
    assert out.masked_positions.tolist() == [[1]] and torch.equal(out.prev_sample, sample)
    assert out.pred_original_sample[0, 1] != 8
    # Nothing masked: nothing changes and nothing is drawn.
    known = torch.tensor([[1, 2, 3, 4]])
    out = sched.step_masked(torch.zeros(1, 0, 8), torch.zeros(1, 0, dtype=torch.long), known, 1)
    assert torch.equal(out.prev_sample, known) and out.masked_positions.shape == (1, 0)


def test_fast_step_and_replay_errors_name_the_problem() -> None:
    sched = MaskGITScheduler(mask_token_id=8)
    sched.set_timesteps(4)
    logits, positions, sample = torch.zeros(1, 1, 8), torch.tensor([[1]]), torch.tensor([[1, 8, 3, 4]])
    with pytest.raises(InputError, match=r"^draw must be one of multinomial, inverse_cdf, got 'gumbel'$"):
        sched.step_masked(logits, positions, sample, 0, draw="gumbel")
    with pytest.raises(InputError, match=r"^masked_positions must be \(1, 1\) to match the logits, got \(1, 2\)$"):
        sched.step_masked(logits, torch.tensor([[1, 2]]), sample, 0)
    with pytest.raises(InputError, match=r"^step_index 4 outside 0\.\.3$"):
        sched.step_masked(logits, positions, sample, 4)
    with pytest.raises(InputError, match=r"^step_index -1 outside 0\.\.3$"):
        sched.step_masked(logits, positions, sample, -1)
    with pytest.raises(InputError, match=r"^uniform draws are required for every step except the one at timestep 0$"):
        sched.step_with_draws(torch.zeros(1, 4, 8), 3, torch.full((1, 4), 8), torch.zeros(1, 4, dtype=torch.long), None)


def test_config_file_of_the_folder_itself_wins_and_errors_name_the_file(tmp_path: Path) -> None:
    MaskGITScheduler(mask_token_id=5).save_config(tmp_path)
    MaskGITScheduler(mask_token_id=6).save_config(tmp_path / "scheduler")
    assert MaskGITScheduler.from_config_dir(tmp_path).config.mask_token_id == 5
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({"mask_token_id": 6, "zeta": 1, "alpha": 2}))
    with pytest.raises(ModelFormatError) as err:
        MaskGITScheduler.from_config_dir(tmp_path / "scheduler")
    assert str(err.value) == (f"{path}: unknown scheduler field(s) alpha, zeta; expected mask_token_id, "
                              "masking_schedule")
    path.write_text(json.dumps({"mask_token_id": -1}))
    with pytest.raises(ModelFormatError) as err:
        MaskGITScheduler.from_config_dir(tmp_path / "scheduler")
    assert str(err.value).startswith(f"{path}: ") and "mask_token_id must be a non-negative integer" in str(err.value)


def test_inverse_cdf_draw_is_the_first_code_whose_cumulative_mass_exceeds_u() -> None:
    from meissonic_cli.model.scheduler import draw_categorical

    g = torch.Generator().manual_seed(0)
    n, k = 64, 300  # not a multiple of the 128-code block
    probs = torch.rand(n, k, generator=g) ** 4
    probs[:, 128:256] = 0  # a whole block without mass
    probs[:, 5] = 0
    probs = probs / probs.sum(-1, keepdim=True) * 3  # unnormalised rows are fine
    drawn = draw_categorical(probs, torch.Generator().manual_seed(11))
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    assert torch.equal(drawn, expected)
    assert not ((drawn >= 128) & (drawn < 256)).any() and not (drawn == 5).any()
    # Half the mass on each of the last two codes of a block: both are drawn (the clip inside a block).
    pair = torch.zeros(400, 128)
    pair[:, 126:] = 0.5
    assert set(draw_categorical(pair, torch.Generator().manual_seed(3)).tolist()) == {126, 127}
    one_hot = torch.zeros(3, k)
    one_hot[torch.arange(3), torch.tensor([0, 130, 299])] = 1.0
    assert draw_categorical(one_hot, torch.Generator().manual_seed(1)).tolist() == [0, 130, 299]


def test_schedule_tables_follow_the_formula() -> None:
    import math

    # In float32, as the official scheduler computes it (1 - 3/5 rounds below 0.4: 40 * it floors to 15).
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    for schedule, frac in (("cosine", lambda x: torch.cos(x * math.pi / 2)), ("linear", lambda x: 1 - x)):
        sched = MaskGITScheduler(mask_token_id=16, masking_schedule=schedule)
        # (64, 13, 0.5): the start rounds down (6.5 -> 6) and the first raw count is 6, so the start bounds it.
        for n, length, ratio in ((5, 40, 1.0), (5, 40, 0.5), (64, 13, 0.5)):
            remaining, table = round(length * ratio), []
            for i in range(n):
                raw = int((length * (ratio * frac(f32(i + 1) / n))).floor())
                remaining = 0 if i == n - 1 else max(1, min(remaining - 1, raw))
                table.append(remaining)
            assert sched.masked_after_step(n, length, ratio) == table, (schedule, ratio)
    one = MaskGITScheduler(mask_token_id=0)  # id 0 is a valid mask id
    one.set_timesteps(1)  # a single step is allowed: it decodes everything
    assert one.timesteps.tolist() == [0] and one.temperatures.tolist() == [2.0]
    out = one.step(torch.zeros(1, 4, 3), 0, torch.zeros(1, 4, dtype=torch.long), torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == (1, 4)


def test_official_step_draws_tokens_then_uniforms_from_the_generator() -> None:
    """step() equals step_with_draws fed with one multinomial per position, then L uniforms, from the same seed."""
    sched = MaskGITScheduler(mask_token_id=16)
    sched.set_timesteps(8, temperature=3.0)
    g = torch.Generator().manual_seed(2)
    b, length = 2, 24
    sample = torch.randint(0, 16, (b, length), generator=g)
    sample[:, ::2] = 16
    logits = torch.randn(b, length, 16, generator=g)
    for t, ratio in ((5, 0.5), (1, 0.5), (0, 0.5)):
        ref_g = torch.Generator().manual_seed(9)
        ids = torch.multinomial(logits.float().softmax(-1).reshape(-1, 16), 1, generator=ref_g)[:, 0].view(b, length)
        uniform = torch.zeros(b, length).uniform_(0, 1, generator=ref_g) if t else None
        want = sched.step_with_draws(logits, t, sample, ids, uniform, starting_mask_ratio=ratio)
        got = sched.step(logits, t, sample, torch.Generator().manual_seed(9), starting_mask_ratio=ratio)
        assert torch.equal(got.prev_sample, want.prev_sample) and torch.equal(got.pred_original_sample, want.pred_original_sample)
    # Late in a half-masked run raw is 1: exactly one token stays masked (at least one, never two).
    out = sched.step(logits, 1, sample, torch.Generator().manual_seed(0), starting_mask_ratio=0.25)
    assert (out.prev_sample == 16).sum(1).tolist() == [1, 1]


def test_official_step_shape_errors_and_messages() -> None:
    sched = MaskGITScheduler(mask_token_id=8)
    with pytest.raises(InputError, match=r"^call set_timesteps\(num_steps\) before stepping the scheduler$"):
        sched.step(torch.zeros(1, 4, 8), 3, torch.full((1, 4), 8))
    with pytest.raises(ConfigError, match=r"^temperature must be one number or a \(start, end\) pair, got \(1, 2, 3\)$"):
        sched.set_timesteps(4, temperature=(1, 2, 3))
    with pytest.raises(ConfigError, match=r"masking_schedule must be one of cosine, linear, got 'sigmoid'"):
        MaskGITScheduler(masking_schedule="sigmoid")
    sched.set_timesteps(4)
    cases = [((1, 4, 8), (1, 2, 2)), ((1, 5, 8), (1, 4)), ((1, 8, 2, 2), (1, 8))]
    for logits_shape, sample_shape in cases:
        with pytest.raises(InputError) as err:
            sched.step(torch.zeros(logits_shape), 3, torch.full(sample_shape, 8))
        assert str(err.value) == (f"expected logits (B, K, H, W) with tokens (B, H, W), or (B, L, K) with (B, L); got "
                                  f"{logits_shape} and {sample_shape}")
