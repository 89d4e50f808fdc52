"""The diffusers-style call of `MeissonicPipeline` (`sample/call_args.py`): the official `inference.py`
call argument for argument, `num_images_per_prompt`, output types and `return_dict`, on the tiny folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meissonic_cli.errors import InputError
from meissonic_cli.sample.call_args import MeissonicPipelineOutput
from meissonic_cli.sample.pipeline import MeissonicPipeline

# The official inference.py's negative prompt, verbatim.
NEGATIVE = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, text, jpeg artifacts, "
            "signature, sketch, duplicate, ugly, identifying mark")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> MeissonicPipeline:
    return MeissonicPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).to("cpu")


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_the_official_inference_call_runs_unchanged(pipe: MeissonicPipeline, one_thread) -> None:
    # inference.py, with the tiny model's sizes: steps = 64, CFG = 9, resolution = 1024 there.
    steps, CFG, resolution = 3, 9, 64
    negative_prompt = NEGATIVE
    prompts = ["Two actors are posing for a pictur with one wearing a black and white face paint.",
               "A large body of water with a mountain in the background."]
    batched_generation = False
    num_images = len(prompts) if batched_generation else 1
    images = pipe(prompt=prompts[:num_images], negative_prompt=[negative_prompt] * num_images, height=resolution,
                  width=resolution, guidance_scale=CFG, num_inference_steps=steps).images
    assert len(images) == 1 and images[0].size == (resolution, resolution)

    # The same call with a generator gives the very images of the toolkit's own spelling.
    ours = pipe(prompts, negative_prompt=NEGATIVE, steps=steps, guidance_scale=CFG, height=resolution,
                width=resolution, generator=torch.Generator().manual_seed(7))
    theirs = pipe(prompt=prompts, negative_prompt=[NEGATIVE] * 2, height=resolution, width=resolution,
                  guidance_scale=CFG, num_inference_steps=steps, generator=torch.Generator().manual_seed(7))
    assert isinstance(theirs, MeissonicPipelineOutput) and isinstance(theirs, list) and theirs.images is theirs
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(ours), _pixels(theirs.images)))
    assert np.array_equal(np.asarray(theirs[1]), np.asarray(list(theirs)[1]))  # indexes and iterates as a list


def test_num_images_per_prompt_and_output_types(pipe: MeissonicPipeline, one_thread) -> None:
    prompts = ["a red circle", "a blue square"]
    kw = dict(height=32, width=64, guidance_scale=4.0, num_inference_steps=2)
    out = pipe(prompt=prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), **kw)
    assert len(out.images) == 4 and out.images[0].size == (64, 32)
    # Ordered as diffusers' aMUSEd pipeline repeats the batch: p0, p1, p0, p1.
    repeated = pipe(prompts * 2, steps=2, height=32, width=64, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(3))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(out), _pixels(repeated)))

    as_np = pipe(prompt=prompts, num_images_per_prompt=2, output_type="np", generator=torch.Generator().manual_seed(3),
                 **kw).images
    as_pt = pipe(prompt=prompts, num_images_per_prompt=2, output_type="pt", generator=torch.Generator().manual_seed(3),
                 **kw).images
    assert isinstance(as_np, np.ndarray) and as_np.shape == (4, 32, 64, 3) and as_np.dtype == np.float32
    assert isinstance(as_pt, torch.Tensor) and tuple(as_pt.shape) == (4, 3, 32, 64)
    assert np.allclose(as_np, as_pt.permute(0, 2, 3, 1).numpy())
    assert np.abs(np.round(as_np * 255) - np.stack(_pixels(out))).max() <= 1

    (images,) = pipe(prompt="a red circle", return_dict=False, seed=0, **kw)
    assert isinstance(images, list) and len(images) == 1
    seeds = pipe(prompt=prompts, num_images_per_prompt=2, seed=[1, 2, 3, 4], output_type="codes", **kw)
    assert seeds.shape[0] == 4


def test_both_spellings_of_one_argument_are_refused(pipe: MeissonicPipeline) -> None:
    with pytest.raises(InputError, match="give prompt or prompts, not both"):
        pipe(prompt="a", prompts="b", num_inference_steps=1)
    with pytest.raises(InputError, match="give num_inference_steps or steps, not both"):
        pipe(prompt="a", steps=2, num_inference_steps=1)
    with pytest.raises(InputError, match="num_images_per_prompt must be an integer >= 1"):
        pipe(prompt="a", num_images_per_prompt=0)
    with pytest.raises(InputError, match="no prompt given"):
        pipe(num_inference_steps=1)
    with pytest.raises(InputError, match="2 seeds for 4 prompts"):
        pipe(prompt=["a", "b"], num_images_per_prompt=2, seed=[1, 2], num_inference_steps=1, height=32)


def _text_encoder_dtypes(pipe: MeissonicPipeline) -> tuple[set, set]:
    """(dtypes of the text encoder's LayerNorm weights, dtypes of all its other weights)."""
    norms = {id(p) for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    params = list(pipe.text_encoder.parameters())
    return {p.dtype for p in params if id(p) in norms}, {p.dtype for p in params if id(p) not in norms}


def test_to_moves_the_device_and_the_transformer_dtype(tiny_model_dir: Path) -> None:
    pipe = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    # The text encoder takes the dtype too (as diffusers' torch_dtype), its LayerNorms float32, and runs on the CPU.
    assert _text_encoder_dtypes(pipe) == ({torch.float32}, {torch.bfloat16})
    seq, pooled = pipe.encode_prompts(["a red circle"])
    assert seq.dtype == pooled.dtype == torch.bfloat16 and bool(torch.isfinite(seq.float()).all())
    assert pipe.to("cpu", torch.float16) is pipe and pipe.dtype == torch.float16 and pipe.device.type == "cpu"
    assert _text_encoder_dtypes(pipe) == ({torch.float32}, {torch.float16})
    assert _text_encoder_dtypes(pipe.to(torch.float32)) == ({torch.float32}, {torch.float32})
    with pytest.raises(InputError, match="give torch_dtype or dtype, not both"):
        MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32", torch_dtype=torch.float16)
