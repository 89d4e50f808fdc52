"""Transformer behaviours a one-line bug breaks without other tests noticing (issue 15, survivors of a
mutation run over model/transformer.py): shard sizes, the safetensors metadata HF loaders expect,
variant and sharded weight folders, strict key checks, the guidance batch of the cached forward and
the messages for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from meissonic_cli.errors import ConfigError, InputError, ModelFormatError
from meissonic_cli.model.transformer import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    MeissonicTransformer,
    _parse_size,
    check_state_dict,
    from_pretrained,
    meissonic_tiny,
    save_pretrained,
    weight_shapes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MeissonicTransformer:
    torch.manual_seed(0)
    return MeissonicTransformer(meissonic_tiny()).eval()


@pytest.mark.parametrize(("text", "size"), [
    (1234, 1234), ("1000", 1000), ("2KB", 2000), ("2kb", 2000), ("1.5 MB", 1_500_000), ("3GB", 3 * 10**9),
    ("2KiB", 2048), ("2kib", 2048), ("1MiB", 2**20), (" 1 GiB ", 2**30), ("5gb", 5 * 10**9), ("7b", 7),
])
def test_max_shard_size_units(text, size) -> None:
    assert _parse_size(text) == size


def test_max_shard_size_refuses_other_text() -> None:
    for bad in ("5TB", "MB", "-1MB", "5 G B"):
        with pytest.raises(ConfigError, match="is not a size like 5GB, 500MB or 1000000"):
            _parse_size(bad)


def test_weights_carry_the_format_metadata_hf_loaders_check(model: MeissonicTransformer, tmp_path: Path) -> None:
    one = save_pretrained(model, tmp_path / "one")
    sharded = save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    files = [one / WEIGHTS_NAME] + sorted(sharded.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(files) > 2
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}, path


def test_weight_shapes_read_a_sharded_folder_through_its_index(model: MeissonicTransformer, tmp_path: Path) -> None:
    folder = save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (folder / WEIGHTS_INDEX_NAME).is_file() and not (folder / WEIGHTS_NAME).exists()
    shapes = weight_shapes(folder)
    assert shapes == {k: (tuple(v.shape), "F32") for k, v in model.state_dict().items()}


def test_a_variant_only_folder_loads_with_and_without_naming_its_variant(model: MeissonicTransformer,
                                                                          tmp_path: Path) -> None:
    # Issue 19: a folder holding only *.fp16.safetensors (as the hub's variant downloads) loads as it is.
    folder = save_pretrained(model, tmp_path / "t")
    (folder / WEIGHTS_NAME).rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    for loaded in (from_pretrained(folder, variant="fp16"), from_pretrained(folder)):
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_check_state_dict_names_unexpected_and_missing_keys(model: MeissonicTransformer) -> None:
    state = dict(model.state_dict())
    check_state_dict(model, state, "ok.safetensors")  # the model's own state passes
    state["extra.weight"] = torch.zeros(1)
    missing = sorted(state)[0]
    del state[missing]
    with pytest.raises(ModelFormatError) as err:
        check_state_dict(model, state, "w.safetensors")
    text = str(err.value)
    assert text.startswith("w.safetensors does not match the transformer config: 1 missing key(s)")
    assert missing in text and "1 unexpected key(s) (e.g. extra.weight)" in text


def _cond(model: MeissonicTransformer, rows: int, grid=(4, 4)):
    torch.manual_seed(rows)
    cfg = model.config
    text = torch.randn(rows, 3, cfg.joint_attention_dim)
    pooled = torch.randn(rows, cfg.pooled_projection_dim)
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]]).expand(rows, 5)
    return text, pooled, micro, model.prepare_conditioning(text, pooled, micro, grid)


def test_cached_forward_runs_the_same_tokens_under_each_prompt_group(model: MeissonicTransformer) -> None:
    tokens = torch.randint(0, 64, (2, 4, 4))
    positions = torch.tensor([[0, 5, 6, 15], [1, 2, 9, 10]])
    t = torch.tensor([500])
    text, pooled, micro, both = _cond(model, 4)  # [group 0 of 2 rows, group 1 of 2 rows]
    with torch.inference_mode():
        joint = model.forward_cached(tokens, t, both, positions)
        for g in range(2):
            rows = slice(2 * g, 2 * g + 2)
            alone = model.forward_cached(tokens, t, model.prepare_conditioning(text[rows], pooled[rows], micro[rows],
                                                                               (4, 4)), positions)
            torch.testing.assert_close(joint[rows], alone, rtol=1e-5, atol=1e-5)


def test_cached_forward_refuses_a_conditioning_batch_that_does_not_fit(model: MeissonicTransformer) -> None:
    t = torch.tensor([500])
    *_, three = _cond(model, 3)
    with pytest.raises(InputError, match=r"^batch of 2 token grids but conditioning for 3 prompts$"):
        model.forward_cached(torch.zeros(2, 4, 4, dtype=torch.long), t, three, torch.zeros(2, 3, dtype=torch.long))
    *_, two = _cond(model, 2)  # 2 rows for 1 grid: only with positions (the guidance batch)
    with pytest.raises(InputError, match=r"^batch of 1 token grids but conditioning for 2 prompts$"):
        model.forward_cached(torch.zeros(1, 4, 4, dtype=torch.long), t, two)


def test_forward_without_micro_conditions_says_what_they_are(model: MeissonicTransformer) -> None:
    text, pooled, _, _ = _cond(model, 1)
    with pytest.raises(InputError) as err:
        model(torch.zeros(1, 4, 4, dtype=torch.long), text, pooled, torch.tensor([1.0]))
    assert str(err.value) == "micro_conds (B, 5) = [orig_width, orig_height, crop_top, crop_left, score] is required"


def test_odd_rope_axes_are_refused_by_name() -> None:
    with pytest.raises(ConfigError) as err:
        meissonic_tiny(axes_dims_rope=(1, 3, 4))
    assert "axes_dims_rope [1, 3, 4] must all be even" in str(err.value)


def test_config_json_round_trips_the_fields_the_architecture_ignores(tmp_path: Path) -> None:
    folder = save_pretrained(MeissonicTransformer(meissonic_tiny(in_channels=48)), tmp_path / "t")
    assert json.loads((folder / "config.json").read_text())["in_channels"] == 48
    assert from_pretrained(folder).config.in_channels == 48
