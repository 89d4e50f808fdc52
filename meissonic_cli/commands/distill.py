"""`meissonic distill`: guidance distillation of a model into a one-forward student (see `meissonic_cli.train.distill`).

Every `DistillConfig` field is a flag (the `train` flags plus the teacher and the objective); only the
flags given override the `--config` recipe, which overrides the field defaults.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from meissonic_cli.config import flag_of

from ._common import fail
from ._options import Group, Options, command, extra_option
from ._report import JSON_OPTION, rank_zero, report
from .train import result_data

# Train flags that mean nothing here: the teacher's empty prompt is the unconditional half of every
# target (no condition dropout), and teacher and student read the same frozen text features.
EXCLUDED = ("cond_dropout", "train_text_encoder", "text_encoder_lr")


def _distill_command(opts: Options, config: Optional[Path] = None, print_config: bool = False,
                     json_out: bool = False) -> None:
    """Distil classifier-free guidance into a student that samples with one forward per step.

    The student (--init, default the --teacher) gets a guidance embedding and learns the teacher's guided logits
    uncond + g*(cond - uncond) for g in [--guidance-min, --guidance-max]. Checkpoints step-NNNNNNNN/ in --out are
    model folders (transformer/config.json has guidance_embeds: true) that sample, edit and eval run with one
    forward per step, --guidance-scale fed to the embedding. Everything of `meissonic train` applies: resume,
    EMA, LoRA, torchrun DDP/FSDP.
    """
    from meissonic_cli.train.distill_config import DistillConfig, load_distill_config

    overrides = opts.given("distill")
    cfg = load_distill_config(config, overrides)
    cfg.validate()
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from meissonic_cli.train.distill import distill

    try:
        with report(json_out and rank_zero()) as out:
            out.data = result_data(distill(cfg))
    except KeyboardInterrupt:
        parts = ["meissonic", "distill"] + (["--config", str(config)] if config else [])
        for name, value in overrides.items():
            if name != "resume":
                flag = flag_of(DistillConfig, name)
                parts += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
        raise fail(f"interrupted; the checkpoints in {cfg.output} are kept. Resume with: "
                   f"{shlex.join(parts + ['--resume', 'auto'])}", 130) from None


def register(app: typer.Typer) -> None:
    from meissonic_cli.train.distill_config import DistillConfig

    extra = [
        extra_option("config", Optional[Path], typer.Option(
            None, "--config", help="YAML recipe (e.g. pipelines/distill/demo_distill.yaml) of DistillConfig fields; flags "
            "override it.", show_default=False)),
        extra_option("print_config", bool, typer.Option(
            False, "--print-config", metavar="", help="Print the resolved config as YAML and exit without training.")),
        JSON_OPTION,
    ]
    command(app, "distill", [Group(DistillConfig, key="distill", exclude=EXCLUDED)], extra=extra,
            no_args_is_help=True)(_distill_command)
