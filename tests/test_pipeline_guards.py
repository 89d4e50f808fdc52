"""Pipeline behaviours a one-line bug breaks without other tests noticing (issue 15, survivors of a
mutation run over sample/pipeline.py): sampling stays inside a VQ codebook smaller than the
transformer's head, the call's arguments (defaults, callback, first_step, starting_mask_ratio,
token_temperature, micro_conds) reach the sampler, and partial starts follow their own schedule on
every path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meissonic_cli.errors import InputError
from meissonic_cli.model.scaffold import build_model_folder, tiny_configs
from meissonic_cli.model.vq.vqgan import tiny_vq_config
from meissonic_cli.sample.pipeline import MeissonicPipeline, guidance_batch, sample_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

P = "a red circle"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> MeissonicPipeline:
    return MeissonicPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


def _codes(pipe: MeissonicPipeline, **kw) -> torch.Tensor:
    kw = {"steps": 3, "height": 64, "width": 64, "seed": 0, "output_type": "codes", **kw}
    return pipe([P, "a blue square"], **kw)


@pytest.fixture(scope="module")
def small_codebook_pipe(tmp_path_factory: pytest.TempPathFactory) -> MeissonicPipeline:
    transformer, text, _ = tiny_configs()
    vq = tiny_vq_config(codebook_size=transformer.codebook_size // 4)  # 16 codes under a 64-way head
    folder = build_model_folder(tmp_path_factory.mktemp("small") / "m", transformer, text, vq, seed=0)
    return MeissonicPipeline.from_pretrained(folder, device="cpu", dtype="fp32")


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("seed", [0, [3, 4]], ids=["one-generator", "per-row"])
def test_tokens_stay_inside_a_vq_codebook_smaller_than_the_head(small_codebook_pipe: MeissonicPipeline,
                                                                 exact: bool, seed) -> None:
    codes = small_codebook_pipe([P, "a blue square"], steps=4, height=128, width=128, seed=seed,
                                output_type="codes", exact=exact)
    assert codes.shape == (2, 8, 8)
    assert int(codes.max()) < small_codebook_pipe.vq.codebook_size == 16


def test_the_default_guidance_scale_is_nine(pipe: MeissonicPipeline) -> None:
    default = _codes(pipe)
    assert torch.equal(default, _codes(pipe, guidance_scale=9.0))
    assert not torch.equal(default, _codes(pipe, guidance_scale=10.0))


def test_the_callback_sees_every_step(pipe: MeissonicPipeline) -> None:
    for exact in (False, True):
        seen: list[tuple[int, int]] = []
        _codes(pipe, steps=4, exact=exact, callback=lambda step, total: seen.append((step, total)))
        assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_token_temperature_two_divides_the_logits(pipe: MeissonicPipeline) -> None:
    plain = _codes(pipe, steps=4, seed=[5, 6])
    assert not torch.equal(plain, _codes(pipe, steps=4, seed=[5, 6], token_temperature=2.0))
    assert torch.equal(plain, _codes(pipe, steps=4, seed=[5, 6], token_temperature=1.0))


def _half_masked(pipe: MeissonicPipeline) -> torch.Tensor:
    source = _codes(pipe, steps=2)
    init = source.clone()
    init[:, ::2, :] = pipe.scheduler.config.mask_token_id  # half of every grid to redo
    return init


def test_first_step_and_starting_mask_ratio_reach_the_sampler(pipe: MeissonicPipeline) -> None:
    init = _half_masked(pipe)
    mask_id = pipe.scheduler.config.mask_token_id
    seen_first: list[int] = []
    base = _codes(pipe, steps=6, init_tokens=init)
    late = _codes(pipe, steps=6, init_tokens=init, first_step=4,
                  callback=lambda step, total: seen_first.append(step))
    assert seen_first == [5, 6]  # only the last two steps ran
    assert not torch.equal(base, late)
    ratio = _codes(pipe, steps=6, init_tokens=init, starting_mask_ratio=0.25)
    assert not torch.equal(base, ratio)
    for out in (base, late, ratio):
        assert not (out == mask_id).any()
        assert torch.equal(out[:, 1::2, :], init[:, 1::2, :])  # known tokens are kept


def test_first_step_must_leave_a_step_to_run(pipe: MeissonicPipeline) -> None:
    with pytest.raises(InputError, match=r"first_step must be in 0\.\.5, got 6"):
        _codes(pipe, steps=6, init_tokens=_half_masked(pipe), first_step=6)


def test_exact_partial_start_is_the_same_with_one_generator_or_a_list(pipe: MeissonicPipeline) -> None:
    """The exact loop's single-generator and per-row branches run the same partial schedule."""
    init = _half_masked(pipe)[:1]
    text, pooled = pipe.encode_prompts([P])
    neg_text, neg_pooled = pipe.encode_prompts([""])
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]])
    runs = []
    for generator in (torch.Generator().manual_seed(7), [torch.Generator().manual_seed(7)]):
        runs.append(sample_tokens(pipe.transformer, pipe.scheduler, text, pooled, micro, (4, 4), steps=8,
                                  guidance_scale=3.0, negative_text=neg_text, negative_pooled=neg_pooled,
                                  generator=generator, exact=True, init_tokens=init, first_step=2,
                                  starting_mask_ratio=0.3))
    assert torch.equal(runs[0], runs[1])


def test_integer_micro_conditions_read_as_floats(pipe: MeissonicPipeline) -> None:
    as_floats = _codes(pipe, micro_conds=[512.0, 512.0, 0.0, 0.0, 6.0])
    assert torch.equal(as_floats, _codes(pipe, micro_conds=[512, 512, 0, 0, 6]))
    assert torch.equal(as_floats, _codes(pipe, micro_conds=torch.tensor([512, 512, 0, 0, 6])))


def test_guidance_without_negative_features_says_what_is_missing() -> None:
    t, p, m = torch.zeros(1, 2, 4), torch.zeros(1, 4), torch.zeros(1, 5)
    with pytest.raises(InputError, match=r"^guidance_scale > 1 needs negative_text and negative_pooled"):
        guidance_batch(t, p, m, None, p, 2.0)
    assert guidance_batch(t, p, m, None, None, 1.0) == (t, p, m)
