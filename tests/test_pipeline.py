"""The sampling loop and `MeissonicPipeline`: mask counts, fast vs exact logits, seeds, loading, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fixtures_models import copy_model_dir

from meissonic_cli.errors import InputError, ModelFormatError
from meissonic_cli.model.scheduler import MaskGITScheduler, draw_categorical
from meissonic_cli.model.transformer import MeissonicTransformer, meissonic_tiny
from meissonic_cli.sample.pipeline import (
    MeissonicPipeline,
    exact_logits,
    masked_logits,
    resolve_device,
    resolve_dtype,
    resolve_model_folder,
    sample_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> MeissonicPipeline:
    return MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


def _features(model: MeissonicTransformer, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text = torch.randn(2 * b, 77, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2 * b, cfg.pooled_projection_dim, generator=g)
    return text, pooled


class _CountingScheduler(MaskGITScheduler):
    """Records how many tokens each row still has masked after every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts: list[list[int]] = []

    def _record(self, out):
        self.counts.append((out.prev_sample.reshape(out.prev_sample.shape[0], -1) == self.config.mask_token_id).sum(1).tolist())
        return out

    def step(self, *args, **kwargs):
        return self._record(super().step(*args, **kwargs))

    def step_masked(self, *args, **kwargs):
        return self._record(super().step_masked(*args, **kwargs))


@pytest.mark.parametrize("exact", [False, True])
def test_both_loops_keep_the_official_mask_counts(exact: bool) -> None:
    torch.manual_seed(0)
    model = MeissonicTransformer(meissonic_tiny()).eval()
    b, grid, steps = 2, (8, 8), 48  # n=48, L=64 includes the float32 step (i=31 keeps 31, not 32)
    text, pooled = _features(model, b)
    micro = torch.tensor([[128.0, 128.0, 0.0, 0.0, 6.0]] * b)
    scheduler = _CountingScheduler(mask_token_id=model.config.mask_token_id)
    calls = []
    codes = sample_tokens(model, scheduler, text[b:], pooled[b:], micro, grid, steps=steps, guidance_scale=9.0,
                          negative_text=text[:b], negative_pooled=pooled[:b], exact=exact,
                          generator=torch.Generator().manual_seed(1), callback=lambda i, n: calls.append((i, n)))
    table = scheduler.masked_after_step(steps, 64)
    assert table[31] == 31
    assert scheduler.counts == [[c] * b for c in table]
    assert calls == [(i + 1, steps) for i in range(steps)]
    assert codes.shape == (b, 8, 8) and codes.dtype == torch.long
    assert ((codes >= 0) & (codes < model.config.codebook_size)).all()


@pytest.mark.parametrize("exact", [False, True])
def test_init_tokens_keep_known_tokens_and_follow_the_partial_schedule(exact: bool) -> None:
    torch.manual_seed(0)
    model = MeissonicTransformer(meissonic_tiny()).eval()
    mask_id = model.config.mask_token_id
    b, (h, w), steps, masked = 2, (8, 8), 12, 24
    text, pooled = _features(model, b, seed=2)
    micro = torch.tensor([[128.0, 128.0, 0.0, 0.0, 6.0]] * b)
    g = torch.Generator().manual_seed(3)
    init = torch.randint(0, model.config.codebook_size, (b, h, w), generator=g)
    chosen = torch.stack([torch.randperm(h * w, generator=g)[:masked] for _ in range(b)])  # other places per row
    init.view(b, -1).scatter_(1, chosen, mask_id)
    before = init.clone()
    scheduler = _CountingScheduler(mask_token_id=mask_id)
    calls = []
    codes = sample_tokens(model, scheduler, text[b:], pooled[b:], micro, (h, w), steps=steps, guidance_scale=4.0,
                          negative_text=text[:b], negative_pooled=pooled[:b], exact=exact, init_tokens=init,
                          generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                          callback=lambda i, n: calls.append(i))
    assert torch.equal(init, before)  # the caller's grid is not written to
    keep = before != mask_id
    assert torch.equal(codes[keep], before[keep])
    assert not bool((codes == mask_id).any()) and int(codes.max()) < model.config.codebook_size
    # The schedule scaled to the masked part (starting_mask_ratio = 24/64), from 24 masked, not 64.
    table = scheduler.masked_after_step(steps, h * w, masked / (h * w))
    assert table[0] < masked and table[-1] == 0
    assert table != scheduler.masked_after_step(steps, h * w)[:steps]
    assert scheduler.counts == [[c] for c in table for _ in range(b)]  # one generator per row: rows step apart
    assert calls == list(range(1, steps + 1))
    # Nothing masked: nothing to decode.
    assert torch.equal(sample_tokens(model, scheduler, text[b:], pooled[b:], micro, (h, w), steps=steps,
                                     guidance_scale=1.0, init_tokens=codes), codes)


def test_init_tokens_must_fit_the_batch() -> None:
    model = MeissonicTransformer(meissonic_tiny()).eval()
    mask_id = model.config.mask_token_id
    text, pooled = _features(model, 2)
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]] * 2)
    scheduler = MaskGITScheduler(mask_token_id=mask_id)
    uneven = torch.zeros(2, 4, 4, dtype=torch.long)
    uneven[0, 0, :3] = mask_id
    uneven[1, 0, :2] = mask_id
    with pytest.raises(InputError, match=r"rows have \[3, 2\] masked positions"):
        sample_tokens(model, scheduler, text[2:], pooled[2:], micro, (4, 4), steps=2, guidance_scale=1.0,
                      init_tokens=uneven)
    with pytest.raises(InputError, match=r"shape \(2, 4, 4\)"):
        sample_tokens(model, scheduler, text[2:], pooled[2:], micro, (4, 4), steps=2, guidance_scale=1.0,
                      init_tokens=torch.zeros(2, 4, 2, dtype=torch.long))


def test_pipeline_decodes_only_the_masked_tokens(pipe: MeissonicPipeline) -> None:
    mask_id = pipe.scheduler.config.mask_token_id
    source = pipe(["a red circle"], steps=2, height=64, width=128, seed=0, output_type="codes")
    init = source.clone()
    init[0, 1:3, 2:5] = mask_id
    for exact in (False, True):
        codes = pipe(["a blue square"], steps=4, guidance_scale=3.0, seed=1, output_type="codes", init_tokens=init,
                     exact=exact)
        assert codes.shape == (1, 4, 8)  # the size follows the grid
        keep = init != mask_id
        assert torch.equal(codes[keep], source[keep]) and not bool((codes == mask_id).any())
    # The logits the fast loop draws from: the VQ's codes only, at the positions asked for.
    positions = (init.view(1, -1) == mask_id).nonzero()[:, 1][None]
    logits = pipe.logits(init, ["a blue square"], guidance_scale=3.0, timestep=3, positions=positions)
    assert logits.shape == (1, 6, pipe.vq.codebook_size)
    assert pipe.logits(source, "a blue square", guidance_scale=3.0).shape == (1, 32, pipe.vq.codebook_size)


@pytest.mark.parametrize("downsample", [True, False])
def test_fast_logits_equal_the_exact_guided_logits(downsample: bool) -> None:
    torch.manual_seed(0)
    model = MeissonicTransformer(meissonic_tiny(downsample=downsample, upsample=downsample)).eval()
    b, (h, w), scale = 2, (4, 6), 9.0
    text, pooled = _features(model, b, seed=3)
    micro = torch.tensor([[96.0, 64.0, 0.0, 0.0, 6.0], [64.0, 64.0, 8.0, 0.0, 5.0]]).repeat(2, 1)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.config.codebook_size, (b, h, w), generator=g)
    positions = torch.stack([torch.randperm(h * w, generator=g)[:10].sort().values for _ in range(b)])
    tokens.view(b, -1).scatter_(1, positions, model.config.mask_token_id)
    timestep = torch.tensor([7])
    with torch.inference_mode():
        full = exact_logits(model, tokens, timestep, text, pooled, micro, scale)
        expected = torch.gather(full.flatten(2).transpose(1, 2), 1, positions[..., None].expand(-1, -1, full.shape[1]))
        cond = model.prepare_conditioning(text, pooled, micro, (h, w))
        fast = masked_logits(model, tokens, timestep, cond, positions, scale)
        plain = masked_logits(model, tokens, timestep, model.prepare_conditioning(text[b:], pooled[b:], micro[b:], (h, w)),
                              positions)
        unguided = torch.gather(exact_logits(model, tokens, timestep, text[b:], pooled[b:], micro[b:]).flatten(2).transpose(1, 2),
                                1, positions[..., None].expand(-1, -1, full.shape[1]))
    assert fast.shape == (b, 10, model.config.codebook_size)
    torch.testing.assert_close(fast, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, unguided, atol=1e-5, rtol=1e-5)


def test_inverse_cdf_draw_follows_the_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 200, generator=g) ** 6
    probs[:, 50:70] = 0  # never drawn
    probs /= probs.sum(-1, keepdim=True)
    n = 20000
    draws = draw_categorical(probs.repeat_interleave(n, 0), torch.Generator().manual_seed(1), block=64).view(3, n)
    freq = torch.stack([torch.bincount(row, minlength=200) for row in draws]).double() / n
    assert ((draws >= 0) & (draws < 200)).all() and freq[:, 50:70].sum() == 0
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-4).all()
    one_hot = torch.zeros(2, 129)
    one_hot[0, 128], one_hot[1, 0] = 1.0, 1.0  # edges of a padded last block / the first block
    assert draw_categorical(one_hot, torch.Generator().manual_seed(2)).tolist() == [128, 0]


def test_pipeline_returns_images_and_seeded_runs_repeat(pipe: MeissonicPipeline) -> None:
    prompts = ["a red circle", "a blue square"]
    images = pipe(prompts, steps=3, height=64, width=32, seed=0)
    assert [im.size for im in images] == [(32, 64), (32, 64)] and images[0].mode == "RGB"
    first = pipe(prompts, steps=3, height=64, seed=[10, 11], output_type="codes")
    again = pipe(prompts, steps=3, height=64, seed=[10, 11], output_type="codes")
    other = pipe(prompts, steps=3, height=64, seed=[12, 13], output_type="codes")
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (2, 4, 4)
    exact = pipe(prompts, steps=3, height=64, seed=4, output_type="codes", exact=True)
    assert torch.equal(exact, pipe(prompts, steps=3, height=64, seed=4, output_type="codes", exact=True))
    tensor = pipe("one prompt", steps=2, height=32, guidance_scale=1.0, seed=0, output_type="tensor")
    assert tensor.shape == (1, 3, 32, 32) and 0 <= float(tensor.min()) and float(tensor.max()) <= 1


@pytest.mark.parametrize("exact", [False, True])
def test_token_temperature_sharpens_the_draw(pipe: MeissonicPipeline, exact: bool) -> None:
    mask_id = pipe.scheduler.config.mask_token_id
    prompts = ["a red circle", "a blue square"]
    # One step decodes every position from its logits at timestep 0; near zero temperature the draw is the argmax.
    codes = pipe(prompts, steps=1, guidance_scale=3.0, height=64, width=64, seed=[3, 4], output_type="codes",
                 exact=exact, token_temperature=1e-4)
    logits = pipe.logits(torch.full((2, 4, 4), mask_id), prompts, guidance_scale=3.0, timestep=0)
    assert torch.equal(codes.view(2, -1), logits.argmax(-1))
    # At temperature 1 (the default) the draws follow the logits' spread instead: seeds give other codes.
    draws = [pipe(prompts, steps=1, guidance_scale=3.0, height=64, width=64, seed=[s, s + 1], output_type="codes",
                  exact=exact) for s in (3, 5, 7)]
    assert any(not torch.equal(d, codes) for d in draws)
    assert torch.equal(draws[0], pipe(prompts, steps=1, guidance_scale=3.0, height=64, width=64, seed=[3, 4],
                                      output_type="codes", exact=exact, token_temperature=1.0))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="token temperature must be a number > 0"):
            pipe(prompts, steps=1, height=64, seed=0, token_temperature=bad)


def test_pipeline_half_precision_runs(tiny_model_dir: Path) -> None:
    pipe = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16 and pipe.vq.dtype == torch.float32  # the VQ asks for float32
    codes = pipe(["a green triangle"], steps=2, height=32, seed=0, output_type="codes")
    assert codes.shape == (1, 2, 2) and ((codes >= 0) & (codes < pipe.vq.codebook_size)).all()


def test_resolution_must_fit_the_grid(pipe: MeissonicPipeline) -> None:
    assert pipe.pixel_multiple == 32 and pipe.default_resolution == 1024  # f=16 VQ, 2x2 compression
    assert pipe.check_resolution(64, 96) == (4, 6)
    with pytest.raises(InputError, match=r"100x64 is not divisible by 32.*nearest to 100: 96 or 128"):
        pipe(["x"], steps=1, height=64, width=100)
    with pytest.raises(InputError, match="output_type"):
        pipe(["x"], steps=1, height=32, output_type="png")
    with pytest.raises(InputError, match="micro_conds"):
        pipe(["x"], steps=1, height=32, micro_conds=[1, 2, 3])
    with pytest.raises(InputError, match="2 seeds for 1 prompts"):
        pipe(["x"], steps=1, height=32, seed=[1, 2])


def test_dtype_and_device_names() -> None:
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown dtype 'fp8'; use fp32, bf16 or fp16"):
        resolve_dtype("fp8")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


def test_model_folder_errors(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelFormatError, match="model folder not found"):
        MeissonicPipeline.from_pretrained(tmp_path / "nowhere", device="cpu")
    # A repo id that is not in the (isolated, empty) Hugging Face cache: nothing is downloaded.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFormatError, match="download it with `hf download MeissonFlow/Meissonic`"):
        resolve_model_folder("MeissonFlow/Meissonic")
    with pytest.raises(ModelFormatError, match="HF_HUB_OFFLINE is set"):
        resolve_model_folder("MeissonFlow/Meissonic", allow_download=True)

    broken = copy_model_dir(tiny_model_dir, tmp_path / "broken")
    os.remove(broken / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFormatError, match=r"transformer/diffusion_pytorch_model\.safetensors"):
        MeissonicPipeline.from_pretrained(broken, device="cpu")
    other = copy_model_dir(tiny_model_dir, tmp_path / "other")
    os.remove(other / "scheduler" / "scheduler_config.json")
    with pytest.raises(ModelFormatError, match=r"scheduler/scheduler_config\.json"):
        MeissonicPipeline.from_pretrained(other, device="cpu")
    vq = copy_model_dir(tiny_model_dir, tmp_path / "vq")
    os.remove(vq / "vqvae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFormatError, match=r"diffusion_pytorch_model\.safetensors"):
        MeissonicPipeline.from_pretrained(vq, device="cpu")


def test_speed_benchmark_counts_flops_and_reports(capsys) -> None:
    import json
    import sys

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sample_speed

    torch.manual_seed(0)
    model = MeissonicTransformer(meissonic_tiny()).eval()
    cfg, b, (h, w) = model.config, 2, (8, 8)
    text, pooled = _features(model, 1)
    micro = torch.tensor([[128.0, 128.0, 0.0, 0.0, 6.0]] * b)
    seq = 77 + h * w // 4
    # FlopCounterMode does not see CPU flash attention: compare everything else.
    attention = 2.0 * (cfg.num_layers + cfg.num_single_layers) * b * 2 * seq * seq * cfg.inner_dim
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.full((b, h, w), cfg.mask_token_id), text, pooled, torch.tensor([3]), micro_conds=micro)
    assert sample_speed.forward_flops(cfg, b, h, w, 77, b * h * w, b * h * w) - attention == counter.get_total_flops()
    cond = model.prepare_conditioning(text, pooled, micro, (h, w))
    distinct = torch.randperm(h * w).view(1, h, w)  # 64 distinct ids: the embedding runs at every position
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        masked_logits(model, distinct, torch.tensor([3]), cond, torch.arange(20)[None], guidance_scale=9.0)
    fast = sample_speed.forward_flops(cfg, b, h, w, 77, b * 20, 20, with_context=False, token_rows=1)
    assert fast - attention == counter.get_total_flops()

    result = sample_speed.main(["--config", "tiny", "--resolution", "64", "--steps", "3", "--repeats", "1",
                                "--warmup-steps", "0", "--compare-official-style", "--json"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(result))
    assert line["seconds_per_step"] > 0 and line["total_seconds"] > 0 and line["speedup_vs_official_style"] > 0
    assert line["official_style_gflop_per_step"] > line["gflop_per_step"] > 0 and line["peak_matmul_gflops"] > 0
