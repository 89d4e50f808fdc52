"""Sampling a guidance-distilled model (`meissonic distill`, `transformer/config.json` with `guidance_embeds: true`).

Such a transformer takes the guidance scale as an input (its `time_text_embed.guidance_embedder`, as
FLUX-dev), so a sampling step is ONE forward over the prompts' rows with `--guidance-scale` fed to the
embedding, instead of the [negative, positive] pair of classifier-free guidance. `sample`, `edit`, `eval`
and `MeissonicPipeline` detect it (`embeds_guidance`) and take that path in every loop (fast, `--exact`,
the sampler options and the feature cache: the scale's embedding is part of the step-invariant
conditioning, `MeissonicTransformer.prepare_conditioning(..., guidance=s)`).

Negative prompts: the student was distilled against the teacher's guidance from the empty prompt, so
only the empty negative prompt is supported; any other is refused (`check_negative_prompts`) rather than
silently ignored. Sample the teacher for negative prompts.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from meissonic_cli.errors import InputError


def embeds_guidance(transformer: Any) -> bool:
    """True for a guidance-distilled transformer: one forward per step, the scale an input (`guidance_embeds`)."""
    return bool(getattr(getattr(transformer, "config", None), "guidance_embeds", False))


def check_negative_prompts(negatives: Sequence[str], transformer: Any) -> None:
    """For a guidance-distilled `transformer`, InputError unless every negative prompt is empty (all it supports)."""
    if embeds_guidance(transformer) and any(str(n).strip() for n in negatives):
        raise InputError("negative prompts are not supported by a guidance-distilled model (guidance_embeds): its "
                         "guidance was distilled against the empty prompt; leave --negative-prompt empty, or sample "
                         "the teacher model")


def guidance_batch(text: torch.Tensor, pooled: torch.Tensor, micro_conds: torch.Tensor,
                   negative_text: Optional[torch.Tensor], negative_pooled: Optional[torch.Tensor],
                   guidance_scale: float, embedded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text, pooled, micro_conds) as the transformer runs them: [uncond, cond] (2B rows) when
    guidance_scale > 1, else the prompts' own (B rows); always the prompts' own for a guidance-embedded
    transformer (`embedded`), whose scale is an input instead."""
    if guidance_scale <= 1.0 or embedded:
        return text, pooled, micro_conds
    if negative_text is None or negative_pooled is None:
        raise InputError("guidance_scale > 1 needs negative_text and negative_pooled (the negative prompt's features)")
    return torch.cat([negative_text, text]), torch.cat([negative_pooled, pooled]), torch.cat([micro_conds, micro_conds])


__all__ = ["check_negative_prompts", "embeds_guidance", "guidance_batch"]
