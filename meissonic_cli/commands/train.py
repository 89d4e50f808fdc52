"""`meissonic train`: masked image modeling on token shards (see `meissonic_cli.train.trainer`).

Every `TrainConfig` field is a flag whose help is the field's documentation. Flags default to
"not given" so that a `--config` recipe supplies values and explicit flags override them.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, List, Optional

import typer

from meissonic_cli.config import flag_of, help_of
from meissonic_cli.train.config import TrainConfig
from ._common import handle_errors

_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": List[str]}


def _field_parameters() -> list[inspect.Parameter]:
    """One `typer.Option` per TrainConfig field, defaulting to None (= not given on the command line)."""
    params = []
    for f in dataclasses.fields(TrainConfig):
        kind = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        flag = flag_of(TrainConfig, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{help_of(TrainConfig, f.name)} [default: {default!r}]" if default not in ("", []) else help_of(TrainConfig, f.name)
        if kind is bool:
            decls = [f"{flag}/--no-{flag[2:]}"]
        else:
            decls = [flag]
        option = typer.Option(None, *decls, help=help_text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
    return params


def _train_command(**kwargs: Any) -> None:
    """Train or fine-tune a Meissonic transformer on token shards from `meissonic tokenize`.

    Settings: field defaults, then --config FILE (a recipe from pipelines/), then the flags given here.

    Under torchrun the same command runs DDP (or --fsdp): each rank reads its own shards; rank 0 writes checkpoints step-NNNNNNNN/, metrics.jsonl and train.log into --output.
    """
    from meissonic_cli.train.config import load_train_config

    config_file = kwargs.pop("config")
    print_config = kwargs.pop("print_config")
    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if v is not None and v != () and v != []}
    cfg = load_train_config(config_file, overrides)
    cfg.validate()
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from meissonic_cli.train.trainer import train

    train(cfg)


def register(app: typer.Typer) -> None:
    extra = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--config", help="YAML recipe (e.g. pipelines/stage1_256.yaml) of TrainConfig fields; flags override it.",
                                 show_default=False),
        ),
        inspect.Parameter(
            "print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--print-config", help="Print the resolved config as YAML and exit without training."),
        ),
    ]
    params = extra + _field_parameters()

    def train_command(**kwargs: Any) -> None:
        return _train_command(**kwargs)

    # Typer reads the options from the signature; building it from the dataclass keeps each field
    # documented once.
    train_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train_command.__annotations__ = {p.name: p.annotation for p in params}
    train_command.__doc__ = _train_command.__doc__
    app.command("train", no_args_is_help=True)(handle_errors(train_command))
