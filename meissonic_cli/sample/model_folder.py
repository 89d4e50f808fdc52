"""What a released-layout model folder must hold (transformer/, vqvae/, text_encoder/, scheduler/), checked
before anything is loaded, so a broken folder fails in a second with the missing file's name."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.scheduler import SCHEDULER_CONFIG_NAME
from meissonic_cli.model.transformer import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME


def need_file(folder: Path, names: Sequence[str], what: str) -> None:
    if not folder.is_dir():
        raise ModelFormatError(f"{what} folder missing: expected {folder}/ with {names[0]}")
    if not any((folder / n).is_file() for n in names):
        raise ModelFormatError(f"{what} file missing: expected {folder / names[0]}"
                               + (f" (or {', '.join(names[1:])})" if len(names) > 1 else ""))


def need_weights(folder: Path, weights: str, index: str, what: str) -> None:
    from meissonic_cli.model.state_io import has_weights

    if not has_weights(folder, weights, index):
        raise ModelFormatError(f"{what} file missing: expected {folder / weights} (or {index}, or a *.fp16/*.bf16 variant)")


def check_model_folder(root: Path, text_encoder: bool = True) -> None:
    """Raise ModelFormatError naming the first expected file of the released layout that is missing.

    Checked before anything is loaded, so a broken folder fails in a second, not after reading weights.
    `text_encoder=False` skips `text_encoder/` (another text encoder folder is used).
    """
    from meissonic_cli.model.text_encoder import HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_INDEX
    from meissonic_cli.model.vq import VQ_CONFIG

    need_file(root / "transformer", [CONFIG_NAME], "transformer config")
    need_weights(root / "transformer", WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "transformer weights")
    # The VQ's weight file name depends on its kind (diffusers VQModel or PatchVQ): its loader names it.
    need_file(root / "vqvae", [VQ_CONFIG], "VQ config")
    if text_encoder:
        need_file(root / "text_encoder", [HF_CONFIG], "text encoder config")
        need_weights(root / "text_encoder", HF_WEIGHTS, HF_WEIGHTS_INDEX, "text encoder weights")
    need_file(root / "scheduler", [SCHEDULER_CONFIG_NAME], "scheduler config")


__all__ = ["check_model_folder", "need_file", "need_weights"]
