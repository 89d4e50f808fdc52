"""`TrainConfig`: every knob of `meissonic train`, documented once (the text is the `--help`).

A run's config comes from three layers, later ones winning: the dataclass defaults, a YAML recipe
(`--config pipelines/stage1_256.yaml`), then command-line flags. `load_train_config` applies the
first two; the CLI applies the flags with `update_from_dict`. `validate()` reports every problem
at once, naming the flag to fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meissonic_cli.config import (
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_LORA_RANK,
    MAX_SCORE,
    MAX_STEPS,
    Problems,
    field,
    flag_of,
    update_from_dict,
)
from meissonic_cli.device import DEVICE_CHOICES, valid_device_name
from meissonic_cli.errors import ConfigError, InputError
from meissonic_cli.model.hub import ALLOW_DOWNLOAD_HELP, VARIANT_HELP, VARIANTS

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPRESSION = ("auto", "on", "off")
OPTIMIZERS = ("adamw", "adamw8bit")
REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------
    data: str = field("", help="Token shard directory written by `meissonic tokenize` (tokens-NNNNN.tar + dataset.json).")
    output: str = field("", help="Run directory: checkpoints step-NNNNNNNN/, metrics.jsonl, samples/, train_config.yaml.",
                        flag="--out", short="-o", aliases=("--output",))
    resolution: int = field(256, help="Training resolution in pixels; the shards' code grids must be resolution/vq_factor on each side.")
    vq_factor: int = field(16, help="Pixels per VQ code along each side (the image tokenizer's downsampling factor).")
    shuffle: bool = field(True, help="Shuffle shard order and samples within each shard, afresh every epoch (deterministic from --seed).")

    # --- model ------------------------------------------------------------------------------
    model: str = field(
        "",
        help="Architecture of the transformer: a named config (1b = the released 1024px model, tiny = a test size), a "
        "transformer config.json or a model folder. Empty: take the architecture from --init.",
        flag="--arch",
        aliases=("--model",),
    )
    init: str = field(
        "",
        help="Released-layout folder (or its transformer/ subfolder), or a Hugging Face repo id (owner/name) in the "
        "local Hugging Face cache, whose weights start the run. When --arch adds the feature compression layers "
        "(downsample/upsample) that the --init weights lack, those layers start fresh.",
    )
    allow_download: bool = field(False, help=ALLOW_DOWNLOAD_HELP)
    variant: str = field("", help=VARIANT_HELP)
    base_model: str = field(
        "",
        help="Released-layout model folder whose vqvae/, tokenizer/, scheduler/ (and text_encoder/ unless it is trained) "
        "complete each checkpoint into a folder `meissonic sample` loads (hard links, no copies where possible) and "
        "decode validation samples. Empty: the --init folder, else the model tokenize used (dataset.json).",
    )
    feature_compression: str = field(
        "auto",
        help="auto keeps the architecture's own setting; on/off adds/removes the 2x2 feature compression layers "
        "(downsample/upsample). The paper trains 256/512 without them (off) and adds them for 1024 (on).",
    )
    text_encoder: str = field(
        "",
        help="Text encoder folder (Hugging Face CLIP text_encoder/, or a model folder holding one). Needed when captions "
        "are encoded online (--train-text-encoder, or shards without stored text features) and to encode the empty "
        "prompt for --cond-dropout. Empty: the encoder tokenize used (dataset.json), else the --init folder's.",
    )
    train_text_encoder: bool = field(False, help="Unfreeze and train the text encoder (paper stage 4); captions are encoded online.")
    text_encoder_lr: float = field(0.0, bounds=(0, 10), help="Learning rate of the text encoder when it is trained; 0 means --lr.")

    # --- objective ----------------------------------------------------------------------------
    min_masking_rate: float = field(0.0, help="Lower clip of the sampled masking rate r = cos(pi/2 u), u ~ U(0,1).")
    cond_dropout: float = field(
        0.1, help="Probability of replacing a sample's text sequence and pooled embedding with the empty prompt's (classifier-free guidance)."
    )
    score_micro_cond: bool = field(
        False,
        help="Feed each sample's preference score from the shards as the 5th micro-condition (paper stage 4). "
        "Otherwise every sample gets --default-score, the value sampling uses.",
    )
    default_score: float = field(6.0, bounds=(-MAX_SCORE, MAX_SCORE), help="Score micro-condition used when --score-micro-cond is off (the pipeline's default is 6).")

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = field(8, bounds=(1, MAX_BATCH), help="Samples per process per micro-step; the global batch is batch_size x grad_accum x processes.")
    grad_accum: int = field(1, bounds=(1, MAX_BATCH), help="Micro-steps accumulated into one optimizer step.")
    max_steps: int = field(1000, help="Optimizer steps to train for (a resumed run continues up to this count).")
    lr: float = field(1e-4, bounds=(0, 10), help="Peak learning rate (AdamW).")
    lr_schedule: str = field("constant", help="constant (paper stages 1-3) or cosine (decays to --min-lr-ratio x lr at --max-steps).")
    warmup_steps: int = field(0, help="Linear warm-up steps from 0 to --lr (both schedules).")
    min_lr_ratio: float = field(0.0, help="Final learning rate of the cosine schedule as a fraction of --lr.")
    weight_decay: float = field(0.01, bounds=(0, 100), help="AdamW weight decay; never applied to norms, biases or embeddings.")
    adam_beta1: float = field(0.9, help="AdamW beta1.")
    adam_beta2: float = field(0.999, help="AdamW beta2.")
    adam_eps: float = field(1e-8, help="AdamW epsilon.")
    max_grad_norm: float = field(1.0, help="Clip the global gradient norm to this value; 0 disables clipping.")
    precision: str = field("fp32", help="fp32, bf16 (autocast) or fp16 (autocast with loss scaling). Master weights stay fp32.")
    ema_decay: float = field(0.0, help="Keep an exponential moving average of the trained weights with this decay (e.g. 0.9999); 0 disables it.")
    ema_warmup: bool = field(
        True,
        help="Warm the EMA decay up as diffusers' EMAModel (the official trainer) does: min(decay, (1+t)/(10+t)) at "
        "update t after --ema-update-after-step. Off: the full decay from the first update. A resumed run keeps the "
        "setting its checkpoint recorded (off for checkpoints written before this option existed).",
    )
    ema_update_after_step: int = field(
        0, help="EMA updates before the average starts decaying; until then it copies the weights (diffusers' update_after_step)."
    )
    optimizer: str = field(
        "adamw", help="adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW, about a quarter of the optimizer memory; "
        "bitsandbytes comes with the train extra of meissonic)."
    )
    gradient_checkpointing: bool = field(False, help="Recompute transformer block activations in the backward pass to save memory.")
    compile: bool = field(False, help="Compile the transformer with torch.compile.")
    seed: int = field(0, help="Seed of weight init, data order, masking and condition dropout.")
    device: str = field("auto", help="auto (the process's CUDA device under torchrun, else cuda:0 when present, else CPU), cpu, cuda, cuda:N or mps.")

    # --- fine-tuning --------------------------------------------------------------------------
    lora_rank: int = field(0, bounds=(0, MAX_LORA_RANK), help="Train rank-r LoRA adapters on the attention projections instead of all weights (needs --init); 0 disables LoRA.")
    lora_alpha: float = field(0.0, help="LoRA scale numerator (update = alpha/rank * B A); 0 means alpha = rank.")
    save_merged: bool = field(False, help="With --lora-rank: also write each checkpoint's base weights with the adapter "
                                          "merged in (transformer/, a full released-layout model). Without it a "
                                          "checkpoint holds the adapter alone, in the PEFT and diffusers layouts (lora/).")

    # --- checkpoints and stability ------------------------------------------------------------
    checkpoint_every: int = field(1000, help="Write a checkpoint step-NNNNNNNN/ every this many steps (and always at the end).")
    keep_last: int = field(3, help="Keep only the newest N checkpoints; 0 keeps all.")
    resume: str = field("", help="auto (newest checkpoint in --out, if any) or a checkpoint directory to continue from.")
    nan_patience: int = field(
        3, help="After this many consecutive steps with a non-finite loss or gradient (each skipped), reload the last checkpoint."
    )

    # --- distributed --------------------------------------------------------------------------
    fsdp: bool = field(False, help="Under torchrun, shard parameters, gradients and optimizer state with FSDP instead of replicating them (DDP).")

    # --- logging and validation ---------------------------------------------------------------
    log_every: int = field(10, help="Refresh the progress line and the --report-to tracker every this many steps, and add the "
                           "window's loss per mask-rate bucket to metrics.jsonl (which gets every step).")
    report_to: str = field(
        "none",
        help="Scalar tracker besides metrics.jsonl: none, tensorboard (<output>/tensorboard) or wandb (honours "
        "WANDB_MODE, e.g. offline; files under $WANDB_DIR, else <output>/wandb; a resumed run continues the same "
        "wandb run). Validation grids are logged as images.",
    )
    tensorboard: bool = field(False, help="Deprecated: same as --report-to tensorboard.", hidden=True)
    curves: bool = field(True, help="Draw curves.png (loss overall and per mask-rate bucket, accuracy, lr) beside "
                         "metrics.jsonl at every checkpoint and at the end (needs matplotlib).")
    wandb_project: str = field("meissonic", help="wandb project of --report-to wandb (the run is named after --out).")
    validate_every: int = field(0, help="Sample --validation-prompt images every this many steps into <output>/samples/; 0 disables.")
    validation_prompts: list = field(
        default_factory=list, help="Prompt for validation samples (repeat the flag for several).", flag="--validation-prompt"
    )
    validation_steps: int = field(16, bounds=(1, MAX_STEPS), help="Sampling steps for validation images.")
    validation_cfg: float = field(9.0, bounds=(0, MAX_GUIDANCE), help="Classifier-free guidance scale for validation images.")

    # ------------------------------------------------------------------------------------------
    @property
    def tracker(self) -> str:
        """The effective --report-to (the deprecated --tensorboard switch selects tensorboard)."""
        return "tensorboard" if self.tensorboard and self.report_to == "none" else self.report_to

    @property
    def grid(self) -> int:
        """Code grid side implied by --resolution and --vq-factor."""
        return self.resolution // self.vq_factor

    def validate(self) -> "TrainConfig":
        p = Problems(self)

        def flag(name: str) -> str:
            return flag_of(TrainConfig, name)

        p.check(bool(self.data), f"{flag('data')} is required (a token shard directory from `meissonic tokenize`)")
        p.check(bool(self.output), f"{flag('output')} is required (the run directory)")
        p.check(bool(self.model or self.init), f"give {flag('model')} (an architecture) or {flag('init')} (weights to start from)")
        p.check(self.vq_factor > 0, f"{flag('vq_factor')} must be positive, got {self.vq_factor}")
        p.check(
            self.resolution > 0 and self.vq_factor > 0 and self.resolution % self.vq_factor == 0,
            f"{flag('resolution')} {self.resolution} must be a positive multiple of {flag('vq_factor')} {self.vq_factor}",
        )
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every", "nan_patience", "validation_steps"):
            value = getattr(self, name)
            p.check(isinstance(value, int) and value >= 1, f"{flag(name)} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "keep_last", "lora_rank", "validate_every", "ema_update_after_step"):
            value = getattr(self, name)
            p.check(isinstance(value, int) and value >= 0, f"{flag(name)} must be an integer >= 0, got {value!r}")
        p.check(self.lr > 0, f"{flag('lr')} must be positive, got {self.lr}")
        p.check(self.text_encoder_lr >= 0, f"{flag('text_encoder_lr')} must be >= 0, got {self.text_encoder_lr}")
        p.check(self.lr_schedule in LR_SCHEDULES, f"{flag('lr_schedule')} must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        p.check(self.precision in PRECISIONS, f"{flag('precision')} must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        p.check(self.feature_compression in COMPRESSION, f"{flag('feature_compression')} must be one of {', '.join(COMPRESSION)}, got {self.feature_compression!r}")
        p.check(valid_device_name(self.device), f"{flag('device')} must be one of {DEVICE_CHOICES}, got {self.device!r}")
        p.check(0.0 <= self.min_lr_ratio <= 1.0, f"{flag('min_lr_ratio')} must be in [0, 1], got {self.min_lr_ratio}")
        p.check(0.0 <= self.min_masking_rate < 1.0, f"{flag('min_masking_rate')} must be in [0, 1), got {self.min_masking_rate}")
        p.check(0.0 <= self.cond_dropout <= 1.0, f"{flag('cond_dropout')} must be in [0, 1], got {self.cond_dropout}")
        p.check(0.0 <= self.ema_decay < 1.0, f"{flag('ema_decay')} must be in [0, 1), got {self.ema_decay}")
        p.check(self.optimizer in OPTIMIZERS, f"{flag('optimizer')} must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        p.check(not (self.optimizer == "adamw8bit" and self.fsdp),
                f"{flag('optimizer')} adamw8bit with {flag('fsdp')} is not supported (bitsandbytes' optimizer does not take "
                "sharded parameters); use DDP or --optimizer adamw")
        p.check(self.report_to in REPORT_TO, f"{flag('report_to')} must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        p.check(not (self.tensorboard and self.report_to not in ("none", "tensorboard")),
                f"{flag('tensorboard')} (deprecated) means {flag('report_to')} tensorboard; it cannot be combined with "
                f"{flag('report_to')} {self.report_to}")
        p.check(bool(self.wandb_project.strip()), f"{flag('wandb_project')} must not be empty")
        p.check(self.weight_decay >= 0, f"{flag('weight_decay')} must be >= 0, got {self.weight_decay}")
        p.check(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, f"{flag('adam_beta1')}/{flag('adam_beta2')} must be in [0, 1)")
        p.check(self.adam_eps > 0, f"{flag('adam_eps')} must be positive, got {self.adam_eps}")
        p.check(self.max_grad_norm >= 0, f"{flag('max_grad_norm')} must be >= 0, got {self.max_grad_norm}")
        p.check(self.lora_alpha >= 0, f"{flag('lora_alpha')} must be >= 0, got {self.lora_alpha}")
        p.check(self.lora_rank == 0 or bool(self.init), f"{flag('lora_rank')} fine-tunes existing weights: give {flag('init')}")
        p.check(self.variant in ("", *VARIANTS), f"unknown {flag('variant')} {self.variant!r}; use {' or '.join(VARIANTS)}")
        p.check(
            not (self.lora_rank and self.train_text_encoder),
            f"{flag('lora_rank')} and {flag('train_text_encoder')} cannot be combined (LoRA adapts the transformer only)",
        )
        p.check(not self.save_merged or bool(self.lora_rank), f"{flag('save_merged')} is for LoRA runs (--lora-rank); "
                                                              "other runs always write transformer/")
        p.check(not (self.fsdp and self.lora_rank), f"{flag('fsdp')} with {flag('lora_rank')} is not supported; LoRA runs fit DDP")
        p.check(
            self.validate_every == 0 or bool(self.validation_prompts),
            f"{flag('validate_every')} needs at least one {flag('validation_prompts')}",
        )
        p.check(
            isinstance(self.validation_prompts, list) and all(isinstance(x, str) for x in self.validation_prompts),
            f"{flag('validation_prompts')} must be a list of strings",
        )
        p.check(self.resume in ("", "auto") or bool(self.resume.strip()), f"{flag('resume')} must be auto or a checkpoint directory")
        p.raise_if_any()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _coerce_types(values: dict[str, Any], source: str, config_type: type = TrainConfig) -> dict[str, Any]:
    """YAML writes 1e-4 as a string, ints where floats are meant and lists where comma-separated text is
    meant (`distill_steps: [4, 8]`): coerce each value to its field's type in `config_type`."""
    types = {f.name: f.type for f in dataclasses.fields(config_type)}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        name = key.replace("-", "_")
        kind = types.get(name)
        try:
            if value is None:
                problems.append(f"{source}: {key} has no value")
                continue
            if kind in ("float", float):
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif kind in ("int", int):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif kind in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError
            elif kind in ("str", str):
                if isinstance(value, list):
                    if not value or any(isinstance(v, (list, dict, bool)) or v is None for v in value):
                        raise ValueError
                    value = ",".join(str(v) for v in value)
                elif isinstance(value, (dict, bool)):
                    raise ValueError
                value = str(value)
            elif kind in ("list", list):
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list):
                    raise ValueError
        except (TypeError, ValueError, OverflowError):
            problems.append(f"{source}: {key} should be a {kind}, got {value!r}")
            continue
        out[key] = value
    if problems:
        raise ConfigError(problems)
    return out


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str, command: str = "train") -> TrainConfig:
    """`cfg` (a `TrainConfig` or a subclass) with `values` (field name -> value) applied; unknown names are
    reported by name, with the `meissonic COMMAND --help` that lists the fields."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(k for k in values if k.replace("-", "_") not in names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; run `meissonic {command} --help` for the fields")
    return update_from_dict(cfg, _coerce_types(values, source, type(cfg)), source)


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `overrides`; not yet validated."""
    cfg = TrainConfig()
    if path:
        cfg = apply_overrides(cfg, read_yaml_mapping(path), str(path))
    if overrides:
        cfg = apply_overrides(cfg, overrides, "command line")
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The recipe's mapping of field: value (`readers.read_yaml_mapping`: safe tags, bounded aliases, text keys)."""
    from meissonic_cli.readers import read_yaml_mapping as read_mapping

    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist; see pipelines/ for the recipes")
    return read_mapping(path, "config file")
