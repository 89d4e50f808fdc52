"""Training like the official trainer, and curves that mean something (issues 19 and 21):
EMA warm-up against diffusers' EMAModel, --report-to wandb read back from an offline run,
--optimizer adamw8bit, masked-token accuracy and mask-rate bucket losses, curves.png."""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from test_train import _error_text, _invoke, cfg_for, crash_after_first_checkpoint, make_token_dataset, metrics, state_digest

from meissonic_cli.errors import ConfigError
from meissonic_cli.model.state_io import read_torch_file
from meissonic_cli.model.transformer import load_state_dict_files
from meissonic_cli.train import ema as ema_mod
from meissonic_cli.train import objective
from meissonic_cli.train.checkpoint import TRAINER_STATE, read_saved_config
from meissonic_cli.train.curves import MetricsWindow
from meissonic_cli.train.ema import EMA, ema_decay_at
from meissonic_cli.train.objective import IGNORE_INDEX, MASK_RATE_BUCKETS, masked_token_stats
from meissonic_cli.train.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# EMA warm-up: diffusers' EMAModel is the reference


@pytest.mark.parametrize("update_after_step", [0, 3])
def test_ema_decay_schedule_is_diffusers_get_decay(update_after_step):
    from diffusers.training_utils import EMAModel

    for decay in (0.9999, 0.8):
        ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay, update_after_step=update_after_step)
        for n in range(1, 200):
            assert ema_decay_at(n, decay, warmup=True, update_after_step=update_after_step) == pytest.approx(
                ref.get_decay(n), abs=1e-12), (decay, n)


@pytest.mark.parametrize("decay,update_after_step", [(0.9999, 0), (0.75, 5)])
def test_ema_equals_diffusers_ema_model_after_n_steps(decay, update_after_step):
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(8, 4, generator=g), "b": torch.randn(5, generator=g)}
    ours = EMA(weights, decay, warmup=True, update_after_step=update_after_step)
    params = [torch.nn.Parameter(w.clone()) for w in weights.values()]
    ref = EMAModel(params, decay=decay, update_after_step=update_after_step)
    for _ in range(40):  # the cap min(decay, (1+t)/(10+t)) binds from t = 26 at decay 0.75
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ours.update(dict(zip(weights, params)))
        ref.step(params)
    diff = max(float((s - r).abs().max()) for s, r in zip(ours.shadow.values(), ref.shadow_params))
    assert diff < 1e-6, diff
    assert ours.updates == ref.optimization_step == 40


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> dict:
    """A 3-step from-scratch run at --ema-decay 0.9999 (warm-up on by default), with the weights the
    EMA saw at each update and its initial copy."""
    tmp = tmp_path_factory.mktemp("ema_run")
    data = make_token_dataset(tmp / "data", shards=1, per_shard=8)
    trainer = Trainer(cfg_for(tmp, data, max_steps=3, checkpoint_every=2, log_every=2, ema_decay=0.9999, curves=True))
    initial = {k: v.clone() for k, v in trainer.ema.shadow.items()}
    seen = []
    real_update = trainer.ema.update

    def recording_update(named):
        seen.append({k: named[k].detach().clone() for k in initial})
        real_update(named)

    trainer.ema.update = recording_update
    trainer.fit()
    return {"tmp": tmp, "data": data, "run": tmp / "run", "initial": initial, "seen": seen}


def _transformer_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def test_trainer_ema_is_diffusers_ema_model_over_the_same_weights(ema_run):
    from diffusers.training_utils import EMAModel

    names = list(ema_run["initial"])
    params = [torch.nn.Parameter(ema_run["initial"][k].clone()) for k in names]
    ref = EMAModel(params, decay=0.9999)
    for weights in ema_run["seen"]:
        with torch.no_grad():
            for p, k in zip(params, names):
                p.copy_(weights[k])
        ref.step(params)
    saved = load_state_dict_files(ema_run["run"] / "step-00000003" / "transformer_ema")
    expected = _transformer_keys(dict(zip(names, ref.shadow_params)))
    assert max(float((saved[k] - expected[k]).abs().max()) for k in expected) < 1e-6
    # Warm-up: after 3 updates the average is far from the random init (decay 3/12, not 0.9999).
    init = _transformer_keys(ema_run["initial"])
    last = _transformer_keys(ema_run["seen"][-1])
    k = next(k for k in init if init[k].ndim == 2)
    assert float((saved[k] - init[k]).norm()) > 0.5 * float((last[k] - init[k]).norm())
    state = read_torch_file(ema_run["run"] / "step-00000003" / TRAINER_STATE)
    assert state["ema_schedule"] == {"updates": 3, "warmup": True, "update_after_step": 0}


def test_a_checkpoint_from_before_warm_up_resumes_with_constant_decay(ema_run, tmp_path):
    run = shutil.copytree(ema_run["run"], tmp_path / "run")
    for step in ("step-00000002", "step-00000003"):  # as written before warm-up existed
        state = read_torch_file(run / step / TRAINER_STATE)
        del state["ema_schedule"]
        torch.save(state, run / step / TRAINER_STATE)
        (run / step / "checkpoint.json").unlink()  # nor had checkpoints a manifest then
    trainer = Trainer(cfg_for(tmp_path, ema_run["data"], max_steps=4, checkpoint_every=2, log_every=2, ema_decay=0.9999,
                              resume="auto"))
    seen = []
    real_update = trainer.ema.update
    trainer.ema.update = lambda named: (seen.append({k: named[k].detach().clone() for k in named}), real_update(named))
    trainer.fit()
    before = load_state_dict_files(run / "step-00000003" / "transformer_ema")
    after = load_state_dict_files(run / "step-00000004" / "transformer_ema")
    w4 = _transformer_keys(seen[0])
    assert max(float((after[k] - (0.9999 * before[k] + 0.0001 * w4[k])).abs().max()) for k in before) < 1e-6
    assert "(written before EMA warm-up existed): warm-up off" in (run / "train.log").read_text()
    assert read_saved_config(run / "step-00000004")["ema_warmup"] is False
    assert (run / "curves.png").stat().st_mtime == (ema_run["run"] / "curves.png").stat().st_mtime  # --no-curves: not redrawn


# ---------------------------------------------------------------------------------------------
# Masked-token accuracy, mask-rate buckets, curves.png


def test_masked_token_stats_against_a_direct_count(monkeypatch):
    g = torch.Generator().manual_seed(1)
    b, k, h, w = 6, 7, 2, 4  # 8 positions: mask rates 1/8 .. 8/8 hit every bucket and its edges
    logits = torch.randn(b, k, h, w, generator=g)
    codes = torch.randint(0, k, (b, h, w), generator=g)
    counts = [1, 2, 3, 4, 6, 8]  # rates .125 .25 .375 .5 .75 1.0
    labels = torch.full((b, h * w), IGNORE_INDEX)
    for i, n in enumerate(counts):
        pos = torch.randperm(h * w, generator=g)[:n]
        labels[i, pos] = codes.reshape(b, -1)[i, pos]
    labels = labels.reshape(b, h, w)
    got = masked_token_stats(logits, labels).tolist()

    # The same numbers, one token at a time.
    n_tok = top1 = top5 = 0
    bucket_loss, bucket_n = [0.0] * 4, [0] * 4
    for i in range(b):
        losses = []
        for y in range(h):
            for x in range(w):
                t = int(labels[i, y, x])
                if t == IGNORE_INDEX:
                    continue
                scores = logits[i, :, y, x].tolist()
                n_tok += 1
                order = sorted(range(k), key=lambda c: -scores[c])
                top1 += order[0] == t
                top5 += t in order[:5]
                losses.append(math.log(sum(math.exp(s) for s in scores)) - scores[t])
        rate = counts[i] / (h * w)
        bucket = 0 if rate < 0.25 else 1 if rate < 0.5 else 2 if rate < 0.75 else 3
        bucket_loss[bucket] += sum(losses) / len(losses)
        bucket_n[bucket] += 1
    expected = [n_tok, top1, top5] + [v for pair in zip(bucket_loss, bucket_n) for v in pair]
    assert bucket_n == [1, 2, 1, 2]
    assert got == pytest.approx(expected, rel=1e-6)  # float32 cross-entropy against float64
    monkeypatch.setattr(objective, "STATS_CHUNK", 5)  # a few tokens per float32 block: the same sums
    assert masked_token_stats(logits, labels).tolist() == pytest.approx(got, rel=1e-12)


def test_metrics_window_means_over_its_steps():
    window = MetricsWindow()
    a = [10, 4, 8, 1.0, 1, 0, 0, 6.0, 2, 3.0, 1]
    bad = [5, 5, 5, float("nan"), 4, 0, 0, 0, 0, 0, 0]
    c = [30, 6, 9, 0, 0, 2.0, 2, 0, 0, 5.0, 1]
    row1, summary1 = window.step(2.0, a, bad=False, close=False)
    assert summary1 == {} and row1 == {"acc_top1": 0.4, "acc_top5": 0.8}
    window.step(float("nan"), bad, bad=True, close=False)  # a skipped step leaves the window alone
    row3, summary = window.step(4.0, c, bad=False, close=True)
    assert summary["loss"] == 3.0 and summary["acc_top1"] == 10 / 40 and summary["acc_top5"] == 17 / 40
    assert [summary[f"loss_mask_{n}"] for n in MASK_RATE_BUCKETS] == [1.0, 1.0, 3.0, 4.0]
    assert [summary[f"n_mask_{n}"] for n in MASK_RATE_BUCKETS] == [1, 2, 2, 2]
    assert row3["n_mask_75_100"] == 2 and "loss" not in row3
    assert window.pop()["n_mask_00_25"] == 0  # a new window


def test_metrics_jsonl_and_curves_png_of_a_tiny_run(ema_run):
    from PIL import Image

    rows = metrics(ema_run["run"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["acc_top1"] <= r["acc_top5"] <= 1 for r in rows)
    # --log-every 2: steps 2 (window 1-2) and 3 (the last step) carry the buckets; batch 4 per step.
    assert [sum(r.get(f"n_mask_{n}", 0) for n in MASK_RATE_BUCKETS) for r in rows] == [0, 8, 4]
    for r in rows[1:]:
        for n in MASK_RATE_BUCKETS:
            assert (r[f"loss_mask_{n}"] is None) == (r[f"n_mask_{n}"] == 0)
    with Image.open(ema_run["run"] / "curves.png") as im:
        im.load()
        low, high = im.convert("L").getextrema()
        assert im.size == (1200, 800) and high - low > 100  # drawn, not blank


# ---------------------------------------------------------------------------------------------
# --report-to wandb, read back from the offline run


def wandb_records(path: Path):
    """Records of a wandb `.wandb` file: LevelDB log framing (google/leveldb doc/log_format.md: 32 KiB
    blocks, 7-byte chunk headers crc32/length/type) after a 7-byte ':W&B' header; each record is a
    `wandb.proto.wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sH", data[:6]) == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer / padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_folder: Path) -> list[dict]:
    rows = []
    for rec in wandb_records(next(run_folder.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def test_wandb_offline_run_is_written_and_resumed_under_the_same_id(tmp_path, monkeypatch, request, tiny_model_dir):
    from PIL import Image

    for var, sub in (("WANDB_DIR", "wb"), ("WANDB_CONFIG_DIR", "wbconfig"), ("WANDB_CACHE_DIR", "wbcache"),
                     ("WANDB_DATA_DIR", "wbdata")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # wandb reads WANDB_* once per process: start from these, and leave none behind
    request.addfinalizer(wandb.teardown)
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=8)
    common = dict(report_to="wandb", log_every=1, checkpoint_every=2, base_model=str(tiny_model_dir), validate_every=2,
                  validation_prompts=["a red circle"], validation_steps=2)
    train(cfg_for(tmp_path, data, max_steps=2, **common))
    wandb.teardown()  # the run is finished; this also waits until wandb's service has written all of it
    run_id = read_torch_file(tmp_path / "run" / "step-00000002" / TRAINER_STATE)["wandb_run_id"]
    assert len(run_id) == 8
    [folder] = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}")
    history = wandb_history(folder)
    scalars = {r["train/step"]: r for r in history if "train/loss" in r}
    assert sorted(scalars) == [1, 2]
    for row in metrics(tmp_path / "run"):  # --log-every 1: each wandb point is that step's metrics.jsonl row
        assert scalars[row["step"]]["train/loss"] == pytest.approx(row["loss"], rel=1e-12)
        assert scalars[row["step"]]["train/acc_top1"] == pytest.approx(row["acc_top1"], rel=1e-12)
        assert scalars[row["step"]]["train/lr"] == pytest.approx(row["lr"], rel=1e-12)
    [image] = [r for r in history if r.get("validation/samples/_type") == "image-file"]
    assert image["train/step"] == 2 and image["validation/samples/caption"] == "a red circle"
    with Image.open(folder / "files" / image["validation/samples/path"]) as im:
        assert im.size == Image.open(tmp_path / "run" / "samples" / "step-00000002.png").size

    # Resumed without WANDB_DIR: the same wandb run id, its files inside --out.
    monkeypatch.delenv("WANDB_DIR")
    train(cfg_for(tmp_path, data, max_steps=3, resume="auto", **{**common, "validate_every": 0}))
    wandb.teardown()
    [folder] = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    assert [r["train/step"] for r in wandb_history(folder) if "train/loss" in r] == [3]
    assert read_torch_file(tmp_path / "run" / "step-00000003" / TRAINER_STATE)["wandb_run_id"] == run_id


def test_a_wandb_run_that_cannot_start_is_one_error_line_and_leaves_no_metrics(tmp_path, monkeypatch):
    import wandb

    def no_login(**kwargs):  # what wandb.init does online without an API key and no terminal to ask on
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", no_login)
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=4)
    result = _invoke("--data", str(data), "--out", str(tmp_path / "run"), "--arch", "tiny", "--resolution", "64",
                     "--device", "cpu", "--cond-dropout", "0", "--report-to", "wandb", "--max-steps", "2")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: --report-to wandb could not start a run") and "WANDB_MODE=offline" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# --optimizer adamw8bit (bitsandbytes runs its 8-bit AdamW on the CPU too)


@pytest.mark.slow
def test_adamw8bit_trains_on_cpu_with_8bit_state_and_resumes_bit_exactly(tmp_path):
    data = make_token_dataset(tmp_path / "data", shards=1, per_shard=8)
    common = dict(max_steps=4, checkpoint_every=2, optimizer="adamw8bit")
    full = train(cfg_for(tmp_path, data, output=str(tmp_path / "a"), **common))
    crash_after_first_checkpoint(cfg_for(tmp_path, data, output=str(tmp_path / "b"), **common))
    resumed = train(cfg_for(tmp_path, data, output=str(tmp_path / "b"), resume="auto", **common))
    assert {s: resumed.losses[s] for s in (3, 4)} == {s: full.losses[s] for s in (3, 4)}
    a = load_state_dict_files(tmp_path / "a" / "step-00000004" / "transformer")
    b = load_state_dict_files(tmp_path / "b" / "step-00000004" / "transformer")
    assert state_digest(a) == state_digest(b)
    state = read_torch_file(tmp_path / "a" / "step-00000004" / TRAINER_STATE)["optimizer"]["state"]
    quantized = [k for k, v in state.items() if any(t.dtype == torch.uint8 for t in v.get("__bnb_optimizer_quant_state__", {}).values())]
    assert "transformer.transformer_blocks.0.ff.net.0.proj.weight" in quantized  # 4096+ elements: 8-bit moments


# ---------------------------------------------------------------------------------------------
# Flags


def test_new_flags_resolve_and_bad_combinations_fail_with_one_line(tmp_path, monkeypatch):
    import yaml

    result = _invoke("--data", "d", "--out", "o", "--arch", "tiny", "--no-ema-warmup", "--ema-update-after-step", "5",
                     "--report-to", "wandb", "--optimizer", "adamw8bit", "--print-config")
    assert result.exit_code == 0, _error_text(result)
    shown = yaml.safe_load(result.output)
    assert (shown["ema_warmup"], shown["ema_update_after_step"], shown["report_to"], shown["optimizer"]) == (
        False, 5, "wandb", "adamw8bit")
    assert yaml.safe_load(_invoke("--data", "d", "--out", "o", "--arch", "tiny", "--print-config").output)["ema_warmup"] is True
    for args, expect in ((["--tensorboard", "--report-to", "wandb"], "--tensorboard (deprecated) means --report-to tensorboard"),
                         (["--optimizer", "sgd"], "--optimizer must be one of adamw, adamw8bit"),
                         (["--report-to", "mlflow"], "--report-to must be one of none, tensorboard, wandb")):
        result = _invoke("--data", "d", "--out", str(tmp_path / "o"), "--arch", "tiny", *args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and expect in lines[0], result.output
    # Without bitsandbytes installed: one clear line naming the extra.
    import importlib.util

    from meissonic_cli.train import optim

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'meissonic\[train\]'"):
        optim.adamw_8bit_class()
    assert ema_mod.ema_decay_at(1, 0.9, warmup=False) == 0.9  # off: the full decay from the first update
