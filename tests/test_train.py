"""The trainer: objective, overfitting, resume, NaN guard, init/LoRA/text-encoder fine-tuning, recipes, CLI errors."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.data.shards import ShardStream, TokenSample, TokenShardWriter, read_token_shard, write_dataset_info
from meissonic_cli.errors import ConfigError, InputError, ModelFormatError, OutputExistsError
from meissonic_cli.model.scaffold import build_tiny_model_folder
from meissonic_cli.model.text_encoder import TextEncoder
from meissonic_cli.model.transformer import MeissonicTransformer, load_state_dict_files, meissonic_tiny
from meissonic_cli.train import trainer as train_mod
from meissonic_cli.train.checkpoint import list_checkpoints
from meissonic_cli.train.config import TrainConfig, load_train_config
from meissonic_cli.train.objective import IGNORE_INDEX, mask_tokens, masked_cross_entropy, sample_masking_rates
from meissonic_cli.train.trainer import Trainer, TrainingDivergedError, train

REPO = Path(__file__).resolve().parents[1]
GRID = 4  # 64 px at a VQ factor of 16


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread, and the 2-core CI box is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_token_dataset(root: Path, *, shards: int = 2, per_shard: int = 8, grid: int = GRID, text: str = "full",
                       dim: int = 32, seed: int = 0, codebook: int = 64) -> Path:
    """A token dataset in the `tokenize` format with random codes and features."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_dataset_info(root, {
        "format": "meissonic-tokens", "version": 1, "resolution": grid * 16, "grid": [grid, grid], "downsample_factor": 16,
        "codebook_size": codebook, "text_features": text, "text_dim": dim if text == "full" else None,
        "pooled_dim": dim if text != "none" else None, "context_length": 77, "models": {},
    })
    k = 0
    for s in range(shards):
        with TokenShardWriter(root, s) as w:
            for _ in range(per_shard):
                w.write(TokenSample(
                    key=f"s{k:05d}", codes=rng.integers(0, codebook, (grid, grid)).astype(np.uint16),
                    micro=np.array([512, 384, 0, 0, 5.5], np.float32), caption=f"a picture number {k}",
                    text=rng.standard_normal((77, dim)).astype(np.float16) if text == "full" else None,
                    pooled=rng.standard_normal(dim).astype(np.float16) if text != "none" else None,
                ))
                k += 1
    return root


def test_shuffled_order_does_not_depend_on_the_order_samples_were_written(tmp_path):
    data = make_token_dataset(tmp_path / "a", shards=2, per_shard=6)
    # The same samples, each shard written in reverse (as a download finishing in another order would).
    other = tmp_path / "b"
    other.mkdir()
    shutil.copy(data / "dataset.json", other / "dataset.json")
    for index, shard in enumerate(sorted(data.glob("*.tar"))):
        with TokenShardWriter(other, index) as w:
            for sample in reversed(list(read_token_shard(shard))):
                w.write(sample)
    keys = []
    for root in (data, other):
        stream = ShardStream(sorted(root.glob("*.tar")), seed=3, shuffle=True)
        keys.append([next(stream).key for _ in range(18)])
        stream.close()
    assert keys[0] == keys[1] and sorted(set(keys[0])) == sorted(f"s{k:05d}" for k in range(12))
    assert keys[0][:12] != sorted(keys[0][:12])  # and it is shuffled


def make_model_folder(root: Path, *, downsample: bool = True, seed: int = 0) -> Path:
    """The trainable parts of a tiny released-layout folder: transformer/ and text_encoder/."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        MeissonicTransformer(meissonic_tiny(downsample=downsample, upsample=downsample)).save_pretrained(root / "transformer")
        TextEncoder.tiny(seed=seed).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def full_model(tmp_path_factory) -> Path:
    """A whole tiny released-layout folder (with vqvae/, tokenizer/, scheduler/); slow to build, so shared."""
    return build_tiny_model_folder(tmp_path_factory.mktemp("scaffold") / "model")


def cfg_for(tmp: Path, data: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), output=str(tmp / "run"), model="tiny", resolution=GRID * 16, batch_size=4,
                max_steps=6, checkpoint_every=3, keep_last=0, cond_dropout=0.0, lr=3e-3, log_every=3, device="cpu",
                curves=False)  # curves.png is drawn in test_train_logging's runs; matplotlib costs ~0.5 s a checkpoint
    base.update(kw)
    return TrainConfig(**base)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Objective


def test_masking_rate_follows_the_arccos_density():
    n = 200_000
    r = sample_masking_rates(n, torch.Generator().manual_seed(0)).double().numpy()
    # CDF of r = cos(pi/2 u): P(R <= x) = 1 - (2/pi) arccos(x); density 2/pi (1-x^2)^-1/2.
    xs = np.sort(r)
    cdf = 1 - (2 / np.pi) * np.arccos(xs)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(0, n) / n))
    assert ks < 1.63 / math.sqrt(n)  # KS critical value at the 1% level
    counts, edges = np.histogram(r, bins=20, range=(0, 1))
    expected = n * np.diff(1 - (2 / np.pi) * np.arccos(edges))
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    # Heavier near 1 than near 0, as the density says (the end bins hold 20.2% and 3.2%).
    assert counts[-1] > 4 * counts[0]
    clipped = sample_masking_rates(n, torch.Generator().manual_seed(1), min_rate=0.5).numpy()
    assert clipped.min() == pytest.approx(0.5)
    assert np.mean(clipped == np.float32(0.5)) == pytest.approx(1 / 3, abs=0.01)  # P(R <= 0.5) = 1/3


def test_mask_tokens_masks_round_L_r_positions_at_random():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (4, 8, 8), generator=g)
    rates = torch.tensor([0.5, 0.8125, 0.0, 1.0])
    inputs, labels = mask_tokens(codes, rates, mask_id=71, generator=g)
    masked = labels != IGNORE_INDEX
    # The conformance case a1 masks 32 and 52 of 64; a zero rate still masks one token.
    assert masked.flatten(1).sum(1).tolist() == [32, 52, 1, 64]
    assert torch.equal(inputs[masked], torch.full_like(inputs[masked], 71))
    assert torch.equal(inputs[~masked], codes[~masked])
    assert torch.equal(labels[masked], codes[masked])
    # Different samples get different positions.
    assert not torch.equal(masked[0], masked[1] & masked[0])


def test_masked_cross_entropy_on_a_hand_built_batch():
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, :, 0, 0] = torch.tensor([2.0, 0.0, 0.0])  # masked, label 0
    logits[0, :, 0, 1] = torch.tensor([9.0, -9.0, 3.0])  # not masked: ignored
    logits[1, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # masked, label 2
    logits[1, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])  # masked, label 1
    labels = torch.tensor([[[0, IGNORE_INDEX]], [[2, 1]]])
    lse = lambda v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    expected = ((lse([2, 0, 0]) - 2) + (lse([0, 1, 0]) - 0) + (lse([0, 0, 0]) - 0)) / 3
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_masked_cross_entropy_matches_the_official_training_loss(conformance_dir):
    from safetensors.torch import load_file

    case = load_file(str(conformance_dir / "case_a1_train_1024style.safetensors"))
    loss = masked_cross_entropy(case["output.logits"], case["train.labels"])
    assert loss.item() == pytest.approx(case["train.loss"].item(), abs=1e-6)


def test_forward_gets_timestep_rate_times_1000_and_the_shards_micro_conds(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1)
    trainer = Trainer(cfg_for(tmp_path, data, default_score=6.0))
    seen = {}

    def spy(module, args, kwargs):
        seen["timestep"], seen["micro"] = args[3].clone(), args[6].clone()

    trainer.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    state = trainer.generator.get_state()
    batch = trainer.next_batch()
    trainer.micro_step_loss(batch)
    rates = sample_masking_rates(4, torch.Generator().set_state(state))
    assert torch.equal(seen["timestep"], rates * 1000)
    assert seen["micro"].tolist() == [[512, 384, 0, 0, 6.0]] * 4  # the score replaced by --default-score
    trainer.cfg.score_micro_cond = True
    trainer.micro_step_loss(trainer.next_batch())
    assert seen["micro"][:, 4].tolist() == [5.5] * 4
    trainer.stream.close()


# ---------------------------------------------------------------------------------------------
# Training behaviour


def test_tiny_model_overfits_a_handful_of_samples(tmp_path, full_model):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    base = full_model
    result = train(cfg_for(tmp_path, data, max_steps=100, checkpoint_every=1000, weight_decay=0.0, log_every=50,
                           base_model=str(base)))
    losses = [result.losses[k] for k in sorted(result.losses)]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 3.0 and last < first / 10, (first, last)
    saved = list_checkpoints(tmp_path / "run")
    assert [s for s, _ in saved] == [100]
    # The checkpoint is a whole released-layout model folder (trained transformer + the base model's other parts).
    step = saved[0][1]
    model = MeissonicTransformer.from_pretrained(step)
    assert model.config == meissonic_tiny()
    assert {p.name for p in step.iterdir()} >= {"model_index.json", "vqvae", "tokenizer", "scheduler", "text_encoder"}
    assert (step / "vqvae" / "config.json").read_bytes() == (base / "vqvae" / "config.json").read_bytes()


def test_validation_samples_are_written_as_an_image_grid(tmp_path, full_model):
    from PIL import Image

    data = make_token_dataset(tmp_path / "data", shards=1)
    train(cfg_for(tmp_path, data, max_steps=2, checkpoint_every=2, base_model=str(full_model), validate_every=2,
                  validation_prompts=["a red circle", "a blue square"], validation_steps=2, ema_decay=0.5))
    grid = Image.open(tmp_path / "run" / "samples" / "step-00000002.png")
    # Two 64 px images side by side, enlarged 3x (pixel for pixel) so the captions below fit.
    assert grid.size[0] == 2 * 3 * 64 and grid.size[1] > 3 * 64
    assert "validation samples (EMA weights)" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ConfigError, match="--validate-every needs --base-model"):
        Trainer(cfg_for(tmp_path, data, output=str(tmp_path / "v"), validate_every=2, validation_prompts=["x"]))


def crash_after_first_checkpoint(cfg, trainer: type[Trainer] = Trainer) -> None:
    """Run `cfg` (with `trainer`, e.g. distill's) until its first checkpoint is written, then stop it as a kill
    would (KeyboardInterrupt)."""
    crashing = trainer(cfg)
    save = crashing.save_checkpoint

    def save_then_crash():
        save()
        raise KeyboardInterrupt

    crashing.save_checkpoint = save_then_crash
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=2, per_shard=5)  # odd sizes: cursors land mid-shard
    te = make_model_folder(tmp_path / "model") / "text_encoder"
    common = dict(cond_dropout=0.5, text_encoder=str(te), grad_accum=2, ema_decay=0.9, lr_schedule="cosine",
                  warmup_steps=2, max_steps=6, checkpoint_every=3)
    full = train(cfg_for(tmp_path, data, output=str(tmp_path / "a"), **common))

    # The same run, killed right after its step-3 checkpoint.
    crash_after_first_checkpoint(cfg_for(tmp_path, data, output=str(tmp_path / "b"), **common))
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]
    resumed = train(cfg_for(tmp_path, data, output=str(tmp_path / "b"), resume="auto", **common))
    assert resumed.start_step == 3
    assert {k: resumed.losses[k] for k in (4, 5, 6)} == {k: full.losses[k] for k in (4, 5, 6)}
    for sub in ("transformer", "transformer_ema"):
        a = load_state_dict_files(tmp_path / "a" / "step-00000006" / sub)
        b = load_state_dict_files(tmp_path / "b" / "step-00000006" / sub)
        assert state_digest(a) == state_digest(b), sub
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(tmp_path / "b")] == [m["loss"] for m in metrics(tmp_path / "a")]


def test_nan_guard_skips_bad_steps_then_reloads_the_last_checkpoint(tmp_path, monkeypatch):
    data = make_token_dataset(tmp_path / "data")
    real = train_mod.masked_cross_entropy
    calls = {"n": 0}
    poisoned = {3, 4, 5}  # micro-steps (= steps here) whose loss is NaN

    def flaky(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] in poisoned else loss

    monkeypatch.setattr(train_mod, "masked_cross_entropy", flaky)
    trainer = Trainer(cfg_for(tmp_path, data, max_steps=5, checkpoint_every=2, nan_patience=3))
    result = trainer.fit()
    rows = metrics(tmp_path / "run")
    # steps 1-2 fine (checkpoint at 2), steps 3-5 NaN and skipped -> reload step-2, then steps 3-5 again.
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, False), (3, True), (4, True), (5, True),
                                                        (3, False), (4, False), (5, False)]
    assert result.reloads == 1 and result.skipped_steps == 3
    log = (tmp_path / "run" / "train.log").read_text()
    assert "reloaded step-00000002" in log
    assert all(math.isfinite(v) for v in result.losses.values())
    final = load_state_dict_files(tmp_path / "run" / "step-00000005" / "transformer")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_nan_before_any_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    data = make_token_dataset(tmp_path / "data", shards=1)
    monkeypatch.setattr(train_mod, "masked_cross_entropy", lambda logits, labels: logits.sum() * float("nan"))
    with pytest.raises(TrainingDivergedError, match="before any checkpoint"):
        train(cfg_for(tmp_path, data, max_steps=5, nan_patience=2))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1)
    train(cfg_for(tmp_path, data, max_steps=4, checkpoint_every=1, keep_last=2))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3, 4]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def test_init_from_512_model_adds_fresh_compression_layers(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1)
    src = make_model_folder(tmp_path / "m512", downsample=False)
    trainer = Trainer(cfg_for(tmp_path, data, model="", init=str(src), feature_compression="on", max_steps=1))
    assert trainer.model_config.downsample
    assert sorted({k.split(".")[0] for k in trainer.fresh_keys}) == ["down_block", "up_block"]
    source = load_state_dict_files(src / "transformer")
    own = trainer.transformer.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.items())
    trainer.fit()
    assert "feature compression layers start fresh" in (tmp_path / "run" / "train.log").read_text()
    # Dropping layers the weights have is refused (only adding fresh compression layers is allowed).
    with pytest.raises(ModelFormatError, match="unexpected key"):
        Trainer(cfg_for(tmp_path, data, output=str(tmp_path / "x"), model="", init=str(make_model_folder(tmp_path / "m1024")),
                        feature_compression="off"))


def test_lora_trains_adapters_only_and_saves_them_separately_and_merged(tmp_path):
    from meissonic_cli.model.lora import load_lora, read_lora_file

    data = make_token_dataset(tmp_path / "data", shards=1)
    src = make_model_folder(tmp_path / "base")
    result = train(cfg_for(tmp_path, data, model="", init=str(src), lora_rank=2, max_steps=3, lr=1e-2, save_merged=True))
    step = result.last_checkpoint
    adapters = read_lora_file(step / "lora")
    assert adapters and all(".attn." in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    base = MeissonicTransformer.from_pretrained(src)
    merged = MeissonicTransformer.from_pretrained(step)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed and all(".attn." in k for k in changed)
    # Base + adapters (hooks) computes what the merged weights compute.
    lora = load_lora(step / "lora", base)
    assert lora.rank == 2
    # What `sample --lora` attaches (apply_lora, from the diffusers file) computes the same.
    from meissonic_cli.model.lora import apply_lora

    plain = MeissonicTransformer.from_pretrained(src)
    apply_lora(plain, [step / "lora" / "pytorch_lora_weights.safetensors"])
    g = torch.Generator().manual_seed(0)
    args = (torch.randint(0, 64, (1, GRID, GRID), generator=g), torch.randn(1, 77, 32, generator=g),
            torch.randn(1, 32, generator=g), torch.tensor([500.0]))
    kw = dict(micro_conds=torch.tensor([[512.0, 512, 0, 0, 6]]))
    with torch.no_grad():
        torch.testing.assert_close(base(*args, **kw), merged(*args, **kw), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain(*args, **kw), merged(*args, **kw), atol=1e-5, rtol=1e-5)


def test_text_encoder_trained_online_from_captions(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1, text="none")
    src = make_model_folder(tmp_path / "base")
    result = train(cfg_for(tmp_path, data, model="tiny", text_encoder=str(src / "text_encoder"), train_text_encoder=True,
                           cond_dropout=0.3, max_steps=2, checkpoint_every=2, lr=1e-2))
    saved = TextEncoder.from_pretrained(result.last_checkpoint / "text_encoder").state_dict()
    before = TextEncoder.from_pretrained(src / "text_encoder").state_dict()
    assert any(not torch.equal(saved[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# Recipes and configs


RECIPES = sorted((REPO / "pipelines").glob("*.yaml"))


def test_there_are_recipes_for_the_four_stages_and_cpu():
    names = {p.name for p in RECIPES}
    assert {"stage1_256.yaml", "stage2_512.yaml", "stage3_1024.yaml", "stage4_1024_aesthetic.yaml", "tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads_and_validates(recipe):
    text = recipe.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and text.startswith("#"), "a recipe opens with a comment"
    assert any("meissonic train --config pipelines/" + recipe.name in line or
               ("-m meissonic_cli train --config pipelines/" + recipe.name) in line for line in header)
    assert any("Needs" in line for line in header)
    cfg = load_train_config(recipe).validate()
    assert cfg.resolution % cfg.vq_factor == 0
    if cfg.model and not cfg.init:
        if Path(cfg.model).parts and not Path(cfg.model).exists() and "/" in cfg.model:
            # A model folder made by an earlier step (the demo's): the header must say how to make it;
            # tests/test_demo.py checks this recipe against the demo's own train config.
            assert any(cfg.model in line for line in header), f"{recipe.name}: header does not say how {cfg.model} is made"
        else:
            train_mod.resolve_model_config(cfg)


def test_stage_recipes_follow_the_paper():
    stages = {p.name: load_train_config(p) for p in RECIPES}
    s1, s2, s3, s4 = (stages[n] for n in ("stage1_256.yaml", "stage2_512.yaml", "stage3_1024.yaml", "stage4_1024_aesthetic.yaml"))
    assert (s1.resolution, s2.resolution, s3.resolution, s4.resolution) == (256, 512, 1024, 1024)
    assert s1.feature_compression == "off" and not s1.init
    assert s2.init and s2.feature_compression == "off"
    assert s3.init and s3.feature_compression == "on"
    assert s1.lr == s2.lr == s3.lr == 1e-4 and s4.lr < 1e-4
    assert s4.train_text_encoder and s4.score_micro_cond and s4.init


def test_config_file_then_flags_and_unknown_fields(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 2e-4\nbatch_size: 3\nvalidation_prompts: [a cat]\n")
    cfg = load_train_config(recipe, {"batch_size": 5})
    assert (cfg.lr, cfg.batch_size, cfg.validation_prompts) == (2e-4, 5, ["a cat"])
    recipe.write_text("lr: 1e-4\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown field.*learning_rate"):
        load_train_config(recipe)
    recipe.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_train_config(recipe)


# ---------------------------------------------------------------------------------------------
# CLI


def _invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def _error_text(result) -> str:
    return result.output + (str(result.exception) if result.exception else "")


def test_cli_print_config_resolves_file_then_flags(tmp_path):
    result = _invoke("--config", str(REPO / "pipelines" / "stage1_256.yaml"), "--lr", "3e-4", "--print-config")
    assert result.exit_code == 0, result.output
    import yaml

    shown = yaml.safe_load(result.output)
    assert shown["lr"] == 3e-4 and shown["resolution"] == 256 and shown["feature_compression"] == "off"


def test_cli_runs_the_tiny_cpu_recipe(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1)
    te = make_model_folder(tmp_path / "model") / "text_encoder"
    result = _invoke("--config", str(REPO / "pipelines" / "tiny_cpu.yaml"), "--data", str(data), "--out",
                     str(tmp_path / "run"), "--text-encoder", str(te), "--batch-size", "2", "--max-steps", "2", "--json")
    assert result.exit_code == 0, _error_text(result)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    # --json: the one document on stdout names the run's result; the summary table went to stderr.
    doc = json.loads(result.stdout)
    assert (doc["start_step"], doc["steps"], doc["skipped_steps"]) == (0, 2, 0)
    assert doc["last_checkpoint"] == str(tmp_path / "run" / "step-00000002") and set(doc["losses"]) == {"1", "2"}
    assert doc["final_loss"] == pytest.approx(sum(doc["losses"].values()) / 2) and "meissonic train" in result.stderr
    saved = load_train_config(tmp_path / "run" / "step-00000002" / "train_config.yaml")
    assert (saved.max_steps, saved.batch_size, saved.lr, saved.cond_dropout) == (2, 2, 3e-3, 0.1)


def test_tensorboard_is_optional(tmp_path):
    import importlib.util

    data = make_token_dataset(tmp_path / "data", shards=1)
    cfg = cfg_for(tmp_path, data, max_steps=3, tensorboard=True, log_every=1)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="pip install 'meissonic\\[tensorboard\\]'"):
            Trainer(cfg)
        assert not (tmp_path / "run").exists()
    else:
        train(cfg)
        assert list((tmp_path / "run" / "tensorboard").glob("events.*"))


@pytest.mark.parametrize("flag,value,word", [("--grad-accum", "1000000000", "--grad-accum must be between 1 and 65536"),
                                              ("--lora-rank", "1000000000", "--lora-rank must be between 0 and 4096")])
def test_absurd_but_finite_counts_are_refused_before_anything(tmp_path, flag, value, word):
    """A billion micro-steps per step (a run that never ends) or a billion-rank adapter (a 1 TB allocation)
    is one Error: line before any file is written."""
    result = _invoke("--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--init", str(tmp_path / "m"),
                     "--device", "cpu", flag, value)
    assert result.exit_code == 1 and result.output.startswith("Error:") and word in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_a_shard_damaged_after_tokenize_stops_training_with_one_error(tmp_path):
    """NaN bytes written over a sample's pooled features (file size unchanged, so the stats file still calls
    the shard complete): training stops with one Error: naming the shard and sample, never a skipped step."""
    import tarfile

    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    shard = data / "tokens-00000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("pooled.npy"))
    with open(shard, "r+b") as fh:  # the last 16 bytes of the array: 8 float16 NaNs
        fh.seek(member.offset_data + member.size - 16)
        fh.write(np.full(8, np.nan, dtype=np.float16).tobytes())
    result = _invoke("--data", str(data), "--out", str(tmp_path / "run"), "--arch", "tiny", "--resolution", "64",
                     "--device", "cpu", "--batch-size", "2", "--max-steps", "2", "--no-shuffle", "--cond-dropout", "0")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "tokens-00000.tar: sample 's00000' has non-finite values" in errors[0], result.output
    assert "Traceback" not in result.output and not list((tmp_path / "run").glob("step-*"))


@pytest.mark.parametrize("case", ["missing", "empty", "grid", "field"])
def test_cli_bad_inputs_fail_with_one_line(tmp_path, case):
    data = make_token_dataset(tmp_path / "data", shards=1)
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--arch", "tiny", "--resolution", "64", "--device", "cpu"]
    if case == "missing":
        args[1], expect = str(tmp_path / "nope"), "does not exist"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1], expect = str(tmp_path / "empty"), "no complete token shards"
    elif case == "grid":
        args[7], expect = "128", "4x4 code grids"
    else:
        (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
        args += ["--config", str(tmp_path / "bad.yaml")]
        expect = "learning_rate"
    result = _invoke(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_resume_with_a_different_model_config_is_refused_without_damage(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1)
    train(cfg_for(tmp_path, data, max_steps=2, checkpoint_every=2))
    run = tmp_path / "run"
    before = tree_digest(run)
    with pytest.raises(ConfigError, match="different model config.*downsample"):
        Trainer(cfg_for(tmp_path, data, max_steps=4, feature_compression="off", resume="auto"))
    with pytest.raises(OutputExistsError, match="--resume auto"):
        Trainer(cfg_for(tmp_path, data, max_steps=4))
    with pytest.raises(InputError, match="not a training checkpoint"):
        Trainer(cfg_for(tmp_path, data, max_steps=4, resume=str(run / "step-00000009")))
    result = _invoke("--data", str(data), "--out", str(run), "--arch", "tiny", "--resolution", "64", "--device", "cpu",
                     "--resume", "auto", "--feature-compression", "off", "--max-steps", "4")
    assert result.exit_code == 1 and "different model config" in _error_text(result)
    assert tree_digest(run) == before


# ---------------------------------------------------------------------------------------------
# Checkpoints hold no pickle; an interrupted run says how to resume


def test_no_torch_load_in_the_package_turns_the_safe_loader_off():
    import ast

    offenders, calls = [], 0
    for path in sorted((REPO / "meissonic_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                safe = [k for k in node.keywords if k.arg == "weights_only"]
                if not (safe and isinstance(safe[0].value, ast.Constant) and safe[0].value.value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls >= 1  # the walk does find torch.load calls
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


class _RunsCode:
    """Unpickling this creates a marker file: what a crafted checkpoint would do with a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pickled")
    data = make_token_dataset(tmp / "data", shards=1)
    train(cfg_for(tmp, data, max_steps=2, checkpoint_every=2))
    return data, tmp / "run"


@pytest.mark.parametrize("target", ["legacy_rng", "rng", "trainer_state"])
def test_a_pickle_payload_in_a_checkpoint_is_never_run_on_resume(tmp_path, finished_run, target):
    import pickle

    data, original = finished_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    step = run / "step-00000002"
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"python": _RunsCode(str(marker))})
    if target == "legacy_rng":  # a checkpoint in the old layout, rng/rank-00000.pt
        (step / "rng" / "rank-00000.safetensors").unlink()
        (step / "rng" / "rank-00000.pt").write_bytes(payload)
        expect = "old pickle format"
    elif target == "rng":
        (step / "rng" / "rank-00000.safetensors").write_bytes(payload)
        expect = "not a readable safetensors file"
    else:
        torch.save({"step": 2, "optimizer": {}, "scheduler": {}, "evil": _RunsCode(str(marker))}, step / "trainer_state.pt")
        expect = "refused without loading it"
    # A hostile checkpoint comes without a manifest (or with one that matches): the loaders must refuse it.
    (step / "checkpoint.json").unlink(missing_ok=True)
    before = tree_digest(run)
    result = _invoke("--data", str(data), "--out", str(run), "--arch", "tiny", "--resolution", "64", "--device", "cpu",
                     "--batch-size", "4", "--cond-dropout", "0", "--max-steps", "4", "--resume", "auto")
    assert result.exit_code == 1, _error_text(result)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], result.output
    assert "weights_only" not in result.output
    assert not marker.exists()
    assert tree_digest(run) == before


def test_ctrl_c_prints_the_command_that_resumes(tmp_path, monkeypatch):
    import shlex

    data = make_token_dataset(tmp_path / "data", shards=1)
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--arch", "tiny", "--resolution", "64",
            "--device", "cpu", "--batch-size", "4", "--cond-dropout", "0", "--max-steps", "4", "--checkpoint-every", "2"]
    save = train_mod.Trainer.save_checkpoint

    def save_then_interrupt(self):
        save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Trainer, "save_checkpoint", save_then_interrupt)
    result = _invoke(*args)
    assert result.exit_code == 130
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: interrupted") and "rerun the same command" not in line
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command[:2] == ["meissonic", "train"] and command[-2:] == ["--resume", "auto"]
    monkeypatch.setattr(train_mod.Trainer, "save_checkpoint", save)
    resumed = _invoke(*command[2:])
    assert resumed.exit_code == 0, _error_text(resumed)
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]


def test_rng_state_round_trips_through_safetensors_and_json(tmp_path):
    import random

    from meissonic_cli.train import checkpoint as ckpt

    g = torch.Generator().manual_seed(5)
    random.gauss(0, 1)  # a cached python gaussian
    np.random.normal()  # and numpy's
    cuda = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in range(2)]  # as on a 2-GPU rank
    state = {**ckpt.rng_state(g), "cuda": cuda}
    ckpt.write_rng_state(tmp_path / "rank-00000.safetensors", state)
    (tmp_path / "rng").mkdir()
    (tmp_path / "rank-00000.safetensors").rename(ckpt.rng_file(tmp_path, 0))
    back = ckpt.read_rng_state(tmp_path, 0)
    assert back["python"] == state["python"]
    assert back["numpy"][0] == state["numpy"][0] and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][2:] == state["numpy"][2:]
    for key in ("torch", "trainer"):
        assert torch.equal(back[key], state[key])
    assert all(torch.equal(a, b) for a, b in zip(back["cuda"], state["cuda"])) and len(back["cuda"]) == 2
    expected = (random.random(), float(np.random.normal()), float(torch.rand(1)), float(torch.rand(1, generator=g)))
    ckpt.restore_rng_state(back, g)
    assert (random.random(), float(np.random.normal()), float(torch.rand(1)), float(torch.rand(1, generator=g))) == expected
    assert ckpt.read_rng_state(tmp_path, 1) is None  # no state for a rank the checkpoint did not have
