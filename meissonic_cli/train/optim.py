"""The optimiser and its learning-rate schedule: AdamW over decay/no-decay groups, warm-up then constant or cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def parameter_groups(module: nn.Module, weight_decay: float, lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay only on matrices and kernels, never on norms, biases or embeddings."""
    embedding_params = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in embedding_params and "embedding" not in name
        is_text = name.startswith("text_encoder.")
        groups.setdefault((is_text, decay), []).append(p)
    out = []
    for (is_text, decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr": (text_encoder_lr or lr) if is_text else lr})
    return out


class LRSchedule:
    """Multiplier of the peak LR at step s: linear warm-up, then constant or cosine to min_ratio."""

    def __init__(self, kind: str, warmup_steps: int, max_steps: int, min_ratio: float = 0.0):
        self.kind, self.warmup_steps, self.max_steps, self.min_ratio = kind, warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, cfg: Any, device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `module`'s trainable parameters and the LambdaLR that applies `LRSchedule` to it.

    `cfg` is a TrainConfig (lr, text_encoder_lr, weight_decay, adam_*, lr_schedule, warmup_steps,
    max_steps, min_lr_ratio, fsdp). The fused kernel is used on CUDA except under FSDP.
    """
    optimizer = torch.optim.AdamW(
        parameter_groups(module, cfg.weight_decay, cfg.lr, cfg.text_encoder_lr),
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        fused=device.type == "cuda" and not cfg.fsdp,
    )
    schedule = LRSchedule(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    """The scheduler's counters only: the schedule's shape comes from the current config (a resumed run
    may extend --max-steps), so the lambdas are not saved."""
    return {**scheduler.state_dict(), "lr_lambdas": [None] * len(scheduler.optimizer.param_groups)}
