"""The masked image modeling objective (paper sections 2.2 and 2.5): masking, condition dropout, loss.

- A masking rate per sample r = cos(pi/2 u), u ~ U(0,1) (density 2/pi (1-r^2)^-1/2), clipped below;
  round(L r) tokens (at least one), chosen by a random permutation, become the mask id.
- Condition dropout swaps a sample's text sequence and pooled embedding for the empty prompt's, so
  the model also learns the unconditional prediction classifier-free guidance needs.
- The loss is the cross-entropy over the masked positions only. Its value depends on how much was
  masked, so `masked_token_stats` also measures it per mask-rate bucket, with the masked-token accuracy.

`collate` turns token samples into the batch these functions consume, checking each sample against
the training resolution and the model's codebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from meissonic_cli.data.shards import TokenSample
from meissonic_cli.errors import InputError

IGNORE_INDEX = -100


def sample_masking_rates(n: int, generator: torch.Generator, min_rate: float = 0.0) -> torch.Tensor:
    """`n` masking rates r = cos(pi/2 u), u ~ U(0,1), clipped below at `min_rate` (float32)."""
    u = torch.rand(n, generator=generator)
    return torch.cos(u * (math.pi * 0.5)).clamp(min=min_rate)


def mask_tokens(
    codes: torch.Tensor, rates: torch.Tensor, mask_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask round(L r) positions per sample (at least one), chosen by a random permutation.

    Returns `(inputs, labels)` shaped like `codes` (B, H, W): inputs hold `mask_id` where masked,
    labels hold the true code where masked and -100 elsewhere.
    """
    b = codes.shape[0]
    flat = codes.reshape(b, -1)
    length = flat.shape[1]
    n_masked = (length * rates).round().clamp(min=1)
    # A position is masked when its rank in a random permutation is below the count.
    rank = torch.rand(b, length, generator=generator).argsort(dim=-1)
    masked = rank < n_masked[:, None]
    inputs = torch.where(masked, torch.full_like(flat, mask_id), flat)
    labels = torch.where(masked, flat, torch.full_like(flat, IGNORE_INDEX))
    return inputs.reshape(codes.shape), labels.reshape(codes.shape)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions; logits (B, K, H, W), labels (B, H, W) with -100 elsewhere."""
    b, k = logits.shape[:2]
    return F.cross_entropy(logits.reshape(b, k, -1).float(), labels.reshape(b, -1), ignore_index=IGNORE_INDEX)


# Per-sample mask-rate buckets of the training curves: [0, .25), [.25, .5), [.5, .75), [.75, 1].
MASK_RATE_EDGES = (0.25, 0.5, 0.75)
MASK_RATE_BUCKETS = ("00_25", "25_50", "50_75", "75_100")
TOKEN_STATS_SIZE = 3 + 2 * len(MASK_RATE_BUCKETS)
STATS_CHUNK = 4096  # masked tokens per float32 block in masked_token_stats


@torch.no_grad()
def masked_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sums behind the training curves for one batch, as a float64 vector that adds up across
    micro-steps and ranks:

        [masked tokens, top-1 hits, top-5 hits, then per bucket: sum of per-sample losses, samples]

    A sample's mask rate is its share of masked positions and its loss the mean cross-entropy over
    them; logits (B, K, H, W), labels (B, H, W) with -100 where not masked.
    """
    b, k = logits.shape[:2]
    flat_logits = logits.detach().reshape(b, k, -1).transpose(1, 2)  # (B, L, K)
    flat_labels = labels.reshape(b, -1)
    masked = flat_labels != IGNORE_INDEX
    picked, targets = flat_logits[masked], flat_labels[masked]  # (M, K), (M,)
    # In float32 a few thousand tokens at a time: a 1024 px batch has ~10^4 masked tokens x 8192 codes.
    hits_parts, loss_parts = [], []
    for start in range(0, targets.numel(), STATS_CHUNK):
        chunk, target = picked[start:start + STATS_CHUNK].float(), targets[start:start + STATS_CHUNK]
        hits_parts.append(chunk.topk(min(5, k), dim=-1).indices == target[:, None])
        loss_parts.append(F.cross_entropy(chunk, target, reduction="none").double())
    hits = torch.cat(hits_parts) if hits_parts else torch.zeros(0, min(5, k), dtype=torch.bool, device=labels.device)
    token_loss = torch.cat(loss_parts) if loss_parts else torch.zeros(0, dtype=torch.float64, device=labels.device)
    per_sample_count = masked.sum(dim=1)
    sample_of = torch.arange(b, device=labels.device)[:, None].expand_as(masked)[masked]
    per_sample_loss = torch.zeros(b, dtype=torch.float64, device=labels.device).index_add_(0, sample_of, token_loss)
    per_sample_loss = per_sample_loss / per_sample_count.clamp(min=1)
    rate = per_sample_count.double() / flat_labels.shape[1]
    bucket = torch.bucketize(rate, torch.tensor(MASK_RATE_EDGES, dtype=torch.float64, device=rate.device), right=True)
    has_tokens = per_sample_count > 0
    parts = [masked.sum().double(), hits[:, 0].sum().double(), hits.any(dim=-1).sum().double()]
    for i in range(len(MASK_RATE_BUCKETS)):
        members = (bucket == i) & has_tokens
        parts += [per_sample_loss[members].sum(), members.sum().double()]
    return torch.stack(parts)


def draw_condition_dropout(n: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Which of `n` samples train unconditionally (bool, True = use the empty prompt)."""
    return torch.rand(n, generator=generator) < probability


def drop_captions(captions: list[str], drop: torch.Tensor) -> list[str]:
    """Captions with the dropped ones replaced by the empty prompt (for online text encoding)."""
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def drop_features(text: torch.Tensor, pooled: torch.Tensor, drop: torch.Tensor, empty_text: torch.Tensor,
                  empty_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored text features with the dropped samples' replaced by the empty prompt's."""
    if not bool(drop.any()):
        return text, pooled
    return torch.where(drop[:, None, None], empty_text, text), torch.where(drop[:, None], empty_pooled, pooled)


@dataclass
class Batch:
    codes: torch.Tensor  # (B, H, W) int64
    micro: torch.Tensor  # (B, 5) float32
    text: torch.Tensor | None  # (B, T, D) float32, stored features
    pooled: torch.Tensor | None  # (B, P) float32
    captions: list[str]


def collate(samples: list[TokenSample], *, grid: int, codebook_size: int, use_stored_text: bool,
            score: float | None, source: str = "") -> Batch:
    """Stack samples into a batch, checking each code grid against the training resolution."""
    for s in samples:
        if tuple(s.codes.shape) != (grid, grid):
            raise InputError(
                f"{source}: sample {s.key!r} has a {s.codes.shape[0]}x{s.codes.shape[1]} code grid but --resolution "
                f"and --vq-factor expect {grid}x{grid}; train at the resolution the shards were tokenized at"
            )
    codes = torch.from_numpy(np.stack([s.codes for s in samples]).astype(np.int64))
    if int(codes.max()) >= codebook_size:
        raise InputError(
            f"{source}: codes reach {int(codes.max())} but the model's codebook has {codebook_size} entries; the shards "
            "were tokenized with a different VQ model"
        )
    micro = torch.from_numpy(np.stack([s.micro for s in samples]).astype(np.float32))
    if score is not None:
        micro[:, 4] = score
    text = pooled = None
    if use_stored_text:
        missing = [s.key for s in samples if s.text is None or s.pooled is None]
        if missing:
            raise InputError(f"{source}: sample {missing[0]!r} has no stored text features although dataset.json says full")
        text = torch.from_numpy(np.stack([s.text for s in samples]).astype(np.float32))
        pooled = torch.from_numpy(np.stack([s.pooled for s in samples]).astype(np.float32))
    return Batch(codes=codes, micro=micro, text=text, pooled=pooled, captions=[s.caption for s in samples])
