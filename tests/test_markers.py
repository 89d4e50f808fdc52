"""Completion markers are claims (issue 20, class 3): a rerun checks what a marker describes before it
skips the work, and redoes what fails. One fault test per output kind: the payload is truncated or
corrupted after its marker was written, then the same command runs again.

Also: `train` never saves a non-finite model; it stops naming the last good checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bad_input import edit_args, image_shards
from typer.testing import CliRunner

from meissonic_cli.cli import app


def _ok(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    return result


def _pixels(data: bytes) -> bytes:
    """The decoded pixels of a PNG (its text chunk records the run's timing, so bytes differ per run)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes()


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i: i + 16] = bytes(b ^ 0xFF for b in data[i: i + 16])
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------
# Token shards


def _tokenize_args(ws: Path, model: Path) -> list[str]:
    return ["tokenize", str(image_shards(ws / "sh", keys=tuple(f"{i:09d}" for i in range(4)))), "-o", str(ws / "tok"),
            "--model", str(model), "--resolution", "64", "--device", "cpu"]


@pytest.mark.parametrize("damage", ["truncate", "cut-members"])
def test_damaged_token_shard_is_redone(damage: str, tmp_path: Path, tiny_model_dir: Path, one_thread) -> None:
    from meissonic_cli.data.shards import read_token_shard

    args = _tokenize_args(tmp_path, tiny_model_dir)
    _ok(args)
    shard = tmp_path / "tok" / "tokens-00000.tar"
    good = shard.read_bytes()
    if damage == "truncate":
        _truncate(shard)
    else:  # same size, fewer members: the tar ends early (zero blocks over the later members)
        data = bytearray(good)
        data[1536:] = bytes(len(data) - 1536)
        shard.write_bytes(bytes(data))
    result = _ok(args)
    assert shard.read_bytes() == good, result.output
    assert len(list(read_token_shard(shard))) == 4


# ----------------------------------------------------------------------------------------------
# Samples and edits


def _sample_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "-m", str(model), "-p", "a red circle", "-p", "a blue square", "-o", str(out), "--steps", "1",
            "--resolution", "64", "--device", "cpu", *extra]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-digest"])
def test_damaged_sample_is_redone(damage: str, tmp_path: Path, tiny_model_dir: Path, one_thread) -> None:
    out = tmp_path / "o"
    _ok(_sample_args(tiny_model_dir, out, "--grid"))
    first = sorted(out.glob("0000*.png"))[0]
    good = first.read_bytes()
    sidecar = first.with_suffix(".json")
    if damage == "truncate":
        _truncate(first)
    elif damage == "flip":
        _flip(first)
    else:
        meta = json.loads(sidecar.read_text())
        meta.pop("model_digest")
        sidecar.write_text(json.dumps(meta))
    result = _ok(_sample_args(tiny_model_dir, out, "--grid"))
    assert _pixels(first.read_bytes()) == _pixels(good), result.output  # redone: the same image again
    assert json.loads(sidecar.read_text()).get("model_digest"), "the redone sidecar records the model"
    from meissonic_cli.sample.outputs import done_problem

    assert done_problem(first, sidecar) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-digest"])
def test_damaged_edit_is_redone(damage: str, tmp_path: Path, tiny_model_dir: Path, one_thread) -> None:
    args = edit_args(tiny_model_dir, tmp_path)
    _ok(args)
    done = [p for p in (tmp_path / "edits").glob("*.png")]
    assert len(done) == 1
    good = done[0].read_bytes()
    sidecar = done[0].with_suffix(".json")
    if damage == "truncate":
        _truncate(done[0])
    elif damage == "flip":
        _flip(done[0])
    else:
        meta = json.loads(sidecar.read_text())
        meta.pop("model_digest")
        sidecar.write_text(json.dumps(meta))
    result = _ok(args)
    assert _pixels(done[0].read_bytes()) == _pixels(good), result.output
    assert json.loads(sidecar.read_text()).get("model_digest")
    from meissonic_cli.sample.outputs import done_problem

    assert done_problem(done[0], sidecar) is None


def test_intact_outputs_are_skipped(tmp_path: Path, tiny_model_dir: Path, one_thread) -> None:
    """The verification does not redo good work: an untouched folder is skipped whole."""
    out = tmp_path / "o"
    _ok(_sample_args(tiny_model_dir, out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = _ok(_sample_args(tiny_model_dir, out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps, result.output


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _train_args(ws: Path, *extra: str) -> list[str]:
    from test_train import make_token_dataset

    data = ws / "data"
    if not data.exists():
        make_token_dataset(data, shards=1, per_shard=4)
    return ["train", "--arch", "tiny", "--data", str(data), "--out", str(ws / "run"), "--resolution", "64",
            "--batch-size", "2", "--checkpoint-every", "1", "--cond-dropout", "0", "--log-every", "1", "--device",
            "cpu", "--keep-last", "0", *extra]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_not_resumed(damage: str, tmp_path: Path, one_thread) -> None:
    _ok(_train_args(tmp_path, "--max-steps", "2"))
    weights = next((tmp_path / "run" / "step-00000002" / "transformer").glob("*.safetensors"))
    (_truncate if damage == "truncate" else _flip)(weights)
    result = CliRunner().invoke(app, _train_args(tmp_path, "--max-steps", "3", "--resume", "auto"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "not resuming from it" in text and "step-00000002" in text.split("not resuming from it")[0], text
    from meissonic_cli.train.checkpoint import verify_checkpoint

    # step 2 was redone from step 1, then step 3 written: both hold what their manifests claim
    verify_checkpoint(tmp_path / "run" / "step-00000002")
    verify_checkpoint(tmp_path / "run" / "step-00000003")


def test_damaged_checkpoint_named_by_path_is_refused(tmp_path: Path, one_thread) -> None:
    _ok(_train_args(tmp_path, "--max-steps", "1"))
    ckpt = tmp_path / "run" / "step-00000001"
    _truncate(ckpt / "trainer_state.pt")
    result = CliRunner().invoke(app, _train_args(tmp_path, "--max-steps", "2", "--resume", str(ckpt)))
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "step-00000001" in errors[0] and "internal error" not in errors[0], result.output


def test_train_never_saves_a_non_finite_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    """Weights that turn non-finite with a finite loss (an absurd update) are caught before saving; the
    run stops naming the last good checkpoint."""
    import math

    import torch

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(p for g in self.param_groups for p in g["params"]).fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    result = CliRunner().invoke(app, _train_args(tmp_path, "--max-steps", "3"))
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "step-00000001" in errors[0] and "internal error" not in errors[0], result.output
    from meissonic_cli.train.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]
