"""Model folders named by a Hugging Face hub id: the one resolver every command's model option uses.

`resolve_model_folder(model)` takes a local folder (returned as it is) or a hub id `owner/name`,
which is looked up in the local Hugging Face cache (`HF_HOME`/`HF_HUB_CACHE`, the layout `hf download`
writes) without touching the network. Only with `allow_download=True` (the commands' `--allow-download`)
and HF_HUB_OFFLINE unset is a missing id downloaded. A path that exists always wins over an id of the same
spelling. A missing id is one ModelFormatError that gives the exact `hf download` command to run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from meissonic_cli.errors import ModelFormatError

HUB_ID = "MeissonFlow/Meissonic"
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Weight variants as diffusers/transformers name their files (`model.fp16.safetensors`; `state_io.variant_name`).
VARIANTS = ("fp16", "bf16")

# The --help of the two flags every command with a model option has (one flag, one meaning).
ALLOW_DOWNLOAD_HELP = ("Let the model folder option name a Hugging Face repo id (owner/name) that is not in the local "
                       "Hugging Face cache yet, and download it now (a cached id needs no flag).")
VARIANT_HELP = ("Weight variant to load: fp16 or bf16 reads the *.fp16.safetensors / *.bf16.safetensors files the model "
                "folder holds (plain files where a part has none). Default: the plain weights; a folder holding only "
                "one variant loads it and says so.")


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a hub repo id (`owner/name`); says nothing about the cache."""
    return bool(HUB_ID_RE.fullmatch(str(name))) and ".." not in str(name)


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def download_command(repo_id: str) -> str:
    """The `hf download` command that puts `repo_id` in the local cache, where every model option finds it."""
    return f"hf download {repo_id}"


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The cached snapshot folder of `repo_id` (its `refs/main` revision), or None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # declared in pyproject; a broken install gets the download hint instead
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not in the cache"; all mean the same here
        return None


def resolve_model_folder(model: Union[str, Path], allow_download: bool = False, flag: str = "--model") -> Path:
    """The local folder for `model`: an existing path, or a hub id found in the local Hugging Face cache
    (downloaded only with `allow_download` and HF_HUB_OFFLINE unset). `flag` names the option in errors."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFormatError(f"{flag} {path} is a file; expected a model folder holding transformer/, vqvae/, "
                                   f"text_encoder/, tokenizer/ and scheduler/")
        return path
    name = str(model)
    if not is_hub_id(name):
        raise ModelFormatError(f"{flag}: model folder not found: {path}")
    snapshot = cached_snapshot(name)
    if snapshot is not None:
        return snapshot
    command = download_command(name)
    if not allow_download:
        raise ModelFormatError(f"{flag} {name}: model folder not found, and no hub model {name} in the local Hugging Face "
                               f"cache; if it is a hub id, download it with `{command}` (or pass --allow-download)")
    if hf_offline():
        raise ModelFormatError(f"{flag} {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so "
                               f"nothing is downloaded; unset it, or run `{command}` where the hub can be reached")
    return _download(name, command)


def _download(repo_id: str, command: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # network, auth and not-found errors: one line with what to run instead
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelFormatError(f"could not download {repo_id}: {first}; try `{command}`") from None


# The weight files of each part of the released layout (plain names; variants via `state_io.variant_name`).
PART_WEIGHTS = {
    "transformer": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
    "vqvae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
}


def model_variant(root: Union[str, Path], variant: Optional[str] = None) -> Optional[str]:
    """The weight variant to load a released-layout folder (or one part's folder) in: `variant` when some
    part holds it, else None (plain files); with no variant asked for and parts that hold only one
    variant's files, that variant, said in one `Note:` line. Each part then reads its variant files when
    it has them and its plain files otherwise, as diffusers pipelines do."""
    from meissonic_cli.model.state_io import folder_variants, has_weights, note, pick_variant

    root = Path(root)
    parts = {name: root / name for name in PART_WEIGHTS if (root / name).is_dir()}
    if not parts:  # a part's own folder (transformer/, text_encoder/ ...): its loader decides
        return variant
    if variant is not None and variant not in VARIANTS:
        raise ModelFormatError(f"unknown --variant {variant!r}; use one of {', '.join(VARIANTS)}")
    held = {name: folder_variants(folder, *PART_WEIGHTS[name]) for name, folder in parts.items()}
    if variant is not None:
        if not any(variant in found for found in held.values()):
            others = sorted({v for found in held.values() for v in found})
            raise ModelFormatError(f"--variant {variant}: {root} holds no {variant} weight files "
                                   f"(variants there: {', '.join(others) or 'none, only the plain files'}); "
                                   f"leave --variant out to load the plain weights")
        return variant
    only = {name: pick_variant(folder, *PART_WEIGHTS[name], quiet=True) for name, folder in parts.items()
            if has_weights(folder, *PART_WEIGHTS[name])}
    chosen = sorted({v for v in only.values() if v})
    if len(chosen) > 1:
        raise ModelFormatError(f"{root}: parts hold only different variants ({', '.join(chosen)}); choose one with "
                               f"--variant {chosen[0]}")
    if chosen:
        names = [f"{name}/" for name, v in only.items() if v]
        note(f"{root} holds only {chosen[0]} weights for {', '.join(names)} (*.{chosen[0]}.safetensors); loading "
             f"the {chosen[0]} variant")
        return chosen[0]
    return None


__all__ = ["ALLOW_DOWNLOAD_HELP", "HUB_ID", "VARIANTS", "VARIANT_HELP", "cached_snapshot", "download_command", "hf_offline", "is_hub_id", "model_variant",
           "resolve_model_folder"]
