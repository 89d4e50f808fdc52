"""Where a model folder comes from: a local path, or a Hugging Face repo id in the local cache
(downloaded only when asked). `sample.pipeline` re-exports `resolve_model_folder`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from meissonic_cli.errors import ModelFormatError

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def resolve_model_folder(model: Union[str, Path], allow_download: bool = False) -> Path:
    """The local folder for `model`: a path, or a Hugging Face repo id found in the local HF cache
    (downloaded only with `allow_download` and HF_HUB_OFFLINE unset)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFormatError(f"{path} is a file; expected a model folder holding transformer/, vqvae/, "
                                   f"text_encoder/, tokenizer/ and scheduler/")
        return path
    name = str(model)
    if not _HUB_ID_RE.fullmatch(name):
        raise ModelFormatError(f"model folder not found: {path}")
    hint = (f"model folder not found: {name} (if it is a Hugging Face repo id, download it first with "
            f"`huggingface-cli download {name} --local-dir DIR` and pass DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFormatError(hint + ")") from None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the local cache: any hub error means the same here
        pass
    if not allow_download:
        raise ModelFormatError(hint + ", or allow the download with --allow-download)")
    if _hf_offline():
        raise ModelFormatError(hint + "; HF_HUB_OFFLINE is set, so nothing is downloaded)")
    try:
        return Path(snapshot_download(name))
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelFormatError(f"could not download {name}: {first}; {hint[len('model folder not found: '):]})") from None


__all__ = ["resolve_model_folder"]
