"""Guidance distillation behind `meissonic distill`: a student that gives the teacher's classifier-free-guided
logits in ONE forward, the guidance scale an input (as FLUX-dev is distilled; Meng et al., "On Distillation of
Guided Diffusion Models", CVPR 2023, stage one).

The student is the teacher's architecture with a guidance embedding (`guidance_embeds: true`,
`time_text_embed.guidance_embedder`, diffusers' naming), initialised from the teacher (or from --init)
with the embedding's output layer at zero, so it starts as the teacher's conditional model. One step,
per sample:
1. a masking state: with --distill-timesteps sampler (default) a step count n from --distill-steps and a
   step i < n, the state a sampling run is in before step i (cosine schedule: round(L cos(pi/2 i/n))
   tokens masked, at least one, at random positions) and the timestep the sampler passes there (n-1-i);
   with `rollout` the state the student's OWN n-step sampling run is in before step i (no gradient: the
   masked positions are the ones its sampler left, the known tokens its own draws; on-policy, as Di[M]O,
   Zhu et al. 2025, trains its one-step generator on its own outputs); with `train` the trainer's masking
   rate r = cos(pi/2 u) and timestep r*1000;
2. a guidance scale g ~ U(--guidance-min, --guidance-max);
3. the teacher (frozen, eval mode, --teacher-precision) runs the empty prompt's and the caption's
   features over the masked tokens, and the target is `uncond + g * (cond - uncond)`, the sampler's mix
   (`sample.pipeline.exact_logits`). With --step-distill K > 1 (step distillation) the teacher instead
   decodes K steps of a K*n-step run from that state and each position's target is its guided logits at
   the step that decided it (the last step's where still masked): one student step learns K teacher
   steps, as SDTT (Deschenaux & Gulcehre, "Beyond Autoregression: Fast LLMs via Self-Distillation Through
   Time", ICLR 2025) does for masked diffusion language models and progressive distillation (Salimans &
   Ho, ICLR 2022) for diffusion;
4. the student runs once with g fed to its embedding, and the loss is KL(teacher || student) (or the
   soft-target cross-entropy, --distill-loss ce) over the masked positions, on the VQ's codes, both
   distributions at logits / --distill-temperature.

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
                      num_codes: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions (labels != -100) of KL(p_teacher || p_student), or of the soft-target
    cross-entropy (`ce`); logits (B, K, H, W), distributions over the first `num_codes` codes, both taken at
    logits / `temperature`."""
    b, k = student_logits.shape[:2]
    keep = (labels.reshape(b, -1) != IGNORE_INDEX)
    n = num_codes or k

    def at_masked(logits: torch.Tensor) -> torch.Tensor:
        return logits.reshape(b, k, -1).transpose(1, 2)[keep][:, :n].float() / temperature  # (M, n)

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


def masked_after(step: torch.Tensor, total: int, length: int, masked_now: torch.Tensor) -> torch.Tensor:
    """Tokens still masked after step `step` (per row) of a `total`-step cosine run over `length` tokens, from
    `masked_now` masked before it: floor(L cos(pi/2 (s+1)/N)) kept within [1, masked_now - 1], 0 after the
    last step (the official scheduler's rule, `model.scheduler.MaskGITScheduler.step`)."""
    raw = torch.floor(length * torch.cos((step.float() + 1) / total * (math.pi / 2)))
    kept = torch.maximum(torch.minimum(masked_now.float() - 1, raw), torch.ones_like(raw))
    return torch.where(step >= total - 1, torch.zeros_like(kept), kept).long()


def decode_step(logits: torch.Tensor, tokens: torch.Tensor, still_masked: torch.Tensor, temperature: torch.Tensor,
                token_temperature: float, mask_id: int, num_codes: int | None,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One MaskGIT step per row, each row with its own count and temperature: draw a code for every masked
    position from softmax(logits / token_temperature), then re-mask the `still_masked` (B,) least confident
    (log-probability of the drawn code plus `temperature` (B,) times Gumbel noise), the official rule.
    logits (B, K, H, W) float; returns (tokens (B, H, W), decided (B, L) bool: unmasked by this step)."""
    b = tokens.shape[0]
    flat = tokens.reshape(b, -1)
    length = flat.shape[1]
    masked = flat == mask_id
    n = num_codes or logits.shape[1]
    probs = (logits.reshape(b, logits.shape[1], length).transpose(1, 2)[..., :n].float().cpu() / token_temperature).softmax(-1)
    draws = torch.multinomial(probs.reshape(-1, n), 1, generator=generator).view(b, length)
    chosen = probs.gather(-1, draws[..., None])[..., 0]
    uniform = torch.rand(b, length, generator=generator)
    gumbel = -torch.log((-torch.log(uniform.clamp(1e-20))).clamp(1e-20))
    confidence = torch.log(chosen.clamp(1e-20)) + temperature.view(b, 1).float() * gumbel
    confidence = torch.where(masked.cpu(), confidence, torch.full_like(confidence, math.inf))
    rank = confidence.argsort(dim=1).argsort(dim=1).to(flat.device)
    still = masked & (rank < still_masked.to(flat.device).view(b, 1))
    out = torch.where(masked, draws.to(flat.device), flat)
    out = torch.where(still, torch.full_like(out, mask_id), out)
    return out.view_as(tokens), masked & ~still


def run_temperatures(step: torch.Tensor, total: int, temperatures: tuple[float, float]) -> torch.Tensor:
    """The masking temperature at step `step` (per row) of a `total`-step run: linspace(start, end, total)[step]."""
    return torch.linspace(temperatures[0], temperatures[1], total)[step.long().cpu()]


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

    def _caption_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.online_text:
            with torch.no_grad(), self._autocast():
                text, pooled = self.text_encoder(self.text_encoder.tokenize(batch.captions).to(self.device))
        else:
            text, pooled = batch.text, batch.pooled
        return text.float().to(self.device), pooled.float().to(self.device)

    def rollout_states(self, n: int, text: torch.Tensor, pooled: torch.Tensor, micro: torch.Tensor, scales: torch.Tensor,
                       grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The states the student's own n-step sampling runs visit (--distill-timesteps rollout; no gradient).

        The first c = ceil(B/n) captions are sampled for n steps, one forward per step at their guidance scales;
        row j of the returned batch is caption j % c before step j // c. Returns (tokens (B, H, W), step index (B,),
        caption index (B,))."""
        b, mask_id = text.shape[0], self.model_config.mask_token_id
        c = -(-b // n)
        length = grid[0] * grid[1]
        tokens = torch.full((c, *grid), mask_id, dtype=torch.long, device=self.device)
        states = []
        with torch.no_grad(), self._autocast():
            for i in range(n):
                states.append(tokens)
                if i == n - 1:
                    break
                logits = self.wrapped(tokens, torch.full((c,), float(n - 1 - i), device=self.device), micro[:c], self.img_ids,
                                      self.txt_ids, text=text[:c], pooled=pooled[:c], guidance=scales[:c])
                step = torch.full((c,), i)
                now = (tokens.reshape(c, -1) == mask_id).sum(1).cpu()
                tokens, _ = decode_step(logits.float(), tokens, masked_after(step, n, length, now),
                                        run_temperatures(step, n, self.cfg.rollout_temperatures),
                                        self.cfg.rollout_token_temperature, mask_id, self.num_codes, self.generator)
        rows = torch.arange(b)
        steps, captions = rows // c, rows % c
        return torch.stack(states)[steps.to(self.device), captions.to(self.device)], steps, captions

    def step_targets(self, tokens: torch.Tensor, step: torch.Tensor, n: int, text: torch.Tensor, pooled: torch.Tensor,
                     micro: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """--step-distill K targets (SDTT, Deschenaux & Gulcehre 2025): from the state before step `step` (B,) of an
        n-step run, the teacher decodes steps K*i .. K*i+K-1 of a K*n-step run with guidance; each position's target
        is the teacher's guided logits at the step that decided it, the last step's where it is still masked.
        With K = 1 this is `guided_logits` at the state. (B, K, H, W) float32, no gradient."""
        k, mask_id = self.cfg.step_distill, self.model_config.mask_token_id
        total, b = k * n, tokens.shape[0]
        length = tokens[0].numel()
        empty_text, empty_pooled = (x.to(self.device) for x in self._empty_features())
        target = None
        with torch.no_grad():
            for j in range(k):
                s = k * step.cpu() + j
                masked_before = (tokens.reshape(b, 1, -1) == mask_id)
                logits = guided_logits(self.teacher, tokens, (total - 1 - s).float().to(self.device), micro, text, pooled,
                                       empty_text, empty_pooled, scales)
                flat = logits.reshape(b, logits.shape[1], -1)
                target = flat if target is None else torch.where(masked_before, flat, target)
                if j < k - 1:
                    now = masked_before.reshape(b, -1).sum(1).cpu()
                    tokens, _ = decode_step(logits, tokens, masked_after(s, total, length, now),
                                            run_temperatures(s, total, self.cfg.rollout_temperatures),
                                            self.cfg.rollout_token_temperature, mask_id, self.num_codes, self.generator)
        return target.reshape(logits.shape)

    def micro_step_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """States and guidance scales, teacher targets (no grad), one student forward; (loss, mean masking rate)."""
        cfg, g, dev = self.cfg, self.generator, self.device
        b, mask_id = batch.codes.shape[0], self.model_config.mask_token_id
        counts = cfg.step_counts
        # One step count per batch where the states follow one run (rollout) or the teacher's steps must line up.
        n = counts[int(torch.randint(len(counts), (1,), generator=g))] if (
            cfg.distill_timesteps == "rollout" or cfg.step_distill > 1) else 0
        codes, micro = batch.codes, batch.micro.to(dev)
        if cfg.distill_timesteps == "rollout":
            scales = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=g)
            text, pooled = self._caption_features(batch)
            inputs, steps, rows = self.rollout_states(n, text, pooled, micro, scales.to(dev), tuple(codes.shape[1:]))
            text, pooled, micro, scales, codes = text[rows], pooled[rows], micro[rows], scales[rows], codes[rows]
            timesteps = (n - 1 - steps).float()
            labels = torch.where(inputs.cpu() == mask_id, codes, torch.full_like(codes, IGNORE_INDEX))
            rates = (labels != IGNORE_INDEX).float().flatten(1).mean(1)
        else:
            if cfg.distill_timesteps == "sampler":
                rates, timesteps = sampler_states(b, [n] if n else counts, g)
            else:
                rates = sample_masking_rates(b, g, cfg.min_masking_rate)
                timesteps = rates * 1000
            inputs, labels = mask_tokens(codes, rates, mask_id, g)
            scales = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=g)
            text, pooled = self._caption_features(batch)
            steps = (n - 1 - timesteps).long() if n else None
        inputs, timesteps, scales = inputs.to(dev), timesteps.to(dev), scales.to(dev)
        if cfg.step_distill > 1:
            target = self.step_targets(inputs, steps, n, text, pooled, micro, scales)
        else:
            empty_text, empty_pooled = self._empty_features()
            with torch.no_grad():
                target = guided_logits(self.teacher, inputs, timesteps, micro, text, pooled, empty_text.to(dev),
                                       empty_pooled.to(dev), scales)
        with self._autocast():
            logits = self.wrapped(inputs, timesteps, micro, self.img_ids, self.txt_ids, text=text, pooled=pooled,
                                  guidance=scales)
        loss = distillation_loss(logits, target, labels.to(dev), cfg.distill_loss, self.num_codes, cfg.distill_temperature)
        # The curves (accuracy against the true tokens, cross-entropy per mask-rate bucket) as `train` logs them.
        self.last_token_stats = masked_token_stats(logits, labels.to(dev))
        return loss, rates.mean()


def distill(cfg: DistillConfig) -> TrainResult:
    """Run `meissonic distill`: one process, or one rank under torchrun (the trainer's `train` with this trainer)."""
    return train(cfg, DistillTrainer)


__all__ = ["DistillConfig", "DistillTrainer", "check_pairing", "decode_step", "distill", "distillation_loss", "guided_logits",
           "load_distill_config", "masked_after", "run_temperatures", "sampler_states"]
