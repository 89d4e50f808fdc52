"""`DistillConfig`: every knob of `meissonic distill` (the `TrainConfig` fields plus the teacher and the
objective), documented once; `load_distill_config` layers defaults, a YAML recipe and flags. No torch
import here, so the command's `--help` stays fast. The loop is `train/distill.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meissonic_cli.config import Problems, field, flag_of, parse_temperature
from meissonic_cli.errors import InputError
from meissonic_cli.train.config import PRECISIONS, TrainConfig, apply_overrides, read_yaml_mapping

LOSSES = ("kl", "ce")
TIMESTEP_MODES = ("sampler", "rollout", "train")
MAX_GUIDANCE = 100.0
# Fields of the teacher and the student that must agree: the tokens, the code grid, the text features.
PAIRED_FIELDS = ("vocab_size", "codebook_size", "downsample", "upsample", "joint_attention_dim", "pooled_projection_dim")


@dataclass
class DistillConfig(TrainConfig):
    """`TrainConfig` plus the teacher and the distillation objective (the student is `--init`, by default the teacher)."""

    teacher: str = field("", help="Teacher model folder (released layout, or its transformer/ folder) whose classifier-free-"
                         "guided logits the student learns; frozen, in eval mode. --init (the student's start) defaults to it.")
    guidance_min: float = field(1.0, help="Smallest guidance scale drawn per sample (uniformly in [--guidance-min, --guidance-max]).")
    guidance_max: float = field(10.0, help="Largest guidance scale drawn per sample; sample the student within the range it learned.")
    distill_loss: str = field("kl", help="kl: KL(teacher || student) of the guided distributions at the masked positions (0 "
                              "when they agree); ce: the soft-target cross-entropy (same gradients, plus the teacher's entropy).")
    distill_timesteps: str = field(
        "sampler", help="sampler: masking states and timesteps as a sampling run of --distill-steps steps visits them (the "
        "sampler passes the step index as timestep), the masked positions drawn at random; rollout: the states the "
        "student's own sampling runs visit (no gradient; one step count n per batch, ceil(batch/n) captions each give "
        "all n states, about one extra student forward per batch; --rollout-temperature, --rollout-token-temperature); "
        "train: the trainer's masking rate r = cos(pi/2 u) and timestep r*1000.")
    distill_steps: str = field("4,8,16,32,48", help="Comma-separated step counts whose sampling states --distill-timesteps "
                               "sampler draws from (one count per sample, uniformly).")
    distill_temperature: float = field(
        1.0, bounds=(0.01, 100.0), help="Both distributions are compared at logits / T (knowledge-distillation temperature). T < 1 sharpens "
        "them toward the codes a sampler at --token-temperature T draws; 1 compares the guided distributions as they are.")
    step_distill: int = field(
        1, bounds=(1, 16), help="Teacher steps per student step (step distillation, as SDTT does for masked diffusion: Deschenaux & "
        "Gulcehre 2025). 1: the target is the teacher's guided logits at the student's state. K > 1: from the state "
        "before step i of an n-step run the teacher decodes steps K*i .. K*i+K-1 of a K*n-step run (guided, "
        "--rollout-temperature, --rollout-token-temperature), and each position's target is its guided logits at the "
        "step that decided it (the last step's where still masked); costs K teacher evaluations per sample. Needs "
        "--distill-timesteps sampler or rollout.")
    rollout_temperature: str = field("1,0", help="Masking temperature (start,end or one number; `sample --temperature`) "
                                     "of the sampling runs --distill-timesteps rollout and --step-distill take.")
    rollout_token_temperature: float = field(
        1.0, bounds=(0.01, 100.0), help="Token temperature (`sample --token-temperature`) of the sampling runs --distill-timesteps rollout "
        "and --step-distill take: codes are drawn from softmax(logits / T).")
    teacher_precision: str = field("fp32", help="Dtype of the teacher's weights: fp32, bf16 or fp16 (lower precision is "
                                   "faster on GPUs; the targets are computed in float32 from its logits).")

    @property
    def guidance_embeds(self) -> bool:
        """The student has a guidance embedding (`masked_model.resolve_model_config` reads this)."""
        return True

    @property
    def rollout_temperatures(self) -> tuple[float, float]:
        """--rollout-temperature as (start, end); one number tau means (tau, 0.01), as the scheduler reads it."""
        parsed = parse_temperature(self.rollout_temperature, "--rollout-temperature")
        return parsed if isinstance(parsed, tuple) else (parsed, 0.01)

    @property
    def step_counts(self) -> list[int]:
        return [int(x) for x in str(self.distill_steps).split(",") if x.strip()]

    def validate(self) -> "DistillConfig":
        p = Problems(self)

        def flag(name: str) -> str:
            return flag_of(DistillConfig, name)

        p.check(bool(self.teacher), f"{flag('teacher')} is required (the model folder whose guided logits the student learns)")
        if self.teacher and not self.init:
            self.init = self.teacher
        # A LoRA student's adapters need the guidance embedding its base lacks: its checkpoints are always
        # whole model folders (the adapters are written beside them in lora/ as for train).
        if self.lora_rank:
            self.save_merged = True
        for name in ("guidance_min", "guidance_max"):
            value = getattr(self, name)
            p.check(isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_GUIDANCE,
                    f"{flag(name)} must be a guidance scale in [0, {MAX_GUIDANCE:g}], got {value!r}")
        p.check(not (self.guidance_min > self.guidance_max),
                f"{flag('guidance_min')} ({self.guidance_min}) must not exceed {flag('guidance_max')} ({self.guidance_max})")
        p.check(self.distill_loss in LOSSES, f"{flag('distill_loss')} must be one of {', '.join(LOSSES)}, got {self.distill_loss!r}")
        p.check(self.distill_timesteps in TIMESTEP_MODES,
                f"{flag('distill_timesteps')} must be one of {', '.join(TIMESTEP_MODES)}, got {self.distill_timesteps!r}")
        try:
            counts = self.step_counts
        except ValueError:
            counts = []
        p.check(bool(counts) and all(1 <= n <= 1000 for n in counts),
                f"{flag('distill_steps')} must be comma-separated step counts in 1..1000, got {self.distill_steps!r}")
        try:
            parse_temperature(self.rollout_temperature, flag("rollout_temperature"))
        except InputError as err:
            p.check(False, str(err))
        p.check(self.step_distill == 1 or self.distill_timesteps != "train",
                f"{flag('step_distill')} > 1 follows sampling runs: use {flag('distill_timesteps')} sampler or rollout")
        p.check(self.teacher_precision in PRECISIONS,
                f"{flag('teacher_precision')} must be one of {', '.join(PRECISIONS)}, got {self.teacher_precision!r}")
        p.check(not self.train_text_encoder, "--train-text-encoder is not supported by distill: teacher and student read the "
                "same text features")
        p.raise_if_any()
        super().validate()
        return self


def load_distill_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults, then the YAML recipe at `path`, then `overrides` (field name -> value); not yet validated."""
    cfg = DistillConfig()
    layers = ([(read_yaml_mapping(path), str(path))] if path else []) + ([(overrides, "command line")] if overrides else [])
    for values, source in layers:
        cfg = apply_overrides(cfg, values, source, command="distill")
    return cfg


__all__ = ["LOSSES", "PAIRED_FIELDS", "TIMESTEP_MODES", "DistillConfig", "load_distill_config"]
