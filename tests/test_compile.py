"""`--compile` (`model.compiled`): the compiled blocks give the eager tokens within rounding (slow: inductor
compiles every block on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meissonic_cli.errors import InputError
from meissonic_cli.sample.pipeline import MeissonicPipeline
from meissonic_cli.sample.samplers import SamplerOptions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_tokens(tiny_model_dir: Path) -> None:
    eager = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    compiled = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32", compile=True)
    assert getattr(compiled.transformer, "compiled", False)
    prompts = ["a red circle", "two blue squares"]
    # Full steps and the feature cache's cached steps (fewer rows: one more compile) through the same blocks.
    args = dict(steps=4, seed=[0, 1], height=64, width=64, output_type="codes", sampler=SamplerOptions(cache_refresh=2))
    a, b = eager(prompts, **args), compiled(prompts, **args)
    # Within rounding: inductor fuses the elementwise work, so a near-tie may draw another code.
    assert (a == b).float().mean() >= 0.95, int((a != b).sum())

def test_compile_with_sequential_offload_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(InputError, match="--compile"):
        MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", offload="sequential", compile=True)
