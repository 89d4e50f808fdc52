"""Guidance distillation (`meissonic distill`): the guidance embedding, the objective, the trainer hooks, the
one-forward sampling path and the command's errors, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import crash_after_first_checkpoint, make_token_dataset, state_digest
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import ConfigError, InputError
from meissonic_cli.model.transformer import MeissonicTransformer, load_state_dict_files, meissonic_tiny
from meissonic_cli.sample.pipeline import MeissonicPipeline, exact_logits, sample_tokens
from meissonic_cli.train.checkpoint import list_checkpoints
from meissonic_cli.train.distill import (
    DistillConfig,
    DistillTrainer,
    decode_step,
    distill,
    distillation_loss,
    guided_logits,
    load_distill_config,
    masked_after,
    run_temperatures,
    sampler_states,
)
from meissonic_cli.train.masked_model import load_init_weights
from meissonic_cli.train.objective import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
GRID = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _student_of(teacher_root: Path) -> MeissonicTransformer:
    config = MeissonicTransformer.from_pretrained(teacher_root).config
    student = MeissonicTransformer(meissonic_tiny(**{**config.__dict__, "guidance_embeds": True}))
    load_init_weights(student, teacher_root)
    return student.eval()


def _inputs(b: int = 2, seed: int = 0, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (b, GRID, GRID), generator=g)
    tokens[:, :2] = 64  # the mask id of meissonic_tiny (vocab 65)
    return (tokens, torch.randn(b, 77, dim, generator=g), torch.randn(b, dim, generator=g),
            torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]]).expand(b, 5))


def _cfg(tmp: Path, data: Path, teacher: Path, **kw) -> DistillConfig:
    base = dict(data=str(data), output=str(tmp / "run"), teacher=str(teacher), resolution=GRID * 16, batch_size=4,
                max_steps=4, checkpoint_every=2, keep_last=0, lr=3e-3, log_every=2, device="cpu",
                guidance_min=1.0, guidance_max=4.0, distill_steps="2,4,8")
    base.update(kw)
    return DistillConfig(**base)


# ---------------------------------------------------------------------------------------------
# The guidance embedding


def test_guidance_embedding_follows_diffusers_combined_timestep_guidance_embedding():
    from diffusers.models.embeddings import CombinedTimestepGuidanceTextProjEmbeddings

    torch.manual_seed(0)
    model = MeissonicTransformer(meissonic_tiny(guidance_embeds=True)).eval()
    with torch.no_grad():
        for p in model.time_text_embed.guidance_embedder.parameters():
            p.normal_()  # past the zero start, so the comparison sees the whole layer
    assert "time_text_embed.guidance_embedder.linear_1.weight" in model.state_dict()
    reference = CombinedTimestepGuidanceTextProjEmbeddings(32, 32).eval()
    reference.load_state_dict(model.time_text_embed.state_dict(), strict=True)  # same names, same shapes
    t, g, pooled = torch.tensor([3.0, 11.0]), torch.tensor([1.5, 9.0]), torch.randn(2, 32)
    with torch.no_grad():
        ours = model.time_embedding(t) + model.guidance_embedding(g, 2) + model.time_text_embed.text_embedder(pooled)
        theirs = reference(t * 1000, g * 1000, pooled)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_student_starts_as_the_teachers_conditional_model(tiny_model_dir):
    teacher = MeissonicTransformer.from_pretrained(tiny_model_dir)
    student = _student_of(tiny_model_dir)
    assert not student.time_text_embed.guidance_embedder.linear_2.weight.any()
    tokens, text, pooled, micro = _inputs()
    t = torch.tensor([5.0])
    with torch.no_grad():
        expected = teacher(tokens, text, pooled, t, micro_conds=micro)
        for scale in (1.0, 7.5):
            assert torch.equal(student(tokens, text, pooled, t, micro_conds=micro, guidance=scale), expected)
    with pytest.raises(InputError, match="guidance"):
        student(tokens, text, pooled, t, micro_conds=micro)
    with pytest.raises(InputError, match="no guidance embedding"):
        teacher(tokens, text, pooled, t, micro_conds=micro, guidance=2.0)


# ---------------------------------------------------------------------------------------------
# The objective


def test_target_is_the_samplers_guided_mix_and_the_loss_is_zero_at_it(tiny_model_dir):
    teacher = MeissonicTransformer.from_pretrained(tiny_model_dir)
    tokens, text, pooled, micro = _inputs()
    empty_text, empty_pooled = torch.randn(1, 77, 32), torch.randn(1, 32)
    t = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        target = guided_logits(teacher, tokens, t, micro, text, pooled, empty_text, empty_pooled, torch.tensor([4.0, 4.0]))
        sampler = exact_logits(teacher, tokens, t[:1], torch.cat([empty_text.expand(2, -1, -1), text]),
                               torch.cat([empty_pooled.expand(2, -1), pooled]), torch.cat([micro, micro]), 4.0)
        conditional = teacher(tokens, text, pooled, t, micro_conds=micro)
    torch.testing.assert_close(target, sampler, rtol=0, atol=1e-5)
    labels = torch.where(tokens == 64, tokens, torch.full_like(tokens, IGNORE_INDEX))
    # A student whose output is the teacher's guided output: the loss is exactly zero.
    assert distillation_loss(target.clone(), target, labels).item() == 0.0
    # The conditional model (where the student starts) is not; ce is kl plus the teacher's entropy.
    kl = distillation_loss(conditional, target, labels)
    ce = distillation_loss(conditional, target, labels, "ce")
    p = target.softmax(1).permute(0, 2, 3, 1)[labels != IGNORE_INDEX]
    entropy = -(p * p.log()).sum(-1).mean()
    assert kl > 1e-5 and torch.isclose(ce, kl + entropy, atol=1e-5)
    # Only masked positions count, and only the codes the VQ has.
    unmasked_changed = torch.where(labels[:, None] == IGNORE_INDEX, target + 5 * torch.randn_like(target), target)
    assert distillation_loss(unmasked_changed, target, labels).item() == 0.0
    tail_changed = target.clone()
    tail_changed[:, 60:] += 3.0
    assert distillation_loss(tail_changed, target, labels, num_codes=60).item() == 0.0


def test_sampler_states_are_the_states_a_sampling_run_visits():
    rates, timesteps = sampler_states(2000, [4, 16], torch.Generator().manual_seed(0))
    for rate, t in zip(rates.tolist(), timesteps.tolist()):
        n = 4 if any(abs(rate - torch.cos(torch.tensor(i / 4 * torch.pi / 2)).item()) < 1e-6 and t == 3 - i
                     for i in range(4)) else 16
        i = n - 1 - int(t)
        assert 0 <= i < n and abs(rate - torch.cos(torch.tensor(i / n * torch.pi / 2)).item()) < 1e-6
    assert rates.max() == 1.0 and set(timesteps.tolist()) == set(range(16))


def _losses_on_a_fixed_batch(trainer: DistillTrainer, batch, steps: int) -> list[float]:
    """The loss of `steps` optimizer steps on `batch`, the generator reset before each so every step sees
    the same masks, timesteps, scales (and rollouts / teacher steps); closes the trainer's data stream."""
    state = trainer.generator.get_state()
    losses = []
    for _ in range(steps):
        trainer.generator.set_state(state)
        trainer.optimizer.zero_grad()
        loss, _ = trainer.micro_step_loss(batch)
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    trainer.stream.close()
    return losses


def test_loss_decreases_on_a_fixed_batch(tmp_path, tiny_model_dir):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    trainer = DistillTrainer(_cfg(tmp_path, data, tiny_model_dir, guidance_min=8.0, guidance_max=8.0, lr=1e-3,
                                  weight_decay=0.0))
    losses = _losses_on_a_fixed_batch(trainer, trainer.next_batch(), 20)
    assert losses[0] > 0.01 and losses[-1] < 0.2 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# The run: resume, the checkpoint folder, the one-forward path


def test_resume_is_bit_identical_and_checkpoints_are_guidance_models(tmp_path, tiny_model_dir):
    data = make_token_dataset(tmp_path / "data", shards=2, per_shard=5)
    common = dict(ema_decay=0.9, grad_accum=2)
    full = distill(_cfg(tmp_path, data, tiny_model_dir, output=str(tmp_path / "a"), **common))

    crash_after_first_checkpoint(_cfg(tmp_path, data, tiny_model_dir, output=str(tmp_path / "b"), **common), DistillTrainer)
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2]
    resumed = distill(_cfg(tmp_path, data, tiny_model_dir, output=str(tmp_path / "b"), resume="auto", **common))
    assert resumed.start_step == 2 and {k: resumed.losses[k] for k in (3, 4)} == {k: full.losses[k] for k in (3, 4)}
    for sub in ("transformer", "transformer_ema"):
        a = load_state_dict_files(tmp_path / "a" / "step-00000004" / sub)
        b = load_state_dict_files(tmp_path / "b" / "step-00000004" / sub)
        assert state_digest(a) == state_digest(b), sub

    # The checkpoint is a whole released-layout model with guidance_embeds: true that round-trips.
    ckpt = tmp_path / "a" / "step-00000004"
    assert json.loads((ckpt / "transformer" / "config.json").read_text())["guidance_embeds"] is True
    loaded = MeissonicTransformer.from_pretrained(ckpt)
    assert loaded.config.guidance_embeds and state_digest(loaded.state_dict()) == state_digest(load_state_dict_files(ckpt / "transformer"))
    assert loaded.time_text_embed.guidance_embedder.linear_2.weight.abs().sum() > 0  # it learned
    resaved = loaded.save_pretrained(tmp_path / "resaved" / "transformer")
    assert state_digest(MeissonicTransformer.from_pretrained(resaved).state_dict()) == state_digest(loaded.state_dict())

    # The pipeline runs it with one forward per step: equal to the student's forward with the scale embedded.
    pipe = MeissonicPipeline.from_pretrained(ckpt, device="cpu")
    tokens = torch.randint(0, 64, (2, GRID, GRID), generator=torch.Generator().manual_seed(1))
    tokens[0, 1:3] = pipe.scheduler.config.mask_token_id
    prompts = ["a red circle", "two blue squares"]
    one = pipe.logits(tokens, prompts, guidance_scale=3.0, timestep=2)
    text, pooled = pipe.encode_prompts(prompts)
    micro = torch.tensor([[GRID * 16.0, GRID * 16.0, 0, 0, 6.0]]).expand(2, 5)
    with torch.no_grad():
        direct = pipe.transformer(tokens, text, pooled, torch.tensor([2]), micro_conds=micro, guidance=3.0)
    num_codes = one.shape[-1]
    torch.testing.assert_close(one, direct.flatten(2).transpose(1, 2)[..., :num_codes], rtol=0, atol=1e-5)

    rows = []
    hook = pipe.transformer.context_embedder.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    for exact in (False, True):
        codes = pipe(prompts, steps=3, guidance_scale=3.0, seed=0, output_type="codes", height=GRID * 16, exact=exact)
        assert codes.shape == (2, GRID, GRID)
    hook.remove()
    assert rows and set(rows) == {2}  # the prompts' rows only, never [negative, positive]
    with pytest.raises(InputError, match="negative prompts are not supported"):
        pipe(prompts, negative_prompt="blurry", steps=2, guidance_scale=3.0, output_type="codes", height=GRID * 16)


def test_lora_distillation_adapts_the_guidance_embedding_too(tmp_path, tiny_model_dir):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    result = distill(_cfg(tmp_path, data, tiny_model_dir, lora_rank=2, max_steps=2, checkpoint_every=2))
    ckpt = result.last_checkpoint
    from meissonic_cli.model.lora import read_lora_file

    names = set(read_lora_file(ckpt / "lora"))
    assert "time_text_embed.guidance_embedder.linear_2.lora_B.weight" in names
    merged = MeissonicTransformer.from_pretrained(ckpt)
    assert merged.config.guidance_embeds and merged.time_text_embed.guidance_embedder.linear_2.weight.abs().sum() > 0
    teacher = load_state_dict_files(tiny_model_dir / "transformer")
    assert torch.equal(merged.state_dict()["mlm_layer.conv2.weight"], teacher["mlm_layer.conv2.weight"])  # frozen base


def test_sample_tokens_with_a_student_runs_the_sampler_options(tmp_path, tiny_model_dir):
    from meissonic_cli.sample.samplers import SamplerOptions

    pipe = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu")
    pipe.transformer = _student_of(tiny_model_dir)
    text, pooled = pipe.encode_prompts(["a red circle"])
    micro = torch.tensor([[64.0, 64.0, 0, 0, 6.0]])
    out = [sample_tokens(pipe.transformer, pipe.scheduler, text, pooled, micro, (GRID, GRID), steps=4, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(0), sampler=SamplerOptions(order=order), num_codes=60)
           for order in ("confidence", "halton")]
    assert all(o.shape == (1, GRID, GRID) and int(o.max()) < 60 for o in out)


# ---------------------------------------------------------------------------------------------
# Config and command


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


@pytest.mark.parametrize("change, word", [({"vocab_size": 66}, "vocab_size"), ({"downsample": False, "upsample": False}, "downsample")])
def test_a_teacher_and_student_that_do_not_pair_is_one_error_line(tmp_path, tiny_model_dir, change, word):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=2)
    other = tmp_path / "other"
    MeissonicTransformer(meissonic_tiny(**change)).save_pretrained(other / "transformer")
    line = _one_error_line(_invoke("distill", "--data", str(data), "--out", str(tmp_path / "run"), "--teacher",
                                   str(tiny_model_dir), "--init", str(other), "--resolution", "64", "--device", "cpu"))
    assert "do not pair" in line and word in line
    assert not (tmp_path / "run").exists()


def test_the_distill_command_runs_and_reports_json(tmp_path, tiny_model_dir):
    """`meissonic distill ... --json`: a guidance model checkpoint, and one JSON document on stdout naming it."""
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    result = _invoke("distill", "--data", str(data), "--out", str(tmp_path / "run"), "--teacher", str(tiny_model_dir),
                     "--resolution", str(GRID * 16), "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "2",
                     "--distill-steps", "2,4", "--guidance-max", "3", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["steps"] == 2 and doc["last_checkpoint"] == str(tmp_path / "run" / "step-00000002")
    assert set(doc["losses"]) == {"1", "2"} and all(v >= 0 for v in doc["losses"].values())
    assert MeissonicTransformer.from_pretrained(Path(doc["last_checkpoint"])).config.guidance_embeds


def test_a_guidance_distilled_teacher_is_refused(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=2)
    MeissonicTransformer(meissonic_tiny(guidance_embeds=True)).save_pretrained(tmp_path / "student" / "transformer")
    line = _one_error_line(_invoke("distill", "--data", str(data), "--out", str(tmp_path / "run"), "--teacher",
                                   str(tmp_path / "student"), "--resolution", "64"))
    assert "itself guidance-distilled" in line


@pytest.mark.parametrize("flags, word", [
    (["--guidance-min", "5", "--guidance-max", "2"], "--guidance-min"),
    (["--guidance-max", "nan"], "--guidance-max"),
    (["--distill-loss", "mse"], "--distill-loss"),
    (["--distill-steps", "4,x"], "--distill-steps"),
    (["--teacher-precision", "int8"], "--teacher-precision"),
    (["--step-distill", "0"], "--step-distill"),
    (["--step-distill", "2", "--distill-timesteps", "train"], "--step-distill"),
    (["--rollout-temperature", "1,x"], "--rollout-temperature"),
    (["--distill-temperature", "0"], "--distill-temperature"),
])
def test_bad_distill_flags_are_one_error_line(tmp_path, flags, word):
    line = _one_error_line(_invoke("distill", "--data", "d", "--out", str(tmp_path / "o"), "--teacher", "t", *flags))
    assert word in line


def test_recipes_load_and_the_config_layers(tmp_path):
    recipes = sorted((REPO / "pipelines" / "distill").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        text = recipe.read_text()
        assert text.startswith("#") and f"meissonic distill --config pipelines/distill/{recipe.name}" in text
        load_distill_config(recipe).validate()
    cfg = load_distill_config(recipes[0], {"guidance_max": 2.5, "lr": 1e-3})
    assert cfg.guidance_max == 2.5 and cfg.lr == 1e-3 and isinstance(cfg, DistillConfig)
    with pytest.raises(ConfigError, match="unknown field"):
        load_distill_config(None, {"guidance_maxx": 2})
    result = _invoke("distill", "--config", str(recipes[0]), "--guidance-max", "2.5", "--print-config")
    assert result.exit_code == 0 and "guidance_max: 2.5" in result.output and "teacher:" in result.output
    # YAML's own types are coerced to each field's (one coercion for train and distill fields alike).
    recipe = tmp_path / "r.yaml"
    recipe.write_text("distill_steps: [4, 8]\nrollout_temperature: [1, 0]\nguidance_max: 3\nlr: '2e-3'\nstep_distill: 2\n")
    cfg = load_distill_config(recipe)
    assert (cfg.distill_steps, cfg.step_counts, cfg.rollout_temperatures) == ("4,8", [4, 8], (1.0, 0.0))
    assert isinstance(cfg.guidance_max, float) and cfg.guidance_max == 3.0 and cfg.lr == 2e-3 and cfg.step_distill == 2
    recipe.write_text("rollout_temperature: 0.5\n")
    assert load_distill_config(recipe).rollout_temperatures == (0.5, 0.01)
    for bad, word in [("guidance_min: true", "guidance_min should be a float"), ("step_distill: 1.5", "step_distill"),
                      ("distill_steps: [[4]]", "distill_steps should be a str"), ("teacher: {a: 1}", "teacher")]:
        recipe.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=word):
            load_distill_config(recipe)


# ---------------------------------------------------------------------------------------------
# Rollout states and step distillation (--distill-timesteps rollout, --step-distill K)


def test_decode_step_keeps_the_official_schedule_and_known_tokens():
    from meissonic_cli.model.scheduler import MaskGITScheduler

    g = torch.Generator().manual_seed(0)
    b, n, length = 3, 5, GRID * GRID
    tokens = torch.full((b, GRID, GRID), 64)
    expected = MaskGITScheduler(mask_token_id=64).masked_after_step(n, length)
    for i in range(n):
        before = tokens.clone()
        step = torch.full((b,), i)
        now = (tokens.reshape(b, -1) == 64).sum(1)
        logits = torch.randn(b, 65, GRID, GRID, generator=g)
        tokens, decided = decode_step(logits, tokens, masked_after(step, n, length, now), run_temperatures(step, n, (1.0, 0.0)),
                                      0.5, 64, 60, g)
        assert (tokens.reshape(b, -1) == 64).sum(1).tolist() == [expected[i]] * b
        known = before != 64
        assert torch.equal(tokens[known], before[known])  # decided tokens never change
        assert torch.equal(decided, (before != tokens).reshape(b, -1))
        assert int(tokens[tokens != 64].max()) < 60  # only the VQ's codes


def test_rollout_states_are_the_students_own_sampling_run(tmp_path, tiny_model_dir):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    trainer = DistillTrainer(_cfg(tmp_path, data, tiny_model_dir, distill_timesteps="rollout", batch_size=4))
    batch = trainer.next_batch()
    text, pooled = trainer._caption_features(batch)
    states, steps, rows = trainer.rollout_states(2, text, pooled, batch.micro, torch.full((4,), 3.0), (GRID, GRID))
    trainer.stream.close()
    assert steps.tolist() == [0, 0, 1, 1] and rows.tolist() == [0, 1, 0, 1]  # ceil(4/2) = 2 captions, 2 states each
    mask_id = trainer.model_config.mask_token_id
    masked = (states.reshape(4, -1) == mask_id).sum(1).tolist()
    assert masked[:2] == [GRID * GRID] * 2 and masked[2:] == [int(GRID * GRID * torch.cos(torch.tensor(torch.pi / 4)))] * 2


@pytest.mark.parametrize("mode", ["sampler", "rollout"])
def test_step_distillation_targets_and_a_falling_loss(tmp_path, tiny_model_dir, mode):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    trainer = DistillTrainer(_cfg(tmp_path, data, tiny_model_dir, distill_timesteps=mode, step_distill=2, lr=1e-3,
                                  weight_decay=0.0, distill_temperature=0.5, guidance_min=4.0, guidance_max=4.0))
    # K = 1 is the teacher's guided logits at the state; K = 2 takes the first step's logits where it decided.
    tokens, text, pooled, micro = _inputs(b=2, dim=32)
    scales, step = torch.tensor([4.0, 4.0]), torch.tensor([0, 1])
    empty_text, empty_pooled = trainer._empty_features()
    with torch.no_grad():
        first = guided_logits(trainer.teacher, tokens, torch.tensor([5.0, 3.0]), micro, text, pooled, empty_text, empty_pooled, scales)
    state = trainer.generator.get_state()
    target = trainer.step_targets(tokens, step, 3, text, pooled, micro, scales)
    trainer.generator.set_state(state)
    after, decided = decode_step(first, tokens, masked_after(step * 2, 6, GRID * GRID, (tokens.reshape(2, -1) == 64).sum(1)),
                                 run_temperatures(step * 2, 6, trainer.cfg.rollout_temperatures),
                                 trainer.cfg.rollout_token_temperature, 64, trainer.num_codes, trainer.generator)
    with torch.no_grad():
        second = guided_logits(trainer.teacher, after, torch.tensor([4.0, 2.0]), micro, text, pooled, empty_text, empty_pooled, scales)
    flat, first_flat, second_flat = (x.reshape(2, x.shape[1], -1) for x in (target, first, second))
    pick = decided[:, None, :].expand_as(first_flat)
    still = (after.reshape(2, 1, -1) == 64).expand_as(first_flat)
    assert pick.any() and still.any()
    torch.testing.assert_close(flat[pick], first_flat[pick], rtol=0, atol=0)
    torch.testing.assert_close(flat[still], second_flat[still], rtol=0, atol=0)
    labels = torch.where(tokens == 64, tokens, torch.full_like(tokens, IGNORE_INDEX))
    assert distillation_loss(target.clone(), target, labels, temperature=0.5).item() == 0.0  # zero at its target

    batch = trainer.next_batch()
    if mode == "rollout":  # the student's own states move as it learns: hold the first rollout for a fixed batch
        real, held = trainer.rollout_states, []

        def rollout_once(*args, **kwargs):
            if not held:
                held.append(real(*args, **kwargs))
            return held[0]
        trainer.rollout_states = rollout_once
    losses = _losses_on_a_fixed_batch(trainer, batch, 30)
    assert losses[0] > 0.005 and losses[-1] < 0.3 * losses[0], losses


def test_resume_is_bit_identical_with_rollouts_and_step_distillation(tmp_path, tiny_model_dir):
    data = make_token_dataset(tmp_path / "data", shards=2, per_shard=5)
    common = dict(distill_timesteps="rollout", step_distill=2, rollout_token_temperature=0.5, distill_temperature=0.5)
    full = distill(_cfg(tmp_path, data, tiny_model_dir, output=str(tmp_path / "a"), **common))
    crash_after_first_checkpoint(_cfg(tmp_path, data, tiny_model_dir, output=str(tmp_path / "b"), **common), DistillTrainer)
    resumed = distill(_cfg(tmp_path, data, tiny_model_dir, output=str(tmp_path / "b"), resume="auto", **common))
    assert resumed.start_step == 2 and {k: resumed.losses[k] for k in (3, 4)} == {k: full.losses[k] for k in (3, 4)}
    a = load_state_dict_files(tmp_path / "a" / "step-00000004" / "transformer")
    b = load_state_dict_files(tmp_path / "b" / "step-00000004" / "transformer")
    assert state_digest(a) == state_digest(b)


def test_a_negative_prompt_on_a_student_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    """`sample` and `edit` check the negative prompts against a guidance-distilled model before the
    output folder is made or a step runs (the pipeline call itself checks too)."""
    import shutil

    from PIL import Image

    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    shutil.rmtree(student / "transformer")
    _student_of(tiny_model_dir).save_pretrained(student / "transformer")
    line = _one_error_line(_invoke("sample", "--model", str(student), "--prompt", "a red circle", "--negative-prompt",
                                   "blurry", "--out", str(tmp_path / "s"), "--resolution", "64", "--steps", "2",
                                   "--device", "cpu"))
    assert "negative prompts are not supported" in line and not (tmp_path / "s").exists()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "in.png")
    line = _one_error_line(_invoke("edit", "--model", str(student), "--image", str(tmp_path / "in.png"), "--prompt",
                                   "a blue circle", "--box", "0,0,32,32", "--negative-prompt", "blurry", "--out", str(tmp_path / "e"),
                                   "--steps", "2", "--device", "cpu"))
    assert "negative prompts are not supported" in line and not (tmp_path / "e").exists()
