"""Weight-only quantization of the transformer through torchao (`quantize_`), the library the official
fp8 script uses.

What is quantized: every `nn.Linear` inside the transformer's blocks (the double blocks' attention
q/k/v/out and text-stream projections, both feed-forwards and the AdaLN modulation; the single blocks'
attention, `proj_mlp`, `proj_out` and modulation): 96% of the 1B model's weights. What stays in the
compute dtype: the token embedding, every norm, the context embedder, the timestep/text/micro-condition
MLPs, `project_to_hidden`/`project_from_hidden`, the 2x2 (de)compression convolutions and the MLM
head. On the conformance cases (../shared/conformance) int8 of the block layers moves the logits by
0.5-0.8% (relative L2), and int8 of the layers outside the blocks alone by 1.0-1.2%: the small layers
outside are the sensitive ones, and they hold few weights.

Modes (activations stay in `--dtype`; only the weights are stored smaller):
- `int8`: per-output-row symmetric int8 (`Int8WeightOnlyConfig`); CPU and CUDA.
- `fp8`: float8 e4m3 weights (`Float8WeightOnlyConfig`); CUDA GPUs with compute capability >= 8.9.
- `int4`: groups of 128 (`Int4WeightOnlyConfig`, tinygemm's packed layout); CUDA with --dtype bf16.
  torchao has no packed int4 kernel for the CPU (its int4-in-int8 layout there saves nothing over int8).

A LoRA adapter wrapped around a block's `nn.Linear` (`model/lora.py`) leaves the inner Linear matched
by the same filter: the base weights are quantized and the adapter stays in the compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meissonic_cli.device import trim_host_memory
from meissonic_cli.errors import InputError

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI reads the constants without it
    import torch
    from torch import nn

QUANTIZE_MODES = ("none", "int8", "fp8", "int4")
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
INT4_GROUP = 128
QUANTIZE_HELP = ("Weight-only quantization of the transformer through torchao: none, int8, fp8 (CUDA, compute "
                 "capability 8.9+) or int4 (CUDA, --dtype bf16). Quantized: every linear layer inside the "
                 "transformer blocks (attention, feed-forwards, modulation); kept in --dtype: embeddings, norms, "
                 "the text/time/micro-condition embedders, the hidden projections, the (de)compression and the "
                 "output head. The text encoder and the VQ are not quantized.")


def quantized_layer(fqn: str, module: "nn.Module") -> bool:
    """Whether the layer at `fqn` (a name in `MeissonicTransformer.named_modules()`) is quantized."""
    from torch import nn

    return isinstance(module, nn.Linear) and fqn.startswith(BLOCK_PREFIXES)


def check_quantize(mode: str, device: Any, dtype: "torch.dtype") -> None:
    """InputError (one line saying what the mode needs) when `mode` cannot run on `device` in `dtype`."""
    import torch

    if mode not in QUANTIZE_MODES:
        raise InputError(f"unknown --quantize {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise InputError(f"--quantize {mode} needs torchao: pip install 'meissonic[lowvram]'") from None
    device = torch.device(device)
    if mode == "int8" and device.type not in ("cpu", "cuda"):
        raise InputError(f"--quantize int8 runs on cpu or cuda, not {device.type}; use --quantize none there")
    if mode == "fp8":
        if device.type != "cuda":
            raise InputError(f"--quantize fp8 needs a CUDA GPU with compute capability 8.9+ (Ada, Hopper: float8 "
                             f"weights); this run is on {device.type}: use --quantize int8")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise InputError(f"--quantize fp8 needs a CUDA GPU with compute capability 8.9+ (Ada, Hopper); this GPU "
                             f"has {capability[0]}.{capability[1]}: use --quantize int8")
    if mode == "int4":
        if device.type != "cuda":
            raise InputError(f"--quantize int4 needs a CUDA GPU (torchao has no packed int4 kernel for "
                             f"{device.type}); use --quantize int8 here")
        if dtype != torch.bfloat16:
            raise InputError("--quantize int4 needs --dtype bf16 (torchao's packed int4 kernel computes in bf16)")


def _config(mode: str) -> Any:
    from torchao import quantization as q

    if mode == "int8":
        return q.Int8WeightOnlyConfig()
    if mode == "fp8":
        return q.Float8WeightOnlyConfig()
    return q.Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")


def quantize_transformer(model: "nn.Module", mode: str, device: Any = None) -> int:
    """Quantize `model`'s block layers in place (see the module docstring); returns how many.

    Block by block: each block is moved to `device` (default: where it is) and quantized there, so a
    model loaded on the CPU reaches the GPU with at most one block in full precision at a time.
    """
    if mode == "none":
        return 0
    from torch import nn
    from torchao.quantization import quantize_

    config = _config(mode)
    count = 0
    for prefix in BLOCK_PREFIXES:
        for i, block in enumerate(getattr(model, prefix.rstrip("."))):
            if device is not None:
                block.to(device)
            names = [n for n, m in block.named_modules() if quantized_layer(f"{prefix}{i}.{n}", m)]
            quantize_(block, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names)
            count += len(names)
            # The block's full-precision weights just freed leave the process now: glibc would keep them
            # (measured in a CPU pipeline load: +1.07 GiB over the bf16 peak without this, +0.09 GiB with it).
            trim_host_memory()
    if device is not None:
        model.to(device)
    model.quantize_mode = mode
    return count


def quantized_bytes(model: "nn.Module") -> int:
    """Bytes the model's weights and buffers hold, counting a torchao tensor by its stored parts."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None:
            names, _ = inner()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


__all__ = ["QUANTIZE_HELP", "QUANTIZE_MODES", "check_quantize", "quantize_transformer", "quantized_bytes",
           "quantized_layer"]
