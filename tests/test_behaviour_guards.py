"""Behaviour checks for bugs that would otherwise ship silently (issue 15).

Each test pins one behaviour a realistic one-line bug breaks without any other test noticing:
the negative prompt reaching the guided logits, the product's own guidance code against the
official `output.cfg_logits`, condition dropout feeding the empty prompt's features, and the EMA
formula. Atomic writes: test_atomic_behaviour.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from meissonic_cli.model.text_encoder import TextEncoder
from meissonic_cli.model.transformer import TransformerConfig, from_pretrained
from meissonic_cli.sample.pipeline import MeissonicPipeline, exact_logits, masked_logits, sample_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

A2 = "case_a2_pipeline_cfg_1024style"


# ---------------------------------------------------------------------------------------------
# Guidance: the negative prompt and the CFG mix


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> MeissonicPipeline:
    return MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


def _guided_reference(pipe: MeissonicPipeline, tokens: torch.Tensor, prompt: str, negative: str, scale: float,
                      timestep: int, micro: torch.Tensor) -> torch.Tensor:
    """uncond + s*(cond - uncond) from two separate full forwards, as (B, H*W, K) over the VQ's codes."""
    text, pooled = pipe.encode_prompts([prompt])
    neg_text, neg_pooled = pipe.encode_prompts([negative])
    t = torch.tensor([timestep])
    with torch.inference_mode():
        uncond = pipe.transformer(tokens, neg_text, neg_pooled, t, micro_conds=micro)
        cond = pipe.transformer(tokens, text, pooled, t, micro_conds=micro)
    guided = uncond + scale * (cond - uncond)
    return guided.flatten(2).transpose(1, 2)[..., : pipe.vq.codebook_size]


def test_negative_prompt_changes_the_guided_logits_to_its_own_reference(pipe: MeissonicPipeline) -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, pipe.vq.codebook_size, (1, 4, 4), generator=g)
    tokens.view(1, -1)[:, ::3] = pipe.scheduler.config.mask_token_id
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]])
    prompt, negative, scale, t = "a red circle", "blurry, low quality", 3.0, 5

    with_negative = pipe.logits(tokens, prompt, negative_prompt=negative, guidance_scale=scale, timestep=t,
                                micro_conds=micro)
    without = pipe.logits(tokens, prompt, guidance_scale=scale, timestep=t, micro_conds=micro)
    assert (with_negative - without).abs().max().item() > 1e-3  # the negative prompt is not dropped

    torch.testing.assert_close(with_negative, _guided_reference(pipe, tokens, prompt, negative, scale, t, micro),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(without, _guided_reference(pipe, tokens, prompt, "", scale, t, micro),
                               atol=1e-4, rtol=1e-4)


def test_sampling_conditions_on_the_negative_prompts_features(pipe: MeissonicPipeline) -> None:
    prompt, negative, scale, steps = "a blue square", "a red circle", 4.0, 3
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]])
    codes = pipe(prompt, negative_prompt=negative, steps=steps, guidance_scale=scale, height=64, width=64,
                 micro_conds=micro, seed=2, output_type="codes")
    text, pooled = pipe.encode_prompts([prompt])
    neg_text, neg_pooled = pipe.encode_prompts([negative])
    expected = sample_tokens(pipe.transformer, pipe.scheduler, text, pooled, micro, (4, 4), steps=steps,
                             guidance_scale=scale, negative_text=neg_text, negative_pooled=neg_pooled,
                             generator=torch.Generator().manual_seed(2))
    assert torch.equal(codes, expected)


def _a2_model_and_tensors(conformance_dir: Path, tmp_path: Path):
    case = json.loads((conformance_dir / "cases.json").read_text())["cases"][A2]
    config = TransformerConfig.from_dict(case["config"], source=f"{A2} config")
    folder = tmp_path / "model" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_json_dict()))
    weights = case["weights"].split()[0]
    save_file(load_file(str(conformance_dir / weights)), str(folder / "diffusion_pytorch_model.safetensors"))
    model = from_pretrained(folder.parent).eval()
    return case, model, load_file(str(conformance_dir / case["file"]))


def test_product_guidance_matches_the_official_cfg_logits(conformance_dir: Path, tmp_path: Path) -> None:
    case, model, tensors = _a2_model_and_tensors(conformance_dir, tmp_path)
    tokens_2b = tensors["input.hidden_states"]
    assert torch.equal(tokens_2b[0], tokens_2b[1])  # [uncond, cond] share the latents
    tokens = tokens_2b[:1]
    text, pooled = tensors["input.encoder_hidden_states"], tensors["input.pooled_projections"]
    micro, timestep = tensors["input.micro_conds"], tensors["input.timestep"]
    img_ids, txt_ids = tensors["input.img_ids"], tensors["input.txt_ids"]
    reference = tensors["output.cfg_logits"]
    scale = float(case["guidance_scale"])

    # Inject the reference timestep sinusoid: torch releases round a few float32 frequencies differently
    # (see test_model_conformance), and the check here is the guidance, not the sinusoid.
    sinusoid = tensors["intermediate.time_proj_out"]
    hook = model.time_text_embed.timestep_embedder.register_forward_pre_hook(
        lambda module, args: (sinusoid.to(args[0].dtype).expand_as(args[0]).clone(),))
    try:
        with torch.inference_mode():
            cond = model.prepare_conditioning(text, pooled, micro, tuple(tokens.shape[1:]), img_ids, txt_ids)
            exact = exact_logits(model, tokens, timestep, text, pooled, micro, scale)
            positions = torch.arange(tokens[0].numel())[None]
            fast = masked_logits(model, tokens, timestep, cond, positions, scale)
    finally:
        hook.remove()
    assert tuple(exact.shape) == tuple(reference.shape) == (1, model.config.codebook_size, 8, 8)
    torch.testing.assert_close(exact, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast, reference.flatten(2).transpose(1, 2), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Training: condition dropout and the EMA


GRID = 4


def _token_dataset(root: Path, per_shard: int = 6, dim: int = 32) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A one-shard token dataset with stored float16 text features; returns (root, texts, pooled)."""
    from meissonic_cli.data.shards import TokenSample, TokenShardWriter, write_dataset_info

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_dataset_info(root, {
        "format": "meissonic-tokens", "version": 1, "resolution": GRID * 16, "grid": [GRID, GRID],
        "downsample_factor": 16, "codebook_size": 64, "text_features": "full", "text_dim": dim, "pooled_dim": dim,
        "context_length": 77, "models": {},
    })
    texts, pooled = [], []
    with TokenShardWriter(root, 0) as w:
        for k in range(per_shard):
            text = rng.standard_normal((77, dim)).astype(np.float16)
            pool = rng.standard_normal(dim).astype(np.float16)
            w.write(TokenSample(key=f"s{k:05d}", codes=rng.integers(0, 64, (GRID, GRID)).astype(np.uint16),
                                micro=np.array([64, 64, 0, 0, 6.0], np.float32), caption=f"picture {k}",
                                text=text, pooled=pool))
            texts.append(torch.from_numpy(text.astype(np.float32)))
            pooled.append(torch.from_numpy(pool.astype(np.float32)))
    return root, torch.stack(texts), torch.stack(pooled)


def _trainer(tmp_path: Path, data: Path, **kw):
    from meissonic_cli.train.config import TrainConfig
    from meissonic_cli.train.trainer import Trainer

    text_encoder = tmp_path / "text_encoder"
    if not text_encoder.exists():
        TextEncoder.tiny(seed=0).save_pretrained(text_encoder)
    cfg = dict(data=str(data), output=str(tmp_path / "run"), model="tiny", resolution=GRID * 16, batch_size=3,
               max_steps=2, checkpoint_every=2, keep_last=0, lr=1e-2, log_every=1, device="cpu",
               text_encoder=str(text_encoder))
    cfg.update(kw)
    return Trainer(TrainConfig(**cfg)), text_encoder


def _spy_text(trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        pooled = kwargs.get("pooled_projections", args[2] if len(args) > 2 else None)
        seen.append((text.detach().float().cpu().clone(), pooled.detach().float().cpu().clone()))

    trainer.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    return seen


def test_cond_dropout_one_feeds_only_the_empty_prompt_and_ema_follows_its_formula(tmp_path: Path) -> None:
    data, texts, pooled = _token_dataset(tmp_path / "data")
    decay = 0.75  # not 0.5, so decay and 1 - decay give different averages
    # The constant decay (--no-ema-warmup); the warm-up schedule is checked against diffusers in test_train_logging.
    trainer, text_encoder = _trainer(tmp_path, data, cond_dropout=1.0, ema_decay=decay, ema_warmup=False)
    seen = _spy_text(trainer)
    before = {k: v.detach().float().clone() for k, v in trainer.ema.full_state().items()}
    try:
        stats = trainer.train_step()
    finally:
        trainer.stream.close()
    assert not stats.skipped and len(seen) == 1

    empty_text, empty_pooled = TextEncoder.from_pretrained(text_encoder).eval().encode([""])
    text_in, pooled_in = seen[0]
    assert text_in.shape == (3, 77, 32) and pooled_in.shape == (3, 32)
    # Stored features are float16, so the empty prompt's replacement is rounded the same way.
    torch.testing.assert_close(text_in, empty_text.detach().expand_as(text_in), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(pooled_in, empty_pooled.detach().expand_as(pooled_in), atol=2e-3, rtol=2e-3)

    # One EMA update after the optimizer step: ema = decay*ema + (1-decay)*param.
    params = {k: v.detach().float() for k, v in trainer.named_trainable.items()}
    after = trainer.ema.full_state()
    moved = 0
    for k, old in before.items():
        torch.testing.assert_close(after[k].float(), decay * old + (1 - decay) * params[k], atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(params[k], old))
    assert moved > 0  # the step changed the weights, so the formula was really exercised


def test_cond_dropout_zero_feeds_the_stored_features(tmp_path: Path) -> None:
    data, texts, pooled = _token_dataset(tmp_path / "data")
    trainer, _ = _trainer(tmp_path, data, cond_dropout=0.0)
    seen = _spy_text(trainer)
    try:
        trainer.train_step()
    finally:
        trainer.stream.close()
    text_in, pooled_in = seen[0]
    for row_text, row_pooled in zip(text_in, pooled_in):
        match = [i for i in range(len(texts)) if torch.equal(texts[i], row_text)]
        assert len(match) == 1 and torch.equal(pooled[match[0]], row_pooled)


def test_ema_update_is_decay_times_average_plus_one_minus_decay_times_param() -> None:
    from meissonic_cli.train.ema import EMA

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
    ema = EMA({"w": w}, decay=0.9)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 0.0, -4.0]))
    ema.update({"w": w})
    first = 0.9 * torch.tensor([1.0, -2.0, 4.0]) + 0.1 * torch.tensor([3.0, 0.0, -4.0])
    torch.testing.assert_close(ema.full_state()["w"], first)
    ema.update({"w": w})
    torch.testing.assert_close(ema.full_state()["w"], 0.9 * first + 0.1 * torch.tensor([3.0, 0.0, -4.0]))
    assert torch.equal(w.detach(), torch.tensor([3.0, 0.0, -4.0]))  # the update leaves the weights alone


def test_condition_dropout_draws_with_the_given_probability_and_replaces_only_dropped_rows() -> None:
    from meissonic_cli.train.objective import draw_condition_dropout, drop_captions, drop_features

    assert not draw_condition_dropout(64, 0.0, torch.Generator().manual_seed(0)).any()
    assert draw_condition_dropout(64, 1.0, torch.Generator().manual_seed(0)).all()
    drop = draw_condition_dropout(20_000, 0.3, torch.Generator().manual_seed(0))
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - 0.3) < 0.02
    # The same generator stream decides: a seeded draw repeats.
    assert torch.equal(drop, draw_condition_dropout(20_000, 0.3, torch.Generator().manual_seed(0)))

    rows = torch.tensor([True, False, True])
    assert drop_captions(["a", "b", "c"], rows) == ["", "b", ""]
    text, pooled = torch.arange(3 * 2 * 4.0).view(3, 2, 4), torch.arange(3 * 4.0).view(3, 4)
    empty_text, empty_pooled = torch.full((1, 2, 4), -1.0), torch.full((1, 4), -2.0)
    new_text, new_pooled = drop_features(text, pooled, rows, empty_text, empty_pooled)
    assert torch.equal(new_text[1], text[1]) and torch.equal(new_pooled[1], pooled[1])
    assert torch.equal(new_text[[0, 2]], empty_text.expand(2, 2, 4)) and torch.equal(new_pooled[[0, 2]], empty_pooled.expand(2, 4))
    same_text, same_pooled = drop_features(text, pooled, torch.zeros(3, dtype=torch.bool), empty_text, empty_pooled)
    assert torch.equal(same_text, text) and torch.equal(same_pooled, pooled)


def test_lr_schedule_warms_up_linearly_then_holds_or_follows_the_cosine() -> None:
    import math

    from meissonic_cli.train.optim import LRSchedule

    constant = LRSchedule("constant", warmup_steps=4, max_steps=20)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = LRSchedule("cosine", warmup_steps=2, max_steps=12, min_ratio=0.1)
    assert [cosine(s) for s in (0, 1)] == [0.5, 1.0]
    for s in range(2, 16):
        progress = min(1.0, (s - 2) / 10)
        assert cosine(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert cosine(2) == pytest.approx(1.0) and cosine(7) == pytest.approx(0.55) and cosine(12) == pytest.approx(0.1)
    assert cosine(30) == pytest.approx(0.1)  # stays at the floor past max_steps
    no_warmup = LRSchedule("cosine", warmup_steps=0, max_steps=0)
    assert no_warmup(0) == pytest.approx(1.0) and no_warmup(5) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_only_on_matrices_and_the_text_encoder_lr() -> None:
    from torch import nn

    from meissonic_cli.train.optim import parameter_groups

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)  # weight decays, bias does not
            self.norm = nn.LayerNorm(4)  # never decays
            self.tokens = nn.Embedding(5, 4)  # never decays
            self.text_encoder = nn.Linear(4, 4)  # its own LR
            self.frozen = nn.Linear(4, 4).requires_grad_(False)

    m = Model()
    groups = parameter_groups(m, weight_decay=0.05, lr=1e-3, text_encoder_lr=1e-5)
    by_param = {id(p): (g["weight_decay"], g["lr"]) for g in groups for p in g["params"]}
    assert by_param == {
        id(m.proj.weight): (0.05, 1e-3), id(m.proj.bias): (0.0, 1e-3),
        id(m.norm.weight): (0.0, 1e-3), id(m.norm.bias): (0.0, 1e-3), id(m.tokens.weight): (0.0, 1e-3),
        id(m.text_encoder.weight): (0.05, 1e-5), id(m.text_encoder.bias): (0.0, 1e-5),
    }
    same_lr = parameter_groups(m, weight_decay=0.05, lr=1e-3, text_encoder_lr=0.0)
    assert {g["lr"] for g in same_lr} == {1e-3}  # 0 = the transformer's LR


def test_no_decay_for_parameters_named_embedding_and_frozen_ones_do_not_stop_the_walk() -> None:
    from torch import nn

    from meissonic_cli.train.optim import parameter_groups

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(4, 4).requires_grad_(False)  # registered first: skipped, not the end
            self.pos_embedding = nn.Parameter(torch.zeros(6, 4))  # a matrix, but an embedding by name
            self.proj = nn.Linear(4, 4)

    m = Model()
    by_param = {id(p): g["weight_decay"] for g in parameter_groups(m, 0.05, 1e-3, 0.0) for p in g["params"]}
    assert by_param == {id(m.pos_embedding): 0.0, id(m.proj.weight): 0.05, id(m.proj.bias): 0.0}


def test_cosine_over_a_single_step_reaches_the_floor_at_that_step() -> None:
    from meissonic_cli.train.optim import LRSchedule

    one = LRSchedule("cosine", warmup_steps=3, max_steps=4, min_ratio=0.25)
    assert [one(s) for s in (3, 4)] == [pytest.approx(1.0), pytest.approx(0.25)]


# ---------------------------------------------------------------------------------------------
# Curate: the width/height minimums with rows exactly on the threshold (the other filters' boundary
# rows are in test_curate_schemas.py)


def test_curate_min_width_and_min_height_keep_rows_exactly_on_the_threshold(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from meissonic_cli.data.curate import CurateConfig, curate

    rows = [  # url, width, height, kept
        ("on-both", 200, 150, True), ("under-width", 199, 150, False), ("under-height", 200, 149, False),
        ("over-both", 201, 151, True), ("on-width-float", 200.0, 300, True), ("under-width-float", 199.999, 300, False),
    ]
    table = pa.table({"url": [r[0] for r in rows], "caption": ["a photo"] * len(rows),
                      "width": pa.array([float(r[1]) for r in rows]), "height": pa.array([float(r[2]) for r in rows])})
    pq.write_table(table, tmp_path / "src.parquet")
    curate(CurateConfig(inputs=[str(tmp_path / "src.parquet")], output=str(tmp_path / "out"), min_width=200,
                        min_height=150))
    kept = pq.read_table(tmp_path / "out").column("url").to_pylist()
    assert kept == [r[0] for r in rows if r[3]]


def test_build_optimizer_uses_the_configs_adam_settings_and_schedule() -> None:
    from types import SimpleNamespace

    from torch import nn

    from meissonic_cli.train.optim import LRSchedule, build_optimizer, scheduler_state

    model = nn.Module()
    model.proj = nn.Linear(3, 3)
    model.text_encoder = nn.Linear(3, 3)
    cfg = SimpleNamespace(lr=1e-3, text_encoder_lr=1e-5, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                          adam_eps=1e-7, lr_schedule="cosine", warmup_steps=2, max_steps=10, min_lr_ratio=0.2, fsdp=False)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-7
    assert not optimizer.defaults.get("fused")  # the fused kernel is for CUDA only
    base = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    assert base[id(model.proj.weight)] == 1e-3 and base[id(model.text_encoder.weight)] == 1e-5
    expected = LRSchedule("cosine", 2, 10, 0.2)
    for step in range(10):
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(g["initial_lr"] * expected(step), rel=1e-9)
        optimizer.step()
        scheduler.step()
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.2e-5, 0.2e-5, 0.2e-3, 0.2e-3])

    state = scheduler_state(scheduler)  # counters only: the schedule itself comes from the config
    assert state["lr_lambdas"] == [None] * len(optimizer.param_groups) and state["last_epoch"] == 10
    _, fresh = build_optimizer(model, cfg, torch.device("cpu"))
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 10

    cfg.lr_schedule = "constant"  # the config's schedule kind reaches the scheduler
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-5, 1e-5, 1e-3, 1e-3])


def test_collate_refuses_codes_outside_the_codebook_and_wrong_grids_with_their_numbers() -> None:
    from meissonic_cli.data.shards import TokenSample
    from meissonic_cli.errors import InputError
    from meissonic_cli.train.objective import collate

    def sample(codes, text=True) -> TokenSample:
        return TokenSample(key="k1", codes=np.asarray(codes, np.uint16), micro=np.array([64, 32, 0, 0, 5.5], np.float32),
                           caption="c", text=np.ones((77, 4), np.float16) if text else None,
                           pooled=np.ones(4, np.float16) if text else None)

    batch = collate([sample([[0, 15], [3, 4]])], grid=2, codebook_size=16, use_stored_text=True, score=6.0)
    assert batch.codes.tolist() == [[[0, 15], [3, 4]]] and batch.micro.tolist() == [[64, 32, 0, 0, 6.0]]
    with pytest.raises(InputError) as err:  # 16 is one past the last code of a 16-code book
        collate([sample([[0, 16], [3, 4]])], grid=2, codebook_size=16, use_stored_text=True, score=None, source="d")
    assert str(err.value) == ("d: codes reach 16 but the model's codebook has 16 entries; the shards were tokenized "
                              "with a different VQ model")
    with pytest.raises(InputError) as err:
        collate([sample(np.zeros((2, 3)))], grid=2, codebook_size=16, use_stored_text=True, score=None, source="d")
    assert str(err.value).startswith("d: sample 'k1' has a 2x3 code grid but --resolution and --vq-factor expect 2x2;")
    with pytest.raises(InputError) as err:
        collate([sample([[0, 1], [2, 3]], text=False)], grid=2, codebook_size=16, use_stored_text=True, score=None,
                source="d")
    assert str(err.value) == "d: sample 'k1' has no stored text features although dataset.json says full"
