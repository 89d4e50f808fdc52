"""Checkpoint parts written by `write_checkpoint` come back unchanged from the readers (LoRA and EMA adapters,
the trained text encoder, trainer state), and every refusal of a bad or mismatched checkpoint names what to do.

Everything here calls `meissonic_cli.train.checkpoint` directly on tiny modules: no training run.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from meissonic_cli.errors import ConfigError, InputError, ModelFormatError, OutputExistsError
from meissonic_cli.model.lora import LoRA, merge_adapters
from meissonic_cli.model.text_encoder import TextEncoder
from meissonic_cli.model.transformer import MeissonicTransformer, load_state_dict_files, meissonic_tiny
from meissonic_cli.train import checkpoint as ckpt
from meissonic_cli.train.config import TrainConfig
from meissonic_cli.train.masked_model import MaskedImageModel

pytestmark = pytest.mark.usefixtures("one_thread")

CURSOR = {"epoch": 1, "position": 2, "offset": 3, "shard": "tokens-00000.tar"}


def _noisy(state: dict[str, torch.Tensor], prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """Random values for the float tensors of `state` under `prefix` (others dropped)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in state.items() if k.startswith(prefix) and v.is_floating_point()}


def _tiny(*, lora_rank: int = 0, text_encoder: bool = False):
    """A MaskedImageModel's pieces and a full state of it whose trained parts differ from the live module."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = MeissonicTransformer(meissonic_tiny())
        lora = LoRA(transformer, lora_rank) if lora_rank else None
        te = TextEncoder.tiny(seed=0) if text_encoder else None
    module = MaskedImageModel(transformer, te, lora)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    # Adapters (lora_B starts at zero) and text encoder as after some training: not the live values.
    state.update(_noisy(state, "lora.", 1))
    state.update(_noisy(state, "text_encoder.", 2))
    return lora, te, state


def _write(final: Path, model_state: dict[str, torch.Tensor], **kw) -> Path:
    args = dict(step=3, model_state=model_state, optim_state={"state": {}, "param_groups": []}, ema_state=None,
                scheduler_state={"last_epoch": 3}, scaler_state=None,
                rngs=[ckpt.rng_state(torch.Generator().manual_seed(0))], cursors=[CURSOR], config_yaml="lr: 0.001\n",
                model_config=meissonic_tiny(), lora=None, text_encoder=None, base_root=None)
    args.update(kw)
    return ckpt.write_checkpoint(final, **args)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _fake_checkpoint(path: Path) -> Path:
    """Just enough of a checkpoint for `list_checkpoints` to count it."""
    path.mkdir(parents=True)
    (path / ckpt.TRAINER_STATE).write_bytes(b"")
    return path


# ---------------------------------------------------------------------------------------------
# What is written is what is read back


def test_lora_checkpoint_with_ema_reads_back_the_adapters_and_ema_adapters_it_was_given(tmp_path):
    lora, _, state = _tiny(lora_rank=2)
    ema = _noisy(state, "lora.", 3)
    step = _write(tmp_path / "run" / "step-00000003", state, lora=lora, ema_state=ema)
    for name in ("lora", "lora_ema"):  # PEFT and diffusers layouts of the adapter and of its EMA
        assert {p.name for p in (step / name).iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                                             "pytorch_lora_weights.safetensors", "transformer_config.json"}

    adapters = {k: v for k, v in state.items() if k.startswith("lora.")}
    assert _same(ckpt.read_module_state(step, lora=lora, text_encoder=False), adapters)
    assert _same(ckpt.read_ema_state(step, lora=lora), ema)
    assert not _same(adapters, ema)
    # transformer/ and transformer_ema/ hold the base weights with the matching adapters merged in.
    base = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    for sub, which in (("transformer", adapters), ("transformer_ema", ema)):
        expected = merge_adapters(base, lora.named_adapters(which), lora.scale)
        got = load_state_dict_files(step / sub)
        assert set(got) == set(expected) and all(torch.allclose(got[k], expected[k]) for k in got), sub


def test_lora_checkpoint_of_an_earlier_version_still_resumes(tmp_path):
    """Older LoRA checkpoints hold lora/adapters.safetensors (+ adapters_ema) as meissonic-lora files."""
    import shutil

    from safetensors.torch import save_file

    lora, _, state = _tiny(lora_rank=2)
    ema = _noisy(state, "lora.", 3)
    step = _write(tmp_path / "step-00000003", state, lora=lora, ema_state=ema)
    shutil.rmtree(step / "lora")
    shutil.rmtree(step / "lora_ema")
    (step / "lora").mkdir()
    meta = {"format": "meissonic-lora", "rank": "2", "alpha": "2.0"}
    for name, which in (("adapters", state), ("adapters_ema", ema)):
        tensors = {k: v.contiguous() for k, v in lora.named_adapters(which).items()}
        save_file(tensors, str(step / "lora" / f"{name}.safetensors"), metadata=meta)
    assert _same(ckpt.read_module_state(step, lora=lora, text_encoder=False),
                 {k: v for k, v in state.items() if k.startswith("lora.")})
    assert _same(ckpt.read_ema_state(step, lora=lora), ema)


def test_trained_text_encoder_is_saved_and_read_back(tmp_path):
    _, te, state = _tiny(text_encoder=True)
    step = _write(tmp_path / "step-00000003", state, text_encoder=te)
    back = ckpt.read_module_state(step, lora=None, text_encoder=True)
    assert _same({k: v for k, v in back.items() if k.startswith("text_encoder.")},
                 {k: v for k, v in state.items() if k.startswith("text_encoder.")})
    assert _same({k: v for k, v in back.items() if k.startswith("transformer.")},
                 {k: v for k, v in state.items() if k.startswith("transformer.")})
    # A released-layout text encoder folder that `meissonic sample` loads on its own.
    assert TextEncoder.from_pretrained(step / "text_encoder").config == te.config


def test_trainer_state_keeps_the_scaler_and_refuses_another_format(tmp_path):
    _, _, state = _tiny()
    scaler = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}
    step = _write(tmp_path / "step-00000003", state, scaler_state=scaler)
    saved = ckpt.read_trainer_state(step)
    assert saved["scaler"] == scaler
    assert (saved["step"], saved["scheduler"], saved["world_size"]) == (3, {"last_epoch": 3}, 1)
    torch.save({**saved, "format": saved["format"] + 1}, step / ckpt.TRAINER_STATE)
    with pytest.raises(ModelFormatError, match=rf"trainer state format {saved['format'] + 1}.*start a new --out"):
        ckpt.read_trainer_state(step)


def test_fresh_transformer_refuses_a_state_with_an_unexpected_or_missing_key():
    _, _, state = _tiny()
    assert ckpt.fresh_transformer(meissonic_tiny(), state, None).config == meissonic_tiny()
    extra = {**state, "transformer.stray.weight": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r"Unexpected key.*stray\.weight"):
        ckpt.fresh_transformer(meissonic_tiny(), extra, None)
    dropped = sorted(k for k in state if k.startswith("transformer."))[0]
    with pytest.raises(RuntimeError, match="Missing key"):
        ckpt.fresh_transformer(meissonic_tiny(), {k: v for k, v in state.items() if k != dropped}, None)


# ---------------------------------------------------------------------------------------------
# Run directory housekeeping


def test_stale_temporaries_of_both_name_patterns_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    kept = [_fake_checkpoint(run / "step-00000002"), run / ".tmp-step-2-99", run / "notes"]
    stale = [run / ".tmp-step-00000004-99", run / ".old-step-00000004-99", run / ".del-step-00000002-99",
             run / ".step-00000004.tmp-123-0", run / ".step-00000004.old-123"]
    for path in kept[1:] + stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
    (run / ".del-step-00000001-5").write_text("a file, not a leftover folder")
    kept.append(run / ".del-step-00000001-5")
    ckpt.remove_stale_temporaries(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in kept)
    ckpt.remove_stale_temporaries(tmp_path / "absent")  # no run directory yet: nothing to do


def test_a_leftover_that_cannot_be_fully_deleted_does_not_stop_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    stuck, other = run / ".tmp-step-00000004-99", run / ".step-00000006.tmp-123-0"
    for path in (stuck, other):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"x")
    (stuck / "busy.bin").write_bytes(b"x")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):  # a file the file system refuses to delete (busy, read-only mount)
        if os.fsdecode(path).endswith("busy.bin"):
            raise PermissionError(1, "Operation not permitted", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    ckpt.remove_stale_temporaries(run)
    assert not other.exists() and (stuck / "busy.bin").exists()
    assert ckpt.list_checkpoints(run) == []


def test_a_missing_checkpoint_names_the_checkpoints_that_exist(tmp_path):
    run = tmp_path / "run"
    for step in (4, 2):
        _fake_checkpoint(run / ckpt.checkpoint_name(step))
    assert ckpt.check_checkpoint_dir(run / "step-00000004") == run / "step-00000004"
    with pytest.raises(InputError) as err:
        ckpt.check_checkpoint_dir(run / "step-00000009")
    assert str(err.value) == (f"{run / 'step-00000009'} is not a training checkpoint (no {ckpt.TRAINER_STATE}); "
                              f"checkpoints in {run}: step-00000002, step-00000004")
    with pytest.raises(InputError) as err:
        ckpt.check_checkpoint_dir(tmp_path / "nowhere" / "step-00000001")
    assert str(err.value).endswith(f"(no {ckpt.TRAINER_STATE})")


def test_complete_model_folder_adds_every_available_part_and_keeps_trained_ones(tmp_path):
    base = tmp_path / "base"  # a base model without model_index.json
    for part in ("vqvae", "tokenizer", "scheduler", "text_encoder"):
        (base / part).mkdir(parents=True)
        (base / part / "config.json").write_text(json.dumps({"part": part}))
    folder = tmp_path / "step-00000003"
    (folder / "tokenizer").mkdir(parents=True)  # already there: left as it is
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text('{"trained": true}')
    ckpt.complete_model_folder(folder, base)
    assert sorted(p.name for p in folder.iterdir()) == ["scheduler", "text_encoder", "tokenizer", "vqvae"]
    assert not (folder / "tokenizer" / "config.json").exists()
    assert json.loads((folder / "text_encoder" / "config.json").read_text()) == {"trained": True}
    for part in ("vqvae", "scheduler"):
        assert (folder / part / "config.json").stat().st_ino == (base / part / "config.json").stat().st_ino  # hard link
    ckpt.complete_model_folder(tmp_path / "other", None)  # no base model: nothing added
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and refusals that say what to do


def _cfg(run: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(run.parent / "data"), output=str(run), **kw)


def _resumable(run: Path, saved_config: dict) -> Path:
    import yaml

    from meissonic_cli.atomic import write_json

    step = _fake_checkpoint(run / "step-00000002")
    (step / "transformer").mkdir()
    write_json(step / "transformer" / "config.json", meissonic_tiny().to_json_dict())
    (step / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(saved_config))
    return step


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(OutputExistsError, match="holds another run's metrics; pass --resume auto or choose a new --out"):
        ckpt.find_resume_checkpoint(run, _cfg(run), meissonic_tiny())
    _resumable(run, {})
    with pytest.raises(OutputExistsError, match="newest step-00000002\\); pass --resume auto to continue that run or "
                                                "choose a new --out$"):
        ckpt.find_resume_checkpoint(run, _cfg(run), meissonic_tiny())
    assert ckpt.find_resume_checkpoint(tmp_path / "new", _cfg(tmp_path / "new"), meissonic_tiny()) is None


def test_resume_refuses_a_checkpoint_of_another_model_or_setting(tmp_path):
    run = tmp_path / "run"
    step = _resumable(run, {"lora_rank": 2, "train_text_encoder": True})
    assert ckpt.find_resume_checkpoint(run, _cfg(run, resume="auto", lora_rank=2, train_text_encoder=True),
                                       meissonic_tiny()) == step
    other = meissonic_tiny(downsample=False, upsample=False)
    with pytest.raises(ConfigError, match="different model config .*downsample True -> False.*; resume with the run's "
                                          "original --arch/--init/--feature-compression or start a new --out$"):
        ckpt.find_resume_checkpoint(run, _cfg(run, resume=str(step), lora_rank=2, train_text_encoder=True), other)
    with pytest.raises(ConfigError, match="trained with --lora-rank 2, this run has 4$"):
        ckpt.find_resume_checkpoint(run, _cfg(run, resume="auto", lora_rank=4, train_text_encoder=True), meissonic_tiny())
    with pytest.raises(ConfigError, match="trained with --train-text-encoder True, this run has False$"):
        ckpt.find_resume_checkpoint(run, _cfg(run, resume="auto", lora_rank=2), meissonic_tiny())


def test_an_unusable_random_state_names_the_file_and_the_problem():
    g = torch.Generator().manual_seed(0)
    state = ckpt.rng_state(g)
    del state["python"]
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with pytest.raises(InputError) as err:
        ckpt.restore_rng_state(state, g, "ck/rng/rank-00000.safetensors")
    assert str(err.value) == ("ck/rng/rank-00000.safetensors: not a usable random-number state ('python'); "
                              "the checkpoint is damaged")
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_data_cursors_that_do_not_match_their_world_size_are_refused(tmp_path):
    from meissonic_cli.atomic import write_json

    write_json(tmp_path / ckpt.DATA_CURSOR, {"world_size": 2, "ranks": [CURSOR, CURSOR]})
    assert ckpt.read_data_cursors(tmp_path)["ranks"][1] == CURSOR
    write_json(tmp_path / ckpt.DATA_CURSOR, {"world_size": 2, "ranks": [CURSOR]})
    with pytest.raises(InputError) as err:
        ckpt.read_data_cursors(tmp_path)
    assert str(err.value) == f"{tmp_path / ckpt.DATA_CURSOR}: not a data cursor file (ranks do not match world_size)"


# ---------------------------------------------------------------------------------------------
# End to end


def test_lora_run_with_ema_resumes_to_the_uninterrupted_runs_adapters(tmp_path):
    from test_train import cfg_for, crash_after_first_checkpoint, make_model_folder, make_token_dataset

    from meissonic_cli.model.lora import read_lora_file
    from meissonic_cli.train.trainer import train

    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=6)
    common = dict(model="", init=str(make_model_folder(tmp_path / "base")), lora_rank=2, ema_decay=0.5, lr=1e-2,
                  max_steps=3, checkpoint_every=2, batch_size=2)
    full = train(cfg_for(tmp_path, data, output=str(tmp_path / "a"), **common))
    crash_after_first_checkpoint(cfg_for(tmp_path, data, output=str(tmp_path / "b"), **common))
    resumed = train(cfg_for(tmp_path, data, output=str(tmp_path / "b"), resume="auto", **common))
    assert resumed.start_step == 2 and resumed.losses[3] == full.losses[3]
    # Without --save-merged the checkpoints hold the adapters alone (no transformer/), and resume from them.
    assert not (tmp_path / "b" / "step-00000002" / "transformer").exists()
    saved = {(run, name): read_lora_file(tmp_path / run / "step-00000003" / name)
             for run in "ab" for name in ("lora", "lora_ema")}
    assert _same(saved["a", "lora"], saved["b", "lora"])
    assert _same(saved["a", "lora_ema"], saved["b", "lora_ema"])
    assert not _same(saved["a", "lora"], saved["a", "lora_ema"])  # the EMA adapters are their own state
