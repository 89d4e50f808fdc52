"""`--offload`: keep the pipeline's parts on the CPU and bring each to the GPU only for its stage.

- `model` (as diffusers' `enable_model_cpu_offload`): the text encoder, the transformer and the VQ
  each live on the CPU; entering a stage (the text encoder's `encode`, the transformer's
  `prepare_conditioning` — every transformer call starts there —, the VQ's `encode`/`decode`) moves
  that part to the execution device and the part resident before it back to the CPU. At most one big
  part is on the GPU at a time, and it stays there while its stage repeats (every sampling step).
- `sequential`: as `model`, but the transformer's blocks stay on the CPU and each is streamed to the
  GPU for its own forward (a forward pre-hook and a forward hook), so the GPU holds the transformer's
  small outer layers and one block: for the smallest GPUs, and slow (every step copies every block).

Every move is logged (`Offloader.log`: the stage and the parts resident once it is entered), which
is how the placement is tested on a CPU-only machine (execution device = CPU, moves are no-ops).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

from meissonic_cli.errors import InputError

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI reads the constants without it
    import torch
    from torch import nn

OFFLOAD_MODES = ("none", "model", "sequential")
OFFLOAD_HELP = ("Keep the model's parts on the CPU and move each to the GPU only for its stage: none; model (the "
                "text encoder, transformer and VQ one at a time, as diffusers' enable_model_cpu_offload); "
                "sequential (also the transformer's blocks one at a time: least GPU memory, slow). Needs a CUDA "
                "device. With a prompts file every prompt is encoded once, before the transformer comes in.")
# The parts the offloader places, and the methods that start each one's stage.
STAGE_METHODS = {"text_encoder": ("encode",), "transformer": ("prepare_conditioning",), "vq": ("encode", "decode")}


def check_offload(mode: str, device: "torch.device") -> None:
    """InputError (one line) when `mode` is unknown or cannot help on `device`."""
    import torch

    if mode not in OFFLOAD_MODES:
        raise InputError(f"unknown --offload {mode!r}; use one of {', '.join(OFFLOAD_MODES)}")
    if mode != "none" and torch.device(device).type != "cuda":
        raise InputError(f"--offload {mode} moves parts between the CPU and a CUDA GPU; this run is on "
                         f"{torch.device(device).type} (everything is in CPU memory already): drop --offload")


def check_low_vram(quantize: str, offload: str, compile: bool, device: "torch.device", dtype: "torch.dtype") -> Any:
    """Check the quantize/offload/compile settings for `device` (one InputError); returns where the
    pipeline's parts live between stages (the CPU with offload, else `device`)."""
    import torch

    from meissonic_cli.model.quantize import check_quantize

    check_quantize(quantize, device, dtype)
    if compile and offload == "sequential":
        raise InputError("--compile cannot follow blocks that --offload sequential moves at every step; use "
                         "--offload model with --compile, or drop --compile")
    check_offload(offload, device)
    return torch.device(device) if offload == "none" else torch.device("cpu")


def check_pipeline_quantize(pipeline: Any, quantize: str) -> None:
    """A given pipeline must be quantized as the settings say: the sidecars record the mode."""
    loaded = getattr(pipeline.transformer, "quantize_mode", "none")
    if loaded != quantize:
        raise InputError(f"the pipeline was loaded with quantize={loaded!r} but --quantize is {quantize!r}; load it "
                         f"with MeissonicPipeline.from_pretrained(..., quantize={quantize!r})")


def load_transformer(root: Any, dtype: "torch.dtype", device: Any, home: Any, quantize: str,
                     variant: Any = None) -> Any:
    """The transformer of a model folder (its `variant` weights) in `dtype` on `home`, quantized (`model.quantize`)."""
    from meissonic_cli.model.quantize import quantize_transformer
    from meissonic_cli.model.transformer import MeissonicTransformer

    # Quantized: read on the CPU and quantized block by block on the way to the device, so the
    # device never holds the full-precision blocks; int4's packed layout is made on the GPU.
    transformer = MeissonicTransformer.from_pretrained(root, dtype=dtype, device="cpu" if quantize != "none" else home,
                                                       variant=variant)
    quantize_transformer(transformer, quantize, device=device if quantize == "int4" else home)
    return transformer


def place_parts(pipe: Any, offload: str, compile: bool, device: Any) -> Any:
    """Offload (`enable_offload`) and compile (`model.compiled`) a loaded pipeline as asked; returns it."""
    if offload != "none":
        enable_offload(pipe, offload, device)
    if compile:
        from meissonic_cli.model.compiled import compile_blocks

        compile_blocks(pipe.transformer)
    return pipe


def enable_offload(pipe: Any, mode: str, device: Any) -> Any:
    """Keep `pipe`'s parts on the CPU and bring each to `device` for its stage."""
    pipe.offloader = Offloader({"text_encoder": pipe.text_encoder, "transformer": pipe.transformer, "vq": pipe.vq},
                               mode, device)
    return pipe


def remember_prompts(pipe: Any, prompts: Any, chunk: int = 64) -> None:
    """Encode `prompts` now (in chunks, each prompt once) and keep their features on the CPU in
    `pipe.text_memo`: later calls with these prompts skip the text encoder (with offload it stays out)."""
    import torch

    todo = list(dict.fromkeys(p for p in prompts if p not in pipe.text_memo))
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        with torch.inference_mode():
            seq, pooled = pipe.text_encoder.encode(part)
        for i, prompt in enumerate(part):
            pipe.text_memo[prompt] = (seq[i].cpu(), pooled[i].cpu())


class Offloader:
    """Places the pipeline's parts (see the module docstring); `device` is the execution device."""

    def __init__(self, parts: dict[str, "nn.Module"], mode: str, device: Any, offload_device: Any = "cpu"):
        import torch

        if mode not in OFFLOAD_MODES[1:]:
            raise InputError(f"unknown offload mode {mode!r}; use model or sequential")
        self.parts = parts
        self.mode = mode
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.resident: list[str] = []
        self.log: list[tuple[str, tuple[str, ...]]] = []
        for part in parts.values():
            part.to(self.offload_device)
        for name, methods in STAGE_METHODS.items():
            for method in methods:
                self._wrap(name, method)
        if mode == "sequential":
            self._stream_blocks(parts["transformer"])

    def _wrap(self, name: str, method: str) -> None:
        part = self.parts[name]
        original: Callable[..., Any] = getattr(part, method)

        @functools.wraps(original)
        def staged(*args: Any, **kwargs: Any) -> Any:
            import torch

            self.enter(name)
            # Inputs made for the part where it sat before (e.g. an image for the VQ) follow it.
            args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
            return original(*args, **kwargs)

        # An instance attribute shadows the class's method for this part only.
        object.__setattr__(part, method, staged)

    def _stream_blocks(self, transformer: "nn.Module") -> None:
        def bring(block: "nn.Module", args: Any) -> None:
            block.to(self.device)

        def send_back(block: "nn.Module", args: Any, out: Any) -> None:
            block.to(self.offload_device)

        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            block.register_forward_pre_hook(bring)
            block.register_forward_hook(send_back)

    def enter(self, name: str) -> None:
        """Make `name` the part on the execution device (a no-op when it already is)."""
        from torch import nn

        if self.resident == [name]:
            return
        for other in self.resident:
            self.parts[other].to(self.offload_device)
        part = self.parts[name]
        if self.mode == "sequential" and name == "transformer":
            blocks = {id(m) for m in [*part.transformer_blocks, *part.single_transformer_blocks]}
            for child in part.children():
                if isinstance(child, nn.ModuleList) and any(id(m) in blocks for m in child):
                    continue
                child.to(self.device)
        else:
            part.to(self.device)
        self.resident = [name]
        self.log.append((name, tuple(self.resident)))

    def stages(self) -> list[str]:
        """The stages entered, in order (consecutive repeats are not logged)."""
        return [stage for stage, _ in self.log]


__all__ = ["OFFLOAD_HELP", "OFFLOAD_MODES", "Offloader", "check_low_vram", "check_offload", "check_pipeline_quantize", "enable_offload",
           "load_transformer", "place_parts", "remember_prompts"]
