"""The diffusers-style call of `MeissonicPipeline`: argument names, batching and the output object.

Code written for the official pipeline (its `inference.py`) or for diffusers pipelines runs unchanged:

    pipe = MeissonicPipeline.from_pretrained(path, torch_dtype=torch.float16, variant="fp16").to("cuda")
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, height=1024, width=1024, guidance_scale=9,
                 num_inference_steps=64, generator=torch.Generator("cuda").manual_seed(0)).images[0]

Each diffusers name has a toolkit name that keeps working (`prompt` = `prompts`, `num_inference_steps`
= `steps`, `torch_dtype` = `dtype`, `output_type` "pt" = "tensor"); giving both spellings of one argument
is an error. `num_images_per_prompt=N` samples N images per prompt, ordered as diffusers' aMUSEd pipeline
orders them (the prompt list repeated N times: p0, p1, p0, p1 for two prompts and N=2); a list of seeds or
generators then gives one per image. The call returns `MeissonicPipelineOutput`, a list of the images (what
the call returned before, so indexing and iterating are unchanged) with an `.images` attribute;
`return_dict=False` returns the tuple `(images,)` as diffusers does. "codes" and "tensor" outputs come back
as plain tensors, as before.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from meissonic_cli.errors import InputError

# output_type -> what the images are: PIL list, numpy (B, H, W, 3) in [0, 1], torch (B, 3, H, W) in [0, 1],
# or the toolkit's own "codes" (int64 (B, h, w)) and "tensor" (= "pt", returned bare).
OUTPUT_TYPES = ("pil", "np", "pt", "codes", "tensor")


class MeissonicPipelineOutput(list):
    """The images of one pipeline call: a list (one entry per image) that also answers `.images`, as
    diffusers' `ImagePipelineOutput` does. For "np"/"pt", `.images` is the batched array/tensor and the
    list holds its rows."""

    def __init__(self, images: Union[list, np.ndarray, torch.Tensor]):
        super().__init__(images)
        self._batch = None if isinstance(images, list) else images

    @property
    def images(self) -> Union[list, np.ndarray, torch.Tensor]:
        return self if self._batch is None else self._batch

    def to_tuple(self) -> tuple:
        return (self.images,)


def one_of(new: Any, old: Any, new_name: str, old_name: str, default: Any) -> Any:
    """The value given under either spelling of one argument (`default` when neither is given)."""
    if new is not None and old is not None:
        raise InputError(f"give {new_name} or {old_name}, not both (they are the same argument)")
    return new if new is not None else old if old is not None else default


def prompt_list(prompt: Union[str, Sequence[str], None], prompts: Union[str, Sequence[str], None]) -> list[str]:
    """`prompt` (diffusers) or `prompts` (toolkit): one string or a list, as a list."""
    value = one_of(prompt, prompts, "prompt", "prompts", None)
    if value is None:
        raise InputError("no prompt given (prompt='...' or a list of prompts)")
    return [value] if isinstance(value, str) else list(value)


def repeat_per_prompt(prompts: list[str], negative_prompt: Union[str, Sequence[str]], n: Any) -> tuple[list[str], Any]:
    """Prompts and negative prompts for `n` images per prompt: the lists repeated n times (aMUSEd's order)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise InputError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
    n = int(n)
    if n == 1:
        return prompts, negative_prompt
    if not isinstance(negative_prompt, str):
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
        negative_prompt = negatives * n
    return prompts * n, negative_prompt


def wrap_output(images: Any, output_type: str, return_dict: bool) -> Any:
    """What the call returns for decoded images (B, 3, H, W) in [0, 1] (see the module docstring)."""
    if output_type == "tensor":
        return images
    if output_type == "pt":
        out: Any = images
    elif output_type == "np":
        out = images.float().permute(0, 2, 3, 1).cpu().numpy()
    else:
        from meissonic_cli.model.vq import tensor_to_images

        out = tensor_to_images(images)
    return MeissonicPipelineOutput(out) if return_dict else (out,)


def move_pipeline(pipe: Any, args: Sequence[Any], device: Any, dtype: Any) -> Any:
    """`MeissonicPipeline.to(*args, device=, dtype=)`: positional arguments are a dtype or a device, as in diffusers;
    the dtype is the transformer's and the text encoder's (its LayerNorms stay float32)."""
    from meissonic_cli.device import dtype_table, resolve_device, resolve_dtype

    for arg in args:
        if isinstance(arg, torch.dtype) or (isinstance(arg, str) and arg.lower() in dtype_table()):
            dtype = one_of(arg, dtype, "a dtype", "dtype=", None)
        else:
            device = one_of(arg, device, "a device", "device=", None)
    if device is not None:
        dev = resolve_device(device)
        for part in (pipe.transformer, pipe.text_encoder, pipe.vq):
            part.to(dev)
    if dtype is not None:
        pipe.transformer.to(resolve_dtype(dtype))
        pipe.text_encoder.cast(resolve_dtype(dtype))
    return pipe


def check_output_type(output_type: Optional[str]) -> str:
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"unknown output_type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
    return output_type


__all__ = ["OUTPUT_TYPES", "MeissonicPipelineOutput", "check_output_type", "move_pipeline", "one_of", "prompt_list",
           "repeat_per_prompt", "wrap_output"]
