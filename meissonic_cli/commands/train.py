"""`meissonic train`: masked image modeling on token shards (see `meissonic_cli.train.trainer`).

Every `TrainConfig` field is a flag whose help is the field's documentation (`_options.py`). Only
the flags given override the `--config` recipe, which overrides the field defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from meissonic_cli.config import flag_of
from meissonic_cli.train.config import TrainConfig

from ._common import fail
from ._options import Group, Options, command, extra_option
from ._report import JSON_OPTION, rank_zero, report


def result_data(result: Any) -> dict[str, Any]:
    """`--json`'s document for a finished `train`/`distill` run: the TrainResult plus the final loss."""
    last = [v for _, v in sorted(result.losses.items())][-10:]
    losses = {str(k): v for k, v in sorted(result.losses.items())}
    return {**{k: v for k, v in vars(result).items() if k != "losses"}, "final_loss": sum(last) / len(last) if last else None,
            "losses": losses}


def _train_command(opts: Options, config: Optional[Path] = None, print_config: bool = False,
                   json_out: bool = False) -> None:
    """Train or fine-tune a Meissonic transformer on token shards from `meissonic tokenize`.

    Settings: field defaults, then --config FILE (a recipe from pipelines/), then the flags given here.

    Under torchrun the same command runs DDP (or --fsdp): each rank reads its own shards; rank 0 writes checkpoints step-NNNNNNNN/, metrics.jsonl and train.log into --out.
    """
    from meissonic_cli.train.config import load_train_config

    config_file = config
    overrides = opts.given("train")
    cfg = load_train_config(config_file, overrides)
    cfg.validate()
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from meissonic_cli.train.trainer import train

    try:
        with report(json_out and rank_zero()) as out:
            out.data = result_data(train(cfg))
    except KeyboardInterrupt:
        raise fail(f"interrupted; the checkpoints in {cfg.output} are kept. Resume with: "
                   f"{_resume_command(config_file, overrides)}", 130) from None


def _resume_command(config_file: Optional[Path], overrides: dict[str, Any]) -> str:
    """The command line that continues an interrupted run: the same settings plus `--resume auto`."""
    import os
    import shlex

    parts = ["meissonic", "train"] + (["--config", str(config_file)] if config_file else [])
    for name, value in overrides.items():
        if name == "resume":
            continue
        flag = flag_of(TrainConfig, name)
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            for item in value if isinstance(value, list) else [value]:
                parts += [flag, str(item)]
    command = shlex.join(parts + ["--resume", "auto"])
    return f"torchrun <the same launcher options> -m meissonic_cli {command[len('meissonic '):]}" \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else command


def register(app: typer.Typer) -> None:
    extra = [
        extra_option("config", Optional[Path], typer.Option(
            None, "--config", help="YAML recipe (e.g. pipelines/stage1_256.yaml) of TrainConfig fields; flags override it.",
            show_default=False)),
        extra_option("print_config", bool, typer.Option(
            False, "--print-config", metavar="", help="Print the resolved config as YAML and exit without training.")),
        JSON_OPTION,
    ]
    command(app, "train", [Group(TrainConfig, key="train")], extra=extra, no_args_is_help=True)(_train_command)
