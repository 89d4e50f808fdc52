"""The feature cache lives in the blocks' own forward (`model.transformer`, `cache=`): its outputs are
those the cache gave before it moved there. `data/feature_cache_reference.json` was recorded with the
earlier implementation (sample/cache.py's own copies of the block forwards) and is never regenerated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_samplers import _cache_setup, _guided, _model, _sample

from meissonic_cli.sample.cache import FeatureCache
from meissonic_cli.sample.samplers import SamplerOptions

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = json.loads((Path(__file__).parent / "data" / "feature_cache_reference.json").read_text())


@pytest.mark.parametrize("downsample", [True, False])
@pytest.mark.parametrize("refresh", [2, 3])
def test_cached_sampler_gives_the_recorded_tokens(downsample: bool, refresh: int) -> None:
    codes = _sample(_model(downsample), SamplerOptions(cache_refresh=refresh), steps=8)
    assert codes.flatten().tolist() == REFERENCE["tokens"][f"downsample={downsample},refresh={refresh}"]


def _changed_state_logits(downsample: bool) -> torch.Tensor:
    """A cached step after the tokens moved (the approximate case), at two still-masked positions."""
    model, cond, tokens, positions = _cache_setup(downsample)
    mask_id = model.config.mask_token_id
    with torch.inference_mode():
        cache = FeatureCache(model, cond, refresh=4, mask_id=mask_id)
        cache.hidden(tokens, torch.tensor([5]), positions, 0)
        changed = tokens.clone()
        masked = changed == mask_id
        changed[masked] = (torch.arange(int(masked.sum())) * 7) % model.config.codebook_size
        for r in range(2):
            changed.view(2, -1)[r, positions[r, :2]] = mask_id
        return _guided(model, cache.hidden(changed, torch.tensor([4]), positions[:, :2], 1))


@pytest.mark.parametrize("downsample", [True, False])
def test_cached_step_after_the_tokens_moved_gives_the_recorded_logits(downsample: bool) -> None:
    got = _changed_state_logits(downsample).flatten()[:64]
    want = torch.tensor(REFERENCE["cached_logits"][f"downsample={downsample}"])
    assert torch.allclose(got, want, atol=2e-5, rtol=0)
