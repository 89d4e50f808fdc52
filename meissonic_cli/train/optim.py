"""The optimiser and its learning-rate schedule: AdamW (torch, or bitsandbytes' 8-bit AdamW) over
decay/no-decay groups, warm-up then constant or cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from meissonic_cli.errors import ConfigError


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

    `cfg` is a TrainConfig (optimizer, lr, text_encoder_lr, weight_decay, adam_*, lr_schedule,
    warmup_steps, max_steps, min_lr_ratio, fsdp). torch's fused kernel is used on CUDA except under FSDP.
    """
    groups = parameter_groups(module, cfg.weight_decay, cfg.lr, cfg.text_encoder_lr)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if getattr(cfg, "optimizer", "adamw") == "adamw8bit":
        optimizer = adamw_8bit_class()(groups, betas=betas, eps=cfg.adam_eps)
    else:
        optimizer = torch.optim.AdamW(groups, betas=betas, eps=cfg.adam_eps, fused=device.type == "cuda" and not cfg.fsdp)
    schedule = LRSchedule(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def adamw_8bit_class() -> type[torch.optim.Optimizer]:
    """bitsandbytes' `AdamW8bit` (runs on CUDA and on the CPU); a ConfigError when it is not installed."""
    import importlib.util
    import logging

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--optimizer adamw8bit needs the bitsandbytes package: pip install 'meissonic[train]'")
    # Importing bitsandbytes logs warnings about optional 4-bit CPU kernels this optimizer never uses.
    quiet = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except Exception as err:  # a broken install raises anything from OSError to RuntimeError
        raise ConfigError(f"--optimizer adamw8bit: bitsandbytes failed to import ({type(err).__name__}: {err}); "
                          "use --optimizer adamw or reinstall bitsandbytes") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return bnb.optim.AdamW8bit


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    """The scheduler's counters only: the schedule's shape comes from the current config (a resumed run
    may extend --max-steps), so the lambdas are not saved."""
    return {**scheduler.state_dict(), "lr_lambdas": [None] * len(scheduler.optimizer.param_groups)}
