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
