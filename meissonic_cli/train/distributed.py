"""Where a process stands in a run and how its model is wrapped: one device, DDP, or FSDP (torchrun).

`init_distributed` joins the process group torchrun describes in the environment (NCCL on GPUs, gloo
on CPUs); outside torchrun it returns rank 0 of 1 and nothing here talks to other processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meissonic_cli.device import resolve_device


@dataclass
class DistEnv:
    """This process's place in the run (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # One --device vocabulary (meissonic_cli.device); under torchrun a bare auto/cuda is the rank's own GPU.
    dev = resolve_device(device, per_rank=True)
    use_cuda = dev.type == "cuda"
    if use_cuda and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if use_cuda:
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch.distributed.init_process_group(backend, device_id=dev if use_cuda else None)
        env.owns_group = True
    return env


def wrap_model(module: nn.Module, env: DistEnv, *, fsdp: bool, precision: str, blocks: list[nn.Module]) -> nn.Module:
    """`module` as the training step calls it: itself on one process, DDP, or FSDP2 with `blocks` sharded one by one."""
    if not env.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def gradient_sync(wrapped: nn.Module, *, fsdp: bool, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on every micro-step but the last of an accumulation."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not last:
        return wrapped.no_sync()
    if fsdp and hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def full_state_options(offload: bool = True) -> Any:
    """Whole (unsharded) tensors; `offload` gathers them to rank 0's CPU for writing."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=offload, strict=False)
