"""Training checkpoints: `step-NNNNNNNN/` directories written atomically, found, pruned and read.

A checkpoint directory holds
- `transformer/`        the trained weights in the released layout (config.json + safetensors),
                        loadable by `meissonic sample`; LoRA runs store the merged weights here
- `transformer_ema/`    the EMA weights, same layout (only with --ema-decay)
- `text_encoder/`       the text encoder (only with --train-text-encoder)
- `lora/adapters.safetensors` the LoRA adapters alone (only with --lora-rank)
- `trainer_state.pt`    optimizer, LR scheduler, loss scaler, step and NaN-guard counters
- `rng/rank-NNNNN.pt`   python, numpy, torch (CPU and CUDA) and trainer generator states per rank
- `data_cursor.json`    per rank: epoch, position in that epoch's shard order, shard name and
                        offset of the next sample in it
- `train_config.yaml`   the resolved TrainConfig of the run that wrote it
- `vqvae/`, `tokenizer/`, `scheduler/`, `model_index.json` (and `text_encoder/` when it is not
                        trained): hard links to the base model's files, so the directory is a whole
                        released-layout model for `meissonic sample --model`

It is first written under a hidden temporary name next to its final place and renamed when
complete, so a crash never leaves a half-written `step-*` directory and readers ignore temporaries.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from meissonic_cli.errors import InputError

_NAME = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.pt"
DATA_CURSOR = "data_cursor.json"
CONFIG_FILE = "train_config.yaml"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def check_checkpoint_dir(path: str | Path) -> Path:
    """`path` if it is a complete checkpoint directory; otherwise an InputError saying what exists."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        near = [p.name for _, p in list_checkpoints(path.parent)] if path.parent.is_dir() else []
        hint = f"; checkpoints in {path.parent}: {', '.join(near)}" if near else ""
        raise InputError(f"{path} is not a training checkpoint (no {TRAINER_STATE}){hint}")
    return path


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` when the block succeeds.

    An existing `final` (a NaN-guard reload re-reaching the same step) is replaced only after the
    new one is complete.
    """
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all); returns what was deleted."""
    if keep_last <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(run_dir)[:-keep_last]]
    for path in doomed:
        # Rename first so a crash mid-delete never leaves something that looks like a checkpoint.
        trash = path.with_name(f".del-{path.name}-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Remove leftovers of checkpoints whose writing was interrupted."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.is_dir() and re.match(r"^\.(tmp|old|del)-step-\d{8}-\d+$", path.name):
                shutil.rmtree(path, ignore_errors=True)


def rng_state(generator: Any) -> dict[str, Any]:
    """Every random state a training rank draws from: python, numpy, torch CPU/CUDA and the trainer's generator."""
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "trainer": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: Any) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["trainer"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
