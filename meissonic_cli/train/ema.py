"""Exponential moving average of the trained weights (kept in float32, works on FSDP-sharded parameters).

The decay follows diffusers' `EMAModel` (what the official trainer uses) when warm-up is on: at the
n-th update, with t = n - update_after_step - 1,

    decay_n = 0                                   for t <= 0 (the average copies the weights)
    decay_n = min(decay, (1 + t) / (10 + t))      after that

so a from-scratch run's average leaves its random init within tens of steps instead of ~1/(1-decay)
steps. Without warm-up the full decay applies from the first update after `update_after_step`
(what meissonic did before warm-up existed; checkpoints written then resume that way).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def ema_decay_at(update: int, decay: float, *, warmup: bool, update_after_step: int = 0) -> float:
    """The decay used by the `update`-th EMA update (1-based)."""
    if not warmup:
        return 0.0 if update <= update_after_step else decay
    t = update - update_after_step - 1
    if t <= 0:
        return 0.0
    return min(decay, (1 + t) / (10 + t))


class EMA:
    """Exponential moving average (float32) of the trained parameters, keyed by parameter name."""

    def __init__(self, named: dict[str, nn.Parameter], decay: float, *, warmup: bool = False, update_after_step: int = 0):
        self.decay = decay
        self.warmup = warmup
        self.update_after_step = update_after_step
        self.updates = 0  # updates applied so far (diffusers' `optimization_step`)
        self.shadow = {k: p.detach().float().clone() for k, p in named.items()}

    @classmethod
    def for_config(cls, named: dict[str, nn.Parameter], cfg: Any) -> "EMA":
        """The EMA a TrainConfig asks for (ema_decay, ema_warmup, ema_update_after_step)."""
        return cls(named, cfg.ema_decay, warmup=cfg.ema_warmup, update_after_step=cfg.ema_update_after_step)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay_at(self.updates + 1, self.decay, warmup=self.warmup, update_after_step=self.update_after_step)

    @torch.no_grad()
    def update(self, named: dict[str, nn.Parameter]) -> None:
        decay = self.current_decay()
        self.updates += 1
        shadow = list(self.shadow.values())
        torch._foreach_lerp_(shadow, [named[k].detach().float() for k in self.shadow], 1.0 - decay)

    def schedule_state(self) -> dict[str, Any]:
        """The counters and settings a checkpoint records so a resumed run continues the same schedule."""
        return {"updates": self.updates, "warmup": self.warmup, "update_after_step": self.update_after_step}

    def load_schedule_state(self, state: dict[str, Any] | None, *, fallback_updates: int) -> None:
        """Restore `schedule_state()`; a checkpoint without one (written before warm-up existed) keeps
        the constant decay it was trained with."""
        if state is None:
            self.warmup, self.update_after_step, self.updates = False, 0, fallback_updates
            return
        self.updates = int(state["updates"])
        self.warmup = bool(state["warmup"])
        self.update_after_step = int(state["update_after_step"])

    def resume_schedule(self, recorded: dict[str, Any] | None, step: int, cfg: Any, say: Callable[[str], None]) -> None:
        """Continue the schedule a checkpoint recorded; `cfg` (a TrainConfig) is updated to match, so the
        run's saved config says what runs, and `say` gets a line when that differs from the flags."""
        self.load_schedule_state(recorded, fallback_updates=step)
        if (self.warmup, self.update_after_step) == (cfg.ema_warmup, cfg.ema_update_after_step):
            return
        cfg.ema_warmup, cfg.ema_update_after_step = self.warmup, self.update_after_step
        why = "" if recorded is not None else " (written before EMA warm-up existed)"
        say(f"EMA: continuing the checkpoint's schedule{why}: warm-up {'on' if self.warmup else 'off'}, update after step "
            f"{self.update_after_step}; --ema-warmup/--ema-update-after-step apply to new runs")

    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU (gathers FSDP shards; collective, so every rank calls it)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor], named: dict[str, nn.Parameter]) -> None:
        for k, v in self.shadow.items():
            full = state[k].to(torch.float32)
            p = named[k]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
            v.copy_(full)
