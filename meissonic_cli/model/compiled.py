"""`--compile`: torch.compile of the transformer's blocks for sampling.

Each double and single block is compiled in place (`nn.Module.compile`, so state_dict keys, hooks and
LoRA wrappers stay as they are). A block's input shapes are fixed for a run (rows = prompts x guidance
groups, tokens = text + the compressed grid), so each block compiles once, at the first step, and every
later step reuses that code; the feature cache's cached steps (`BlockCache`) see fewer image rows,
which dynamo compiles once more with the row count dynamic. What stays eager: the embedding, the
(de)compression and the masked head, whose row count (the still-masked positions) shrinks every step
and would otherwise recompile at every step; it is a small share of a step's work.
"""

from __future__ import annotations

from typing import Any

COMPILE_HELP = ("torch.compile the transformer's blocks (inductor; compiled once at the first step, reused by "
                "every later one: the first image is slower). The embedding and the masked head stay eager.")


def compile_blocks(model: Any, backend: str = "inductor", mode: Any = None) -> int:
    """Compile every block of `model` in place; returns how many."""
    import torch

    # Every block is its own code object; the cache's second shape needs one more entry per block.
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    for block in blocks:
        block.compile(backend=backend, mode=mode)
    model.compiled = True
    return len(blocks)


__all__ = ["COMPILE_HELP", "compile_blocks"]
