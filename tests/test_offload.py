"""`--offload`: which part sits on the execution device at each stage (`sample.offload`).

The machine has no GPU, so the execution device is the CPU (moves are no-ops) and the placement is
read from the offloader's log and from forward hooks that record, at each part's use, which parts the
offloader has made resident.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import InputError
from meissonic_cli.sample.offload import Offloader, check_offload, enable_offload
from meissonic_cli.sample.pipeline import MeissonicPipeline
from meissonic_cli.sample.sample import SampleConfig, run_sample

pytestmark = pytest.mark.usefixtures("one_thread")
PARTS = ("text_encoder", "transformer", "vq")


def _offloaded(tiny_model_dir: Path, mode: str) -> tuple[MeissonicPipeline, list[tuple[str, tuple[str, ...]]]]:
    pipe = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    enable_offload(pipe, mode, torch.device("cpu"))
    uses: list[tuple[str, tuple[str, ...]]] = []  # (part whose layer ran, parts resident then)
    for name in PARTS:
        for module in getattr(pipe, name).modules():
            if not list(module.children()):
                module.register_forward_pre_hook(
                    lambda m, a, name=name: uses.append((name, tuple(pipe.offloader.resident))) and None)
    return pipe, uses


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_one_part_at_a_time_and_prompts_encoded_once_before_the_transformer(mode: str, tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    pipe, uses = _offloaded(tiny_model_dir, mode)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle\n")
    cfg = SampleConfig(model=str(tiny_model_dir), prompts=str(prompts), out=str(tmp_path / "out"), steps=2,
                       resolution="32", device="cpu")
    result = run_sample(cfg, progress=False, pipeline=pipe)
    assert len(result.written) == 3
    # Every layer ran while its own part, and only it, was resident.
    assert uses and all(resident == (name,) for name, resident in uses)
    # The text encoder came in once, before the transformer; then transformer and VQ took turns per image.
    assert pipe.offloader.stages() == ["text_encoder"] + ["transformer", "vq"] * 3
    assert all(len(resident) <= 1 for _, resident in pipe.offloader.log)


def test_sequential_streams_each_block_in_for_its_forward(tiny_model_dir: Path) -> None:
    pipe = MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    reference = pipe(["a red circle"], steps=2, seed=0, height=32, width=32, output_type="codes")
    moves: list[str] = []
    transformer = pipe.transformer
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        original = block.to

        def recording(*args, block=block, original=original, **kwargs):
            moves.append(f"{id(block)}->{torch.device(args[0]).type}")
            return original(*args, **kwargs)
        block.to = recording
    enable_offload(pipe, "sequential", torch.device("cpu"))
    codes = pipe(["a red circle"], steps=2, seed=0, height=32, width=32, output_type="codes")
    assert torch.equal(codes, reference)  # placement never changes the numbers
    n_blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    # Brought in and sent back around each of its forwards: 2 steps x n blocks, once each way (the
    # transformer's own move to the CPU goes through Module._apply, not the blocks' .to).
    assert len(moves) == 2 * 2 * n_blocks


def test_offload_modes_check_the_device() -> None:
    for mode in ("model", "sequential"):
        with pytest.raises(InputError, match="CUDA GPU"):
            check_offload(mode, torch.device("cpu"))
    with pytest.raises(InputError, match="unknown --offload"):
        check_offload("disk", torch.device("cpu"))
    check_offload("none", torch.device("cpu"))
    with pytest.raises(InputError):
        Offloader({}, "none", "cpu")


def test_offload_on_a_cpu_only_run_is_one_error_and_writes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sample", "--model", str(tiny_model_dir), "--prompt", "a", "--out", str(out),
                                   "--device", "cpu", "--offload", "model"], env={"COLUMNS": "200"})
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: --offload model moves parts")
    assert not out.exists()
