"""Exponential moving average of the trained weights (kept in float32, works on FSDP-sharded parameters)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Exponential moving average (float32) of the trained parameters, keyed by parameter name."""

    def __init__(self, named: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, nn.Parameter]) -> None:
        shadow = list(self.shadow.values())
        torch._foreach_lerp_(shadow, [named[k].detach().float() for k in self.shadow], 1.0 - self.decay)

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
