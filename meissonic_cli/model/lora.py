"""Low-rank adapters (LoRA) on the transformer's linear layers: training them, and applying adapter files
(in a guidance-distilled student also on its guidance embedding, which has to learn from zero:
`meissonic distill --lora-rank`).

Each adapted `nn.Linear` computes `W x + b + scaling * B (A x)` with A `(r, in)` drawn like a
linear layer's weight and B `(out, r)` zero, so training starts from the unchanged model.

The adapters live in their own module (`LoRA`) and reach the model through forward hooks, so the
model's own state_dict keeps the released key names: `merged_state_dict` folds the updates into
those weights for a released-layout checkpoint, and `save_lora` writes only the adapters, in the
PEFT and diffusers layouts (`lora_files.save_adapter`).

`apply_lora` attaches adapter files (PEFT, diffusers/official trainer or meissonic-lora, see
`lora_files`) to a model for sampling without merging them: each adapter adds
`scale * scaling * B (A x)` to its layers' outputs through its own hooks, so several stack, and
`AppliedLoRA.remove()` gives back the unchanged model.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

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


def _adapter_dtype(layer_dtype: torch.dtype) -> torch.dtype:
    # Half-precision layers keep their adapters in float32, as peft does (autocast_adapter_dtype).
    return torch.float32 if layer_dtype in (torch.float16, torch.bfloat16) else layer_dtype


class _FollowLayer(_AddUpdate):
    """`_AddUpdate` whose adapter follows its layer's device and dtype (the model may be moved after loading)."""

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        w, dtype = module.weight, _adapter_dtype(module.weight.dtype)
        if self.adapter.lora_A.weight.device != w.device or self.adapter.lora_A.weight.dtype != dtype:
            self.adapter.to(device=w.device, dtype=dtype)
        # Added in the adapter's precision, then rounded once, as peft does.
        return (output + self.adapter(inputs[0].to(dtype))).to(output.dtype)


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


def save_lora(folder: str | Path, lora: LoRA, adapters: dict[str, torch.Tensor] | None = None, *,
              model: nn.Module | None = None, base_model: str | None = None) -> None:
    """Write adapters (default: `lora`'s live ones) into `folder` as PEFT and diffusers read them
    (`lora_files.save_adapter`); `model` lets `target_modules` use short names, `base_model` is recorded."""
    from meissonic_cli.model.lora_files import save_adapter, target_modules

    adapters = lora.adapter_state_dict() if adapters is None else adapters
    tensors = {k: v.detach().float() for k, v in adapters.items()}
    save_adapter(folder, tensors, rank=lora.rank, alpha=lora.alpha, targets=target_modules(lora.layer_names, model),
                 base_model=base_model)


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors (`<layer>.lora_A.weight` / `.lora_B.weight`, as stored) of an adapter file or folder."""
    from meissonic_cli.model.lora_files import adapter_tensors, read_adapter

    return adapter_tensors(read_adapter(path))


def load_lora(path: str | Path, model: nn.Module) -> LoRA:
    """Attach the adapters stored at `path` (one rank and alpha throughout, as `save_lora` writes) to `model`
    as a trainable `LoRA`."""
    from meissonic_cli.model.lora_files import adapter_tensors, check_fits, read_adapter

    adapter = read_adapter(path)
    check_fits(adapter, model)
    ranks, scalings = adapter.ranks, {layer.scaling for layer in adapter.layers.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ModelFormatError(f"{path}: layers of different ranks or scales cannot be trained as one LoRA; apply it "
                               "with --lora instead")
    names = set(adapter.layers)
    lora = LoRA(model, rank=ranks[0], alpha=scalings.pop() * ranks[0],
                targets=re.compile("^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"))
    lora.load_adapter_state_dict(adapter_tensors(adapter))
    return lora


def print_note(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


class AppliedLoRA:
    """An adapter file attached to a model for sampling (hooks, not merged); `record` is what sidecars keep."""

    def __init__(self, model: nn.Module, adapter: Any, scale: float):
        from meissonic_cli.model.lora_files import check_fits

        check_fits(adapter, model)
        self.adapter, self.scale = adapter, float(scale)
        self.record = {"path": str(adapter.source.resolve()), "sha256": adapter.sha256(), "scale": self.scale}
        self.updates = nn.ModuleDict()
        self._handles = []
        modules = dict(model.named_modules())
        for name, layer in adapter.layers.items():
            module = modules[name]
            update = LoRAAdapter(module.in_features, module.out_features, layer.rank, alpha=layer.rank)
            with torch.no_grad():
                update.lora_A.weight.copy_(layer.down)
                update.lora_B.weight.copy_(layer.up)
            update.scale = layer.scaling * self.scale
            update.to(device=module.weight.device, dtype=_adapter_dtype(module.weight.dtype)).eval().requires_grad_(False)
            self.updates[_key(name)] = update
            self._handles.append(module.register_forward_hook(_FollowLayer(update)))

    def remove(self) -> None:
        """Stop adding this adapter's updates."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def apply_lora(model: nn.Module, specs: Any, notify: Optional[Callable[[str], None]] = print_note) -> list[AppliedLoRA]:
    """Attach each `--lora PATH[:SCALE]` of `specs` (strings, (path, scale) pairs or `LoraSpec`s) to `model`,
    stacked in order. Every adapter is read and checked before any is attached; `notify` gets one line per
    notice (an adapter without alpha; default: printed to stderr)."""
    from meissonic_cli.model.lora_files import parse_lora_spec, read_adapter

    if specs is None:
        return []
    items = [specs] if isinstance(specs, (str, Path)) else list(specs)
    parsed = [parse_lora_spec(s) for s in items]
    adapters = [read_adapter(spec.path) for spec in parsed]
    applied: list[AppliedLoRA] = []
    try:
        for spec, adapter in zip(parsed, adapters):
            applied.append(AppliedLoRA(model, adapter, spec.scale))
    except Exception:
        for done in applied:
            done.remove()
        raise
    if notify is not None:
        for adapter in adapters:
            for note in adapter.notes:
                notify(f"Note: {note}")
    return applied
