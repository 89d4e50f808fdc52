"""A training-free feature cache for the sampling loop, in the spirit of ReCAP (arXiv 2505.19089).

Tokens decided in earlier steps change little from one step to the next, and neither does the text.
Every `refresh` steps the cache runs the full forward and keeps, for every block, the keys and values
of every position (text and image, after QK-norm and the rotary embedding). On the steps between,
only the *active* cells run through the blocks: those still masked at the last full forward (the
only ones whose tokens can have changed since). Their queries attend to their own fresh keys/values
and to the cached keys/values of everything else; the text stream is not recomputed at all. With
2x2 compression a cell is a 2x2 patch of tokens, active when any of its tokens is.

What it approximates: a decided token's keys/values are those of the last full forward, so they miss
what changed since (the timestep embedding and the newly decided tokens around it); the logits of the
masked positions move by that much (the sampler study reports max/mean |logit difference| against the
uncached forward at the same state). What it saves: a cached step costs the active fraction of the
blocks' work, which shrinks as decoding proceeds.

The blocks themselves hold no second copy here: each block's own forward takes a
`model.transformer.BlockCache` (records on a full forward, reuses on a cached one), so a change to a
block, its quantization or its compilation reaches the cache too.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from meissonic_cli.model.transformer import BlockCache, Conditioning, MeissonicTransformer


class FeatureCache:
    """Keys/values of the last full forward, for one sampling call (see the module docstring)."""

    def __init__(self, transformer: MeissonicTransformer, cond: Conditioning, refresh: int, mask_id: int):
        self.transformer = transformer
        self.cond = cond
        self.refresh = max(1, int(refresh))
        self.mask_id = int(mask_id)
        n_blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        self.layers = [BlockCache() for _ in range(n_blocks)]
        self.active: Optional[torch.Tensor] = None  # active cell indices (nA,)
        self.slot: Optional[torch.Tensor] = None  # token index -> row of the active tokens' outputs
        self.full_forwards = 0
        self.cached_forwards = 0
        self.last_was_full = False

    # -- shared pieces --------------------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor, repeats: int) -> torch.Tensor:
        """The blocks' image input (rows, N, D) for token grids (B, H, W)."""
        tr = self.transformer
        ids, inverse = torch.unique(tokens.to(tr.device), return_inverse=True)
        x = tr.embed(ids.view(1, -1, 1))[0, :, :, 0].t()[inverse].permute(0, 3, 1, 2)
        x = tr.down_block(x)
        x = tr.project_to_hidden(tr.project_to_hidden_norm(x.flatten(2).transpose(1, 2)))
        return x.repeat(repeats, 1, 1) if repeats > 1 else x

    def _temb(self, timestep: torch.Tensor, rows: int) -> torch.Tensor:
        temb = self.transformer.time_embedding(timestep) + self.cond.pooled_temb
        return temb.expand(rows, -1) if temb.shape[0] != rows else temb

    def _repeats(self, b: int) -> int:
        rows = self.cond.context.shape[0]
        return rows // b if rows != b else 1

    # -- the step -------------------------------------------------------------------------------

    def hidden(self, tokens: torch.Tensor, timestep: torch.Tensor, positions: torch.Tensor, step_index: int) -> torch.Tensor:
        """The head's hidden state (rows, M, D) at flat `positions` (B, M), as
        `forward_cached(..., positions, head="hidden")` gives it: exact on a full step, cached otherwise."""
        full = self.active is None or step_index % self.refresh == 0
        self.last_was_full = full
        if full:
            self.full_forwards += 1
            return self._full(tokens, timestep, positions)
        self.cached_forwards += 1
        return self._cached(tokens, timestep, positions)

    def _full(self, tokens: torch.Tensor, timestep: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        b, grid_h, grid_w = tokens.shape
        for layer in self.layers:
            layer.index = None  # record
        hidden = tr.forward_cached(tokens, timestep, self.cond, positions=positions, head="hidden", cache=self.layers)
        h, w = tr.compressed_grid(grid_h, grid_w)
        # Active cells: any token of the cell masked now (in any row).
        masked = (tokens.reshape(b, grid_h, grid_w) == self.mask_id)
        if tr.config.downsample:
            masked = masked.reshape(b, h, 2, w, 2).any(4).any(2)
        self.active = masked.reshape(b, -1).any(0).nonzero()[:, 0]
        self.slot = self._slots(grid_h, grid_w, h, w, tokens.device)
        return hidden

    def _slots(self, grid_h: int, grid_w: int, h: int, w: int, device: Any) -> torch.Tensor:
        """token index -> row in the active tokens' outputs (-1 for inactive tokens)."""
        slot = torch.full((grid_h * grid_w,), -1, dtype=torch.long, device=device)
        active = self.active.to(device)
        if not self.transformer.config.downsample:
            slot[active] = torch.arange(active.numel(), device=device)
            return slot
        rows, cols = active // w, active % w
        for di in (0, 1):
            for dj in (0, 1):
                tok = (2 * rows + di) * grid_w + 2 * cols + dj
                slot[tok] = torch.arange(active.numel(), device=device) * 4 + di * 2 + dj
        return slot

    def _cached(self, tokens: torch.Tensor, timestep: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tr, cond = self.transformer, self.cond
        b = tokens.shape[0]
        repeats = self._repeats(b)
        x = self._embed(tokens, repeats)
        rows = x.shape[0]
        t = cond.context.shape[1]
        active = self.active.to(x.device)
        x = x[:, active]
        temb = self._temb(timestep, rows)
        cos, signed_sin = cond.rope
        idx = active + t  # the active cells' rows in the [text, image] sequence
        rope = (cos[idx], signed_sin[idx])
        for layer in self.layers:
            layer.index = idx
        n_double = len(tr.transformer_blocks)
        for block, layer in zip(tr.transformer_blocks, self.layers[:n_double]):
            _, x = block(x, None, temb, rope, cache=layer)
        for block, layer in zip(tr.single_transformer_blocks, self.layers[n_double:]):
            x = block(x, temb, rope, cache=layer)
        y = tr.project_from_hidden(tr.project_from_hidden_norm(x))  # (rows, nA, D)
        if tr.config.downsample:
            up = tr.up_block.upsample
            y = up.norm(y)
            # ConvTranspose2d with kernel 2 and stride 2: each cell writes its own 2x2 patch.
            y = torch.einsum("rnc,cokl->rnklo", y, up.conv.weight).reshape(rows, -1, y.shape[-1])
        pos = positions.repeat(repeats, 1) if repeats > 1 else positions
        picked = y.gather(1, self.slot[pos.to(self.slot.device)].to(y.device)[..., None].expand(-1, -1, y.shape[-1]))
        return tr.mlm_layer.hidden_tokens(picked)


__all__ = ["FeatureCache"]
