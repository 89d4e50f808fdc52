"""`meissonic info`: a model folder's transformer config, parameter counts and released-layout parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import typer

from meissonic_cli.config import field
from meissonic_cli.model.hub import ALLOW_DOWNLOAD_HELP, VARIANT_HELP

from ._options import Group, Options, command
from ._report import JSON_OPTION, report

# Sub-folders of a released model root and what each holds.
LAYOUT = {
    "transformer": "Meissonic transformer (config.json + safetensors)",
    "vqvae": "VQ image tokenizer",
    "text_encoder": "CLIP text encoder",
    "tokenizer": "CLIP tokenizer",
    "scheduler": "MaskGIT scheduler config",
}


@dataclass
class InfoConfig:
    """What `meissonic info` describes: a model folder or a named architecture; field help is the CLI help."""

    model: Optional[str] = field(None, help="Model root (with transformer/, vqvae/, ...), a transformer/ folder, or a "
                                            "Hugging Face repo id (owner/name) in the local Hugging Face cache.",
                                 short="-m")
    arch: Optional[str] = field(None, help="Instead of a folder, a named architecture built on the meta device: 1b "
                                           "(released) or tiny.", aliases=("--config",))
    allow_download: bool = field(False, help=ALLOW_DOWNLOAD_HELP)
    variant: Optional[str] = field(None, help=VARIANT_HELP)


def register(app: typer.Typer) -> None:
    @command(app, "info", [Group(InfoConfig, key="info")], extra=[JSON_OPTION], no_args_is_help=True)
    def info_command(opts: Options, json_out: bool = False) -> None:
        """Print the transformer config, parameter counts and which parts of the released layout exist."""
        with report(json_out) as out:
            _info(opts, out)


def _info(opts: Options, out: Any) -> None:
    """The tables of `meissonic info` (and the same facts as `out.data` for --json)."""
    from pathlib import Path

    from rich.table import Table

    from meissonic_cli.errors import InputError
    from meissonic_cli.model.hub import resolve_model_folder
    from meissonic_cli.model.transformer import (
        NAMED_CONFIGS,
        TransformerConfig,
        build_on_meta,
        check_state_dict,
        num_parameters,
        parameter_counts,
        transformer_folder,
        weight_shapes,
    )

    model, arch = opts.get("info", "model"), opts.get("info", "arch")
    if (model is None) == (arch is None):
        raise InputError("give exactly one of --model DIR or --arch NAME (e.g. meissonic info --arch 1b)")
    console = out.console
    weights_note = None
    if arch is not None:
        if arch not in NAMED_CONFIGS:
            raise InputError(f"unknown --arch {arch!r}; choose one of {', '.join(NAMED_CONFIGS)}")
        cfg = NAMED_CONFIGS[arch]()
        title = f"architecture {arch}"
    else:
        model = resolve_model_folder(model, opts.get("info", "allow_download"))
        tdir = transformer_folder(model)
        cfg = TransformerConfig.from_json(tdir / "config.json")
        _check_part_configs(Path(model))
        title = str(tdir)
    meta_model = build_on_meta(cfg)
    if arch is None:
        stored = weight_shapes(tdir, opts.get("info", "variant"))
        check_state_dict(meta_model, {k: shape for k, (shape, _) in stored.items()}, f"weights in {tdir}")
        dtypes = sorted({dtype for _, dtype in stored.values()})
        weights_note = f"{len(stored)} tensors, dtype {', '.join(dtypes)}, keys and shapes match the config"

    table = Table(title=f"Transformer config ({title})")
    table.add_column("field")
    table.add_column("value")
    for key, value in cfg.to_json_dict().items():
        if not key.startswith("_"):
            table.add_row(key, str(value))
    table.add_row("hidden width (derived)", str(cfg.inner_dim))
    table.add_row("mask token id (derived)", str(cfg.mask_token_id))
    console.print(table)

    counts = Table(title="Parameters")
    counts.add_column("prefix")
    counts.add_column("parameters", justify="right")
    for prefix, n in parameter_counts(meta_model).items():
        counts.add_row(prefix, f"{n:,}")
    total = num_parameters(meta_model)
    counts.add_row("total", f"{total:,}", style="bold")
    counts.add_row("total without compression layers", f"{num_parameters(meta_model, exclude_compression=True):,}")
    out.data = {"title": title, "config": {k: v for k, v in cfg.to_json_dict().items() if not k.startswith("_")},
                "inner_dim": cfg.inner_dim, "mask_token_id": cfg.mask_token_id,
                "parameters": {**parameter_counts(meta_model), "total": total,
                               "total_without_compression": num_parameters(meta_model, exclude_compression=True)},
                "weights": weights_note}
    console.print(counts)
    if weights_note:
        console.print(f"Weights: {weights_note}", highlight=False)

    if model is not None:
        root = Path(model)
        if (root / "transformer").is_dir() or root.resolve() != tdir.resolve():
            parts = Table(title="Released layout")
            parts.add_column("folder")
            parts.add_column("present")
            parts.add_column("holds")
            for name, what in LAYOUT.items():
                parts.add_row(f"{name}/", "yes" if (root / name).is_dir() else "no", what)
            out.data["layout"] = {name: (root / name).is_dir() for name in LAYOUT}
            console.print(parts)
        else:
            console.print("(a transformer folder on its own; no other parts of the released layout)", highlight=False)


def _check_part_configs(root: Any) -> None:
    """The checks loading applies to `vqvae/config.json` and `text_encoder/config.json`, when present."""
    from meissonic_cli.config import read_json_object

    vq_config = root / "vqvae" / "config.json"
    if vq_config.is_file():
        from meissonic_cli.model.vq.config_check import check_vq_config

        config = read_json_object(vq_config)
        if config.get("_class_name", "VQModel") == "VQModel":
            check_vq_config(config, vq_config)
    te_config = root / "text_encoder" / "config.json"
    if te_config.is_file():
        from meissonic_cli.model.text_encoder import TextEncoderConfig

        TextEncoderConfig.from_hf(read_json_object(te_config), str(te_config))
