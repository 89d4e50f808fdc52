"""Low-rank adapters (LoRA) on the transformer's attention projections (and, in a guidance-distilled
student, on its guidance embedding, which has to learn from zero: `meissonic distill --lora-rank`).

Each adapted `nn.Linear` computes `W x + b + (alpha / r) * B (A x)` with A `(r, in)` drawn like a
linear layer's weight and B `(out, r)` zero, so training starts from the unchanged model.

The adapters live in their own module (`LoRA`) and reach the model through forward hooks, so the
model's own state_dict keeps the released key names: `merged_state_dict` folds the updates into
those weights for a released-layout checkpoint, and `save_lora` writes only the adapters
(`<layer>.lora_A.weight`, `<layer>.lora_B.weight`, rank and alpha in the safetensors metadata).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from meissonic_cli.atomic import atomic_write
from meissonic_cli.errors import ModelFormatError

# Every attention projection of the MMDiT blocks (image and text streams) and of the single blocks.
# The single blocks' proj_out mixes attention and MLP outputs, so it is left alone.
ATTENTION_PROJECTIONS = re.compile(r"(^|\.)attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
                                   r"|(^|\.)time_text_embed\.guidance_embedder\.linear_[12]$")


class LoRAAdapter(nn.Module):
    """The low-rank update of one linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scale


def _key(name: str) -> str:
    # ModuleDict keys may not contain dots.
    return name.replace(".", "/")


class LoRA(nn.Module):
    """Adapters for the linear layers of `model` whose qualified names match `targets`."""

    def __init__(self, model: nn.Module, rank: int, alpha: float = 0.0, targets: re.Pattern[str] = ATTENTION_PROJECTIONS):
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be >= 1")
        self.rank = rank
        self.alpha = float(alpha or rank)
        self.adapters = nn.ModuleDict()
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and targets.search(name):
                adapter = LoRAAdapter(module.in_features, module.out_features, rank, self.alpha)
                adapter.to(device=module.weight.device)
                self.adapters[_key(name)] = adapter
                self._handles.append(module.register_forward_hook(_AddUpdate(adapter)))
        if not self.adapters:
            raise ModelFormatError("no attention projection layers found to attach LoRA adapters to")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layer_names(self) -> list[str]:
        return [k.replace("/", ".") for k in self.adapters.keys()]

    def detach_hooks(self) -> None:
        """Stop adding the updates to the model's outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The live adapters keyed `<layer>.lora_A.weight` / `<layer>.lora_B.weight` (the model's layer names)."""
        return self.named_adapters({f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}, prefix="")

    def named_adapters(self, module_state: dict[str, torch.Tensor], prefix: str = "lora.") -> dict[str, torch.Tensor]:
        """Adapter tensors picked from a state_dict that holds this module under `prefix`, renamed to layer names."""
        out = {}
        for key in self.adapters.keys():
            name = key.replace("/", ".")
            for part in ("lora_A", "lora_B"):
                out[f"{name}.{part}.weight"] = module_state[f"{prefix}adapters.{key}.{part}.weight"]
        return out

    def module_keys(self, adapters: dict[str, torch.Tensor], prefix: str = "lora.") -> dict[str, torch.Tensor]:
        """Inverse of `named_adapters`: layer-named adapter tensors keyed as in a state_dict holding this module."""
        self._check(adapters)
        return {f"{prefix}adapters.{_key(k.rsplit('.', 2)[0])}.{k.rsplit('.', 2)[1]}.weight": v for k, v in adapters.items()}

    def load_adapter_state_dict(self, adapters: dict[str, torch.Tensor]) -> None:
        state = self.module_keys(adapters, prefix="")
        self.load_state_dict(state, strict=True)

    def _check(self, adapters: dict[str, torch.Tensor]) -> None:
        from meissonic_cli.model.state_io import check_keys

        expected = {f"{n}.{part}.weight": getattr(self.adapters[_key(n)], part).weight.shape
                    for n in self.layer_names for part in ("lora_A", "lora_B")}
        check_keys(expected, adapters, "LoRA adapters", what=f"the model's rank-{self.rank} adapters")


class _AddUpdate:
    """Forward hook adding an adapter's output; a class (not a closure) so the model still pickles."""

    def __init__(self, adapter: LoRAAdapter):
        self.adapter = adapter

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.adapter(inputs[0]).to(output.dtype)


def merge_adapters(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """`base` (a model state_dict) with each `<layer>.lora_B @ <layer>.lora_A * scale` added to `<layer>.weight`."""
    out = dict(base)
    for key in adapters:
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[: -len(".lora_A.weight")]
        w = out[layer + ".weight"]
        delta = adapters[layer + ".lora_B.weight"].float() @ adapters[key].float() * scale
        out[layer + ".weight"] = (w.float() + delta.to(w.device)).to(w.dtype)
    return out


def merged_state_dict(model: nn.Module, lora: LoRA) -> dict[str, torch.Tensor]:
    """The model's state_dict with every adapter folded into its layer's weight (released key names)."""
    return merge_adapters({k: v.detach() for k, v in model.state_dict().items()}, lora.adapter_state_dict(), lora.scale)


def save_lora(path: str | Path, lora: LoRA, adapters: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapters (default: `lora`'s live ones) as safetensors, atomically, with rank and alpha in the metadata."""
    from safetensors.torch import save_file

    adapters = lora.adapter_state_dict() if adapters is None else adapters
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapters.items()}
    meta = {"format": "meissonic-lora", "rank": str(lora.rank), "alpha": repr(lora.alpha)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a file written by `save_lora`."""
    return _read(path)[0]


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from meissonic_cli.model.state_io import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"LoRA adapter file {path} does not exist")
    state, meta = read_safetensors(path, with_metadata=True)
    if meta.get("format") != "meissonic-lora":
        raise ModelFormatError(f"{path} is not a meissonic LoRA adapter file (no format=meissonic-lora metadata)")
    return state, meta


def load_lora(path: str | Path, model: nn.Module) -> LoRA:
    """Attach the adapters stored at `path` (written by `save_lora`) to `model`."""
    state, meta = _read(path)
    lora = LoRA(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]))
    lora.load_adapter_state_dict(state)
    return lora
