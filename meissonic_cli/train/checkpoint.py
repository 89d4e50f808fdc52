"""Training checkpoints: `step-NNNNNNNN/` directories written atomically, found, pruned and read.

A checkpoint directory holds
- `transformer/`        the trained weights in the released layout (config.json + safetensors),
                        loadable by `meissonic sample`; LoRA runs store the merged weights here only
                        with --save-merged
- `transformer_ema/`    the EMA weights, same layout (only with --ema-decay; LoRA runs: with --save-merged)
- `text_encoder/`       the text encoder (only with --train-text-encoder)
- `lora/`, `lora_ema/`  LoRA runs: the adapter (and its EMA) alone, as PEFT (`adapter_model.safetensors` +
                        `adapter_config.json`, whose base_model_name_or_path is the base model) and
                        diffusers (`pytorch_lora_weights.safetensors`) read it, plus the transformer
                        config it fits (`transformer_config.json`); `meissonic sample --model BASE --lora
                        step-N/lora` samples it
- `trainer_state.pt`    optimizer, LR scheduler, loss scaler, step, the EMA's schedule (update count,
                        warm-up) and the wandb run id (tensors and plain values only: read with
                        torch's weights-only loader, never unpickled)
- `rng/rank-NNNNN.safetensors` python, numpy, torch (CPU and CUDA) and trainer generator states per
                        rank: the state vectors as tensors, the scalars as JSON in the metadata.
                        No pickle: an older checkpoint's `rng/rank-NNNNN.pt` is refused, not loaded
- `data_cursor.json`    per rank: epoch, position in that epoch's shard order, shard name and
                        offset of the next sample in it
- `train_config.yaml`   the resolved TrainConfig of the run that wrote it
- `checkpoint.json`     written last: size and sha256 of every file above, which `verify_checkpoint`
                        checks before a run resumes from it (a damaged checkpoint is never resumed)
- `vqvae/`, `tokenizer/`, `scheduler/`, `model_index.json` (and `text_encoder/` when it is not
                        trained): hard links to the base model's files, so the directory is a whole
                        released-layout model for `meissonic sample --model`

It is first written under a hidden temporary name next to its final place and renamed when
complete (`atomic.atomic_directory`), so a crash never leaves a half-written `step-*` directory and
readers ignore temporaries. `write_checkpoint` writes one; `read_*` read its parts back, and
the trainer applies them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meissonic_cli.atomic import atomic_directory, write_json
from meissonic_cli.errors import InputError, ModelFormatError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from meissonic_cli.model.lora import LoRA
    from meissonic_cli.model.transformer import MeissonicTransformer, TransformerConfig

_NAME = re.compile(r"^step-(\d{8})$")
LORA_DIR, LORA_EMA_DIR = "lora", "lora_ema"
LORA_MODEL_CONFIG = "transformer_config.json"  # in lora/: the transformer config the adapter was trained on
TRAINER_STATE = "trainer_state.pt"
TRAINER_FORMAT = 1  # the "format" of trainer_state.pt this version writes and reads
DATA_CURSOR = "data_cursor.json"
CONFIG_FILE = "train_config.yaml"
MANIFEST = "checkpoint.json"
RNG_DIR = "rng"
RNG_FORMAT = "meissonic-rng"
# What a checkpoint borrows from the base model to be a whole released-layout folder.
BASE_MODEL_PARTS = ("model_index.json", "vqvae", "tokenizer", "scheduler", "text_encoder")


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
            # Only rank 0 of one run writes here, so any leftover is stale (the last pattern is
            # what `atomic_directory` names its temporaries).
            if path.is_dir() and (re.match(r"^\.(tmp|old|del)-step-\d{8}-\d+$", path.name)
                                  or re.match(r"^\.step-\d{8}\.(tmp|old)-\d+(-\d+)?$", path.name)):
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


def restore_rng_state(state: dict[str, Any], generator: Any, source: str = "random-number state") -> None:
    import numpy as np
    import torch

    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        generator.set_state(state["trainer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"{source}: not a usable random-number state ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                         "the checkpoint is damaged") from None
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / RNG_DIR / f"rank-{rank:05d}.safetensors"


def write_rng_state(path: Path, state: dict[str, Any]) -> None:
    """One rank's `rng_state` as safetensors: state vectors as tensors, the few scalars as JSON metadata."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    py_version, py_internal, py_gauss = state["python"]
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    tensors = {
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch": state["torch"].contiguous(),
        "trainer": state["trainer"].contiguous(),
    }
    cuda = list(state.get("cuda", []))
    for i, t in enumerate(cuda):
        tensors[f"cuda.{i}"] = t.contiguous()
    meta = {
        "format": RNG_FORMAT,
        "version": "1",
        "python": json.dumps({"version": py_version, "gauss_next": py_gauss}),
        "numpy": json.dumps({"kind": np_kind, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                             "cached_gaussian": float(np_cached)}),
        "cuda_devices": str(len(cuda)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_rng_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    """Rank `rank`'s saved random state, or None when the checkpoint has none for it.

    Never unpickles: an older checkpoint's pickled `rng/rank-NNNNN.pt` is refused with an error that
    says how to go on, because loading a crafted pickle runs its code.
    """
    from meissonic_cli.model.state_io import read_safetensors

    file = rng_file(checkpoint, rank)
    if not file.is_file():
        legacy = file.with_suffix(".pt")
        if legacy.exists():
            raise InputError(
                f"{legacy} holds random-number state in the old pickle format, which meissonic no longer loads (a crafted "
                f"pickle runs code when loaded). Resume from a checkpoint written by this version, or, if you wrote this one "
                f"yourself, delete {legacy.parent} to resume with fresh random streams (the run then differs from an "
                "uninterrupted one)"
            )
        return None
    tensors, meta = read_safetensors(file, with_metadata=True)
    if meta.get("format") != RNG_FORMAT:
        raise InputError(f"{file}: not a meissonic random-number state (no format={RNG_FORMAT} metadata)")
    try:
        py, npy = json.loads(meta["python"]), json.loads(meta["numpy"])
        cuda = [tensors[f"cuda.{i}"] for i in range(int(meta.get("cuda_devices", "0")))]
        gauss = py["gauss_next"]
        state: dict[str, Any] = {
            "python": (int(py["version"]), tuple(int(v) for v in tensors["python"].tolist()),
                       None if gauss is None else float(gauss)),
            "numpy": (str(npy["kind"]), tensors["numpy"].numpy().astype("uint32"), int(npy["pos"]),
                      int(npy["has_gauss"]), float(npy["cached_gaussian"])),
            "torch": tensors["torch"],
            "trainer": tensors["trainer"],
        }
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{file}: damaged random-number state ({type(err).__name__}: {err})") from None
    if cuda:
        state["cuda"] = cuda
    return state


# ----------------------------------------------------------------------------------------------
# Writing and reading a whole checkpoint


def transformer_state(module_state: dict[str, torch.Tensor], lora: LoRA | None) -> dict[str, torch.Tensor]:
    """The transformer's released-layout state out of a MaskedImageModel state (LoRA merged in)."""
    from meissonic_cli.model.lora import merge_adapters

    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in module_state.items() if k.startswith(prefix)}
    if lora is not None:
        state = merge_adapters(state, lora.named_adapters(module_state), lora.scale)
    return state


def fresh_transformer(config: TransformerConfig, module_state: dict[str, torch.Tensor], lora: LoRA | None) -> MeissonicTransformer:
    """A new transformer holding the weights of `module_state` (so training modules and hooks stay untouched)."""
    from meissonic_cli.model.transformer import build_on_meta

    model = build_on_meta(config)
    model.load_state_dict(transformer_state(module_state, lora), strict=True, assign=True)
    return model


def fresh_text_encoder(like: nn.Module, module_state: dict[str, torch.Tensor]) -> nn.Module:
    """A new text encoder configured like `like`, holding the `text_encoder.` weights of `module_state`."""
    from meissonic_cli.model.text_encoder import TextEncoder

    prefix = "text_encoder."
    state = {k[len(prefix):]: v for k, v in module_state.items() if k.startswith(prefix)}
    encoder = TextEncoder(like.config, like.tokenizer)
    encoder.load_state_dict(state, strict=True)
    return encoder


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    # Hard links cost no space; across file systems fall back to a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def complete_model_folder(folder: Path, base_root: Path | None) -> None:
    """Add the base model's untrained parts so `folder` is a whole released-layout model."""
    if base_root is None:
        return
    for part in BASE_MODEL_PARTS:
        src, dst = base_root / part, folder / part
        if dst.exists() or not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def write_checkpoint(final: Path, *, step: int, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                     ema_state: dict[str, torch.Tensor] | None, scheduler_state: dict[str, Any],
                     scaler_state: dict[str, Any] | None, rngs: list[dict[str, Any]], cursors: list[dict[str, Any]],
                     config_yaml: str, model_config: TransformerConfig, lora: LoRA | None,
                     text_encoder: nn.Module | None, base_root: Path | None, merged: bool = True,
                     extra_state: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint directory `final` atomically (rank 0 only; the states are already gathered).

    `text_encoder` is given when it is trained (its weights are in `model_state`); `rngs` and
    `cursors` hold one entry per rank; `extra_state` (plain values) joins trainer_state.pt. `merged=False`
    (LoRA runs without --save-merged) leaves out transformer/ and transformer_ema/: the adapters in lora/
    and lora_ema/ are the trained state.
    """
    import torch

    check_finite_state(final, {**model_state, **(ema_state or {})})
    with atomic_directory(final) as tmp:
        if merged or lora is None:
            fresh_transformer(model_config, model_state, lora).save_pretrained(tmp / "transformer")
            if ema_state is not None:
                fresh_transformer(model_config, {**model_state, **ema_state}, lora).save_pretrained(tmp / "transformer_ema")
        if lora is not None:
            write_lora_dirs(tmp, lora, model_state, ema_state, model_config, base_root)
        if text_encoder is not None:
            fresh_text_encoder(text_encoder, model_state).save_pretrained(tmp / "text_encoder")
        torch.save({**(extra_state or {}), "format": TRAINER_FORMAT, "step": step, "optimizer": optim_state,
                    "scheduler": scheduler_state, "scaler": scaler_state, "world_size": len(rngs)}, tmp / TRAINER_STATE)
        for rank, state in enumerate(rngs):
            write_rng_state(rng_file(tmp, rank), state)
        write_json(tmp / DATA_CURSOR, {"world_size": len(cursors), "ranks": cursors})
        (tmp / CONFIG_FILE).write_text(config_yaml)
        write_json(tmp / MANIFEST, {"step": step, "files": _file_digests(tmp)})
        complete_model_folder(tmp, base_root)
    return final


def write_lora_dirs(folder: Path, lora: LoRA, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None, model_config: TransformerConfig,
                    base_root: Path | None) -> None:
    """lora/ (and lora_ema/) in the PEFT + diffusers layouts, each with the transformer config it fits."""
    from meissonic_cli.model.lora import save_lora
    from meissonic_cli.model.transformer import build_on_meta

    model = build_on_meta(model_config)  # names only: lets adapter_config.json use short target_modules
    base = str(Path(base_root).resolve()) if base_root is not None else None
    for name, state in ((LORA_DIR, model_state), (LORA_EMA_DIR, ema_state)):
        if state is not None:
            save_lora(folder / name, lora, lora.named_adapters(state), model=model, base_model=base)
            write_json(folder / name / LORA_MODEL_CONFIG, model_config.to_json_dict())


class NonFiniteModelError(ModelFormatError):
    """The weights to be saved hold NaN or infinity: nothing is written."""


def check_finite_state(final: Path, state: dict[str, Any]) -> None:
    """Refuse to save weights that hold NaN or infinity, naming the last good checkpoint beside `final`."""
    import torch

    bad = [name for name, t in state.items() if torch.is_tensor(t) and t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        good = [p for _, p in list_checkpoints(final.parent)]
        last = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved before"
        raise NonFiniteModelError(
            f"the weights became non-finite (NaN/inf in {len(bad)} tensors, e.g. {bad[0]}) before {final.name} was "
            f"written; nothing was saved and {last}. Lower --lr or check the data, then rerun (--resume auto)")


def _sha256(path: Path) -> list[Any]:
    """[size, sha256 hex] of the file at `path`."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return [path.stat().st_size, h.hexdigest()]


def _file_digests(folder: Path) -> dict[str, list[Any]]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def verify_checkpoint(path: Path) -> Path:
    """`path` when every file its `checkpoint.json` lists has the recorded size and sha256 (a checkpoint
    older than the manifest is taken as it is); else `ModelFormatError` naming the damaged file."""
    from meissonic_cli.readers import read_json_object

    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return path
    files = read_json_object(manifest, "checkpoint manifest", {"files": dict}, required=("files",),
                             error=ModelFormatError)["files"]
    root = path.resolve()
    for name, recorded in files.items():
        file = path / name
        if not (file.is_file() and file.resolve().is_relative_to(root)):
            raise ModelFormatError(f"checkpoint {path}: {name} is missing (damaged after it was written)")
        if _sha256(file) != list(recorded):
            raise ModelFormatError(f"checkpoint {path}: {name} does not match its recorded size and sha256 (damaged "
                                   "after it was written)")
    return path


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """Optimizer, scheduler, scaler state and step, through the weights-only loader (never unpickled)."""
    from meissonic_cli.model.state_io import read_torch_file

    path = Path(checkpoint) / TRAINER_STATE
    state = read_torch_file(path)
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler"} <= set(state):
        raise ModelFormatError(f"{path}: not a meissonic trainer state (needs step, optimizer and scheduler)")
    if state.get("format", TRAINER_FORMAT) != TRAINER_FORMAT:
        raise ModelFormatError(f"{path}: trainer state format {state['format']!r}, but this meissonic reads format "
                               f"{TRAINER_FORMAT}; resume with the meissonic version that wrote it or start a new --out")
    return state


def _lora_source(checkpoint: Path, folder: str, legacy: str) -> Path:
    """The adapter folder, or the single meissonic-lora file (`lora/<legacy>.safetensors`) of older checkpoints."""
    old = checkpoint / LORA_DIR / f"{legacy}.safetensors"
    return old if old.is_file() else checkpoint / folder


def read_module_state(checkpoint: Path, *, lora: LoRA | None, text_encoder: bool) -> dict[str, torch.Tensor]:
    """The trained weights keyed as in a MaskedImageModel state: the LoRA adapters, or the transformer, plus the text encoder."""
    from meissonic_cli.model.lora import read_lora_file
    from meissonic_cli.model.transformer import load_state_dict_files

    checkpoint = Path(checkpoint)
    if lora is not None:
        state = lora.module_keys(read_lora_file(_lora_source(checkpoint, LORA_DIR, "adapters")), prefix="lora.")
    else:
        state = {f"transformer.{k}": v for k, v in load_state_dict_files(checkpoint / "transformer").items()}
    if text_encoder:
        from meissonic_cli.model.text_encoder import TextEncoder

        te = TextEncoder.from_pretrained(checkpoint / "text_encoder")
        state.update({f"text_encoder.{k}": v for k, v in te.state_dict().items()})
    return state


def read_ema_state(checkpoint: Path, *, lora: LoRA | None) -> dict[str, torch.Tensor]:
    """The EMA weights keyed as in a MaskedImageModel state."""
    from meissonic_cli.model.lora import read_lora_file
    from meissonic_cli.model.transformer import load_state_dict_files

    checkpoint = Path(checkpoint)
    if lora is not None:
        return lora.module_keys(read_lora_file(_lora_source(checkpoint, LORA_EMA_DIR, "adapters_ema")), prefix="lora.")
    return {f"transformer.{k}": v for k, v in load_state_dict_files(checkpoint / "transformer_ema").items()}


def read_data_cursors(checkpoint: Path) -> dict[str, Any]:
    """`data_cursor.json`: the world size that wrote it and one cursor per rank."""
    path = Path(checkpoint) / DATA_CURSOR
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ranks = data["ranks"]
        if not isinstance(ranks, list) or len(ranks) != int(data["world_size"]) or not all(
                isinstance(r, dict) and {"epoch", "position", "offset"} <= set(r) for r in ranks):
            raise ValueError("ranks do not match world_size")
    except FileNotFoundError:
        raise InputError(f"{path} is missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a data cursor file ({err})") from None
    return data


def read_saved_config(checkpoint: Path) -> dict[str, Any]:
    """The `train_config.yaml` of the run that wrote `checkpoint` (empty if absent)."""
    from meissonic_cli.readers import read_yaml_mapping

    file = Path(checkpoint) / CONFIG_FILE
    return read_yaml_mapping(file, "checkpoint run config", error=ModelFormatError) if file.is_file() else {}


def find_resume_checkpoint(output: Path, cfg: Any, model_config: TransformerConfig) -> Path | None:
    """The checkpoint a run continues from (--resume auto|DIR), checked against this run's settings.

    Without --resume an existing run in `output` is refused rather than overwritten.
    """
    import dataclasses

    from meissonic_cli.errors import ConfigError, OutputExistsError
    from meissonic_cli.model.transformer import CONFIG_NAME, TransformerConfig

    output = Path(output)
    existing = list_checkpoints(output)
    if not cfg.resume:
        if existing:
            raise OutputExistsError(
                f"{output} already holds checkpoints (newest {existing[-1][1].name}); pass --resume auto to continue "
                "that run or choose a new --out"
            )
        if output.is_dir() and (output / "metrics.jsonl").exists():
            raise OutputExistsError(f"{output} holds another run's metrics; pass --resume auto or choose a new --out")
        return None
    if cfg.resume == "auto":
        path, damaged = None, []
        for _, candidate in reversed(existing):  # the newest checkpoint that holds what its manifest claims
            try:
                path = verify_checkpoint(candidate)
                break
            except ModelFormatError as err:
                damaged.append(str(err))
        if path is None and damaged:
            raise ModelFormatError(f"no intact checkpoint to resume from ({damaged[0]}); start a new --out")
        for damage in damaged:
            import sys

            print(f"Warning: {damage}; not resuming from it, but from {path.name}", file=sys.stderr)
    else:
        path = verify_checkpoint(check_checkpoint_dir(cfg.resume))
    if path is None:
        return None
    config_file = path / "transformer" / CONFIG_NAME
    if not config_file.is_file() and (path / LORA_DIR / LORA_MODEL_CONFIG).is_file():
        config_file = path / LORA_DIR / LORA_MODEL_CONFIG  # a LoRA checkpoint without --save-merged
    saved = TransformerConfig.from_json(config_file)
    if saved != model_config:
        diff = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(model_config, f.name)!r}"
                for f in dataclasses.fields(TransformerConfig) if getattr(saved, f.name) != getattr(model_config, f.name)]
        raise ConfigError(
            f"cannot resume {path}: it was trained with a different model config ({'; '.join(diff)}); resume with the "
            "run's original --arch/--init/--feature-compression or start a new --out"
        )
    saved_run = read_saved_config(path)
    for name in ("lora_rank", "train_text_encoder"):
        if name in saved_run and saved_run[name] != getattr(cfg, name):
            raise ConfigError(
                f"cannot resume {path}: it was trained with --{name.replace('_', '-')} {saved_run[name]!r}, this run has "
                f"{getattr(cfg, name)!r}"
            )
    return path
