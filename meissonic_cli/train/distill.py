"""Guidance distillation behind `meissonic distill`: a student that gives the teacher's classifier-free-guided
logits in ONE forward, the guidance scale an input (as FLUX-dev is distilled; Meng et al., "On Distillation of
Guided Diffusion Models", CVPR 2023, stage one).

The student is the teacher's architecture with a guidance embedding (`guidance_embeds: true`,
`time_text_embed.guidance_embedder`, diffusers' naming), initialised from the teacher (or from --init)
with the embedding's output layer at zero, so it starts as the teacher's conditional model. One step,
per sample:
1. a masking state: with --distill-timesteps sampler (default) a step count n from --distill-steps and a
   step i < n, the state a sampling run is in before step i (cosine schedule: round(L cos(pi/2 i/n))
   tokens masked, at least one) and the timestep the sampler passes there (n-1-i); with `train` the
   trainer's masking rate r = cos(pi/2 u) and timestep r*1000;
2. a guidance scale g ~ U(--guidance-min, --guidance-max);
3. the teacher (frozen, eval mode, --teacher-precision) runs the empty prompt's and the caption's
   features over the masked tokens, and the target is `uncond + g * (cond - uncond)`, the sampler's mix
   (`sample.pipeline.exact_logits`);
4. the student runs once with g fed to its embedding, and the loss is KL(teacher || student) (or the
   soft-target cross-entropy, --distill-loss ce) over the masked positions, on the VQ's codes.

Everything else is `train.trainer.Trainer`: the token shard stream, AdamW and its schedule, EMA, LoRA
(the adapters then also cover the guidance embedding), DDP/FSDP, NaN guard, checkpoints in the released
layout (config.json with `guidance_embeds: true`) and bit-exact resume. `DistillTrainer` overrides only
the per-micro-step loss and the need for the empty prompt's features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from meissonic_cli.device import dtype_table
from meissonic_cli.errors import ConfigError
from meissonic_cli.model.transformer import CONFIG_NAME, MeissonicTransformer, TransformerConfig, transformer_folder
from meissonic_cli.train.distill_config import LOSSES, PAIRED_FIELDS, DistillConfig, load_distill_config
from meissonic_cli.train.distributed import DistEnv
from meissonic_cli.train.masked_model import resolve_model_config
from meissonic_cli.train.objective import IGNORE_INDEX, Batch, mask_tokens, masked_token_stats, sample_masking_rates
from meissonic_cli.train.trainer import Trainer, TrainResult, train

# ----------------------------------------------------------------------------------------------
# The objective


def check_pairing(teacher: TransformerConfig, student: TransformerConfig, teacher_source: str) -> None:
    """ConfigError unless the student can learn the teacher's logits: same tokens, code grid and text features."""
    if teacher.guidance_embeds:
        raise ConfigError(f"--teacher {teacher_source} is itself guidance-distilled (guidance_embeds: true); distill from the "
                          "classifier-free-guided model it came from")
    diff = [f"{name} {getattr(teacher, name)!r} vs {getattr(student, name)!r}" for name in PAIRED_FIELDS
            if getattr(teacher, name) != getattr(student, name)]
    if diff:
        raise ConfigError(f"teacher {teacher_source} and student do not pair (teacher vs student: {'; '.join(diff)}): they must "
                          "share the token vocabulary, the code grid (compression) and the text features")


def guided_logits(teacher: MeissonicTransformer, tokens: torch.Tensor, timestep: torch.Tensor, micro: torch.Tensor,
                  text: torch.Tensor, pooled: torch.Tensor, empty_text: torch.Tensor, empty_pooled: torch.Tensor,
                  scales: torch.Tensor) -> torch.Tensor:
    """The teacher's guided logits (B, K, H, W) in float32: `uncond + g * (cond - uncond)` per sample.

    One batch of 2B rows [empty prompt, caption] over the same tokens, as `sample.pipeline.exact_logits`
    runs it (the sampler's mix; there `g` is one number, here one per sample). `timestep` is (B,).
    """
    b = tokens.shape[0]
    dtype = teacher.dtype
    both = teacher(torch.cat([tokens, tokens]), torch.cat([empty_text.expand(b, -1, -1), text]).to(dtype),
                   torch.cat([empty_pooled.expand(b, -1), pooled]).to(dtype), torch.cat([timestep, timestep]),
                   micro_conds=torch.cat([micro, micro]))
    uncond, cond = both.float().chunk(2)
    return uncond + scales.float().view(-1, 1, 1, 1).to(uncond.device) * (cond - uncond)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, kind: str = "kl",
                      num_codes: int | None = None) -> torch.Tensor:
    """Mean over masked positions (labels != -100) of KL(p_teacher || p_student), or of the soft-target
    cross-entropy (`ce`); logits (B, K, H, W), distributions over the first `num_codes` codes."""
    b, k = student_logits.shape[:2]
    keep = (labels.reshape(b, -1) != IGNORE_INDEX)
    n = num_codes or k

    def at_masked(logits: torch.Tensor) -> torch.Tensor:
        return logits.reshape(b, k, -1).transpose(1, 2)[keep][:, :n].float()  # (M, n)

    log_s = F.log_softmax(at_masked(student_logits), dim=-1)
    log_t = F.log_softmax(at_masked(teacher_logits), dim=-1)
    if kind == "kl":
        per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "ce":
        per_position = -(log_t.exp() * log_s).sum(-1)
    else:
        raise ConfigError(f"unknown distillation loss {kind!r}; use one of {', '.join(LOSSES)}")
    return per_position.mean()


def sampler_states(n: int, counts: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masking rates, timesteps), each (n,), of states a sampling run visits: a step count c from `counts`
    and a step i < c per sample; rate cos(pi/2 i/c) (before step i, cosine schedule), timestep c-1-i."""
    c = torch.tensor(counts, dtype=torch.float32)[torch.randint(len(counts), (n,), generator=generator)]
    i = torch.floor(torch.rand(n, generator=generator) * c).clamp(max=c - 1)
    return torch.cos(i / c * (math.pi / 2)), c - 1 - i


# ----------------------------------------------------------------------------------------------
# The trainer


class DistillTrainer(Trainer):
    """`Trainer` whose micro-step loss is the distillation loss against a frozen teacher."""

    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, env: DistEnv | None = None):
        cfg.validate()
        tdir = transformer_folder(cfg.teacher)
        teacher_config = TransformerConfig.from_json(tdir / CONFIG_NAME)
        check_pairing(teacher_config, resolve_model_config(cfg), str(cfg.teacher))
        super().__init__(cfg, env)
        dtype = dtype_table()[cfg.teacher_precision]
        self.teacher = MeissonicTransformer.from_pretrained(tdir, dtype=dtype, device=self.device).eval().requires_grad_(False)
        codes = self.info.get("codebook_size")
        self.num_codes = int(codes) if codes is not None and int(codes) < self.model_config.codebook_size else None

    def _check_text_features(self) -> None:
        if not self.online_text and self._text_encoder_folder() is None:
            raise ConfigError("distill needs the empty prompt's text features (the unconditional half of every target): "
                              "give --text-encoder (the encoder tokenize used), or a --teacher/--init folder with text_encoder/")
        super()._check_text_features()

    def _needs_empty_prompt_encoder(self) -> bool:
        # The unconditional half of every guided target is the empty prompt's.
        return not self.online_text

    def _empty_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.empty_text is None:
            with torch.no_grad():
                seq, pooled = self.text_encoder.encode([""])
            self.empty_text, self.empty_pooled = seq.float().cpu(), pooled.float().cpu()
        return self.empty_text, self.empty_pooled

    def micro_step_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, draw guidance scales, teacher targets (no grad), one student forward; (loss, mean masking rate)."""
        cfg, g, dev = self.cfg, self.generator, self.device
        b = batch.codes.shape[0]
        if cfg.distill_timesteps == "sampler":
            rates, timesteps = sampler_states(b, cfg.step_counts, g)
        else:
            rates = sample_masking_rates(b, g, cfg.min_masking_rate)
            timesteps = rates * 1000
        inputs, labels = mask_tokens(batch.codes, rates, self.model_config.mask_token_id, g)
        scales = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=g)
        empty_text, empty_pooled = self._empty_features()
        if self.online_text:
            with torch.no_grad(), self._autocast():
                text, pooled = self.text_encoder(self.text_encoder.tokenize(batch.captions).to(dev))
        else:
            text, pooled = batch.text, batch.pooled
        text, pooled = text.float().to(dev), pooled.float().to(dev)
        inputs, micro, timesteps = inputs.to(dev), batch.micro.to(dev), timesteps.to(dev)
        with torch.no_grad():
            target = guided_logits(self.teacher, inputs, timesteps, micro, text, pooled, empty_text.to(dev),
                                   empty_pooled.to(dev), scales)
        with self._autocast():
            logits = self.wrapped(inputs, timesteps, micro, self.img_ids, self.txt_ids, text=text, pooled=pooled,
                                  guidance=scales.to(dev))
        loss = distillation_loss(logits, target, labels.to(dev), cfg.distill_loss, self.num_codes)
        # The curves (accuracy against the true tokens, cross-entropy per mask-rate bucket) as `train` logs them.
        self.last_token_stats = masked_token_stats(logits, labels.to(dev))
        return loss, rates.mean()


def distill(cfg: DistillConfig) -> TrainResult:
    """Run `meissonic distill`: one process, or one rank under torchrun (the trainer's `train` with this trainer)."""
    return train(cfg, DistillTrainer)


__all__ = ["DistillConfig", "DistillTrainer", "check_pairing", "distill", "distillation_loss", "guided_logits",
           "load_distill_config", "sampler_states"]
