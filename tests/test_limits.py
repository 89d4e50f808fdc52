"""The shared validators and readers behind the bad-input classes of issue 20.

- numbers: every int/float field of every stage's config passes one range check (`config.number_problems`
  through `Problems(self)`), so NaN, inf and absurd magnitudes are refused by flag name, in every config;
- size: a transformer config's parameter count is estimated before anything is allocated;
- readers: whatever bytes a structured file holds, the reader returns a value of the promised shape or
  raises a `MeissonicError` naming the file (hypothesis);
- seeds: one range, derived seeds stay in it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meissonic_cli.config import MAX_SEED, bounds_of, number_kind
from meissonic_cli.errors import ConfigError, MeissonicError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _configs() -> list:
    from meissonic_cli.commands.synth import SynthConfig
    from meissonic_cli.data.curate import CurateConfig
    from meissonic_cli.data.download import DownloadConfig
    from meissonic_cli.data.tokenize import TokenizeConfig
    from meissonic_cli.metrics.evaluate import EvalConfig
    from meissonic_cli.sample.edit import EditConfig
    from meissonic_cli.sample.sample import SampleConfig
    from meissonic_cli.shapes.demo import DemoConfig
    from meissonic_cli.train.config import TrainConfig

    return [TrainConfig, SampleConfig, EditConfig, EvalConfig, TokenizeConfig, CurateConfig, DownloadConfig,
            DemoConfig, SynthConfig]


def _number_fields() -> list[tuple[type, str, str]]:
    out = []
    for cls in _configs():
        for f in dataclasses.fields(cls):
            kind = number_kind(f)
            if kind:
                out.append((cls, f.name, kind))
    return out


NUMBER_FIELDS = _number_fields()


def _flag(cls: type, name: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.metadata.get("flag", "--" + name.replace("_", "-")).split("/")[0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e300, 2**70])
@pytest.mark.parametrize("cls, name, kind", NUMBER_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in NUMBER_FIELDS])
def test_every_number_setting_refuses_non_finite_and_absurd_values(cls: type, name: str, kind: str, bad) -> None:
    if kind == "int" and isinstance(bad, float) and not math.isfinite(bad):
        bad = 10**30  # an int field cannot hold NaN; the absurd magnitude stands in
    cfg = dataclasses.replace(cls(), **{name: bad})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert _flag(cls, name) in str(err.value), str(err.value)


def test_there_are_many_number_settings_and_all_have_a_finite_range() -> None:
    assert len(NUMBER_FIELDS) >= 40
    for cls, name, _ in NUMBER_FIELDS:
        low, high = bounds_of(cls, name)
        assert math.isfinite(low) and math.isfinite(high) and low <= high


@pytest.mark.parametrize("tiny", [1e-320, -5e-324, 1e-31])
def test_subnormal_floats_are_refused(tiny: float) -> None:
    from meissonic_cli.sample.sample import SampleConfig

    cfg = SampleConfig(model="m", prompt=["a"], token_temperature=tiny)
    with pytest.raises(ConfigError, match="--token-temperature"):
        cfg.validate()


def test_edit_checks_its_sampler_numbers_too() -> None:
    from meissonic_cli.sample.edit import EditConfig
    from meissonic_cli.sample.sample import SampleConfig

    cfg = EditConfig(model="m", image="x.png", prompt="a", sample=SampleConfig(cfg=1e308))
    with pytest.raises(ConfigError, match="--guidance-scale"):
        cfg.validate()


def test_seed_range_is_one_range_everywhere() -> None:
    from meissonic_cli import safety

    assert safety.MAX_SEED == MAX_SEED == 2**63 - 1
    seeds = {(c.__name__, f.name): bounds_of(c, f.name) for c in _configs() for f in dataclasses.fields(c)
             if f.name == "seed"}
    assert len(seeds) >= 5 and set(seeds.values()) == {(0, MAX_SEED)}, seeds


@given(st.integers(0, MAX_SEED), st.integers(0, 10**6))
@SETTINGS
def test_derived_seeds_stay_in_range(seed: int, offset: int) -> None:
    from meissonic_cli.safety import derive_seed

    derived = derive_seed(seed, offset)
    assert 0 <= derived <= MAX_SEED
    if seed + offset <= MAX_SEED:
        assert derived == seed + offset


# ----------------------------------------------------------------------------------------------
# Size bombs


def test_parameter_estimate_is_close_to_the_real_count() -> None:
    import torch

    from meissonic_cli.model.transformer import MeissonicTransformer, meissonic_1b, meissonic_tiny

    for cfg, tolerance in ((meissonic_1b(), 0.05), (meissonic_tiny(), 0.6)):
        with torch.device("meta"):
            real = sum(p.numel() for p in MeissonicTransformer(cfg).parameters())
        assert abs(cfg.estimated_parameters() - real) <= tolerance * real, (cfg.estimated_parameters(), real)


@pytest.mark.parametrize("change", [{"num_layers": 10**12}, {"num_single_layers": 10**6},
                                    {"codebook_size": 2**40, "vocab_size": 2**40 + 1}])
def test_absurd_transformer_config_is_refused_before_allocation(change: dict) -> None:
    from meissonic_cli.model.transformer import TransformerConfig, meissonic_1b

    values = {**meissonic_1b().to_json_dict(), **change}
    with pytest.raises(MeissonicError, match="parameters"):
        TransformerConfig.from_dict(values, source="config.json")


def test_parameter_limit_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    from meissonic_cli.model.transformer import meissonic_1b

    monkeypatch.setenv("MEISSONIC_MAX_PARAMETERS", "1000")
    with pytest.raises(MeissonicError, match="MEISSONIC_MAX_PARAMETERS"):
        meissonic_1b()


# ----------------------------------------------------------------------------------------------
# Readers


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                                 max_size=4)),
    max_leaves=12,
)


def _tmp(data: bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / "file.json"
    path.write_bytes(data)
    return path


@given(st.one_of(json_values.map(lambda v: __import__("json").dumps(v).encode()), st.binary(max_size=60)))
@SETTINGS
def test_dataset_json_reader_returns_its_shape_or_names_the_file(data: bytes) -> None:
    from meissonic_cli.data.shards import read_dataset_info

    path = _tmp(data)
    path.rename(path.with_name("dataset.json"))
    try:
        info = read_dataset_info(path.parent)
    except MeissonicError as err:
        assert "dataset.json" in str(err)
    else:
        assert isinstance(info, dict) and info["format"] == "meissonic-tokens"


@given(st.one_of(json_values.map(lambda v: __import__("json").dumps(v).encode()), st.binary(max_size=60)))
@SETTINGS
def test_stats_reader_returns_its_shape_or_names_the_file(data: bytes) -> None:
    from meissonic_cli.data.shards import read_shard_stats

    folder = Path(tempfile.mkdtemp())
    (folder / "tokens-00000.stats.json").write_bytes(data)
    try:
        stats = read_shard_stats(folder / "tokens-00000.tar")
    except MeissonicError as err:
        assert "tokens-00000.stats.json" in str(err)
    else:
        assert isinstance(stats["count"], int) and isinstance(stats["bytes"], int)


yaml_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.tuples(st.sampled_from(["a", "1", "~", "? [x]", "&a x", "*a", "!!python/none", "- "]),
                       st.sampled_from([" 1", ": *a", ": &a [1, 2]", ": [", ": .inf", ": 1e999", ": {b: *a}"])),
             max_size=6).map(lambda rows: "\n".join(k + v for k, v in rows)),
)


@given(yaml_text)
@SETTINGS
def test_recipe_reader_returns_a_text_keyed_mapping_or_one_error(text: str) -> None:
    from meissonic_cli.train.config import read_yaml_mapping

    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        data = read_yaml_mapping(path)
    except MeissonicError as err:
        assert "recipe.yaml" in str(err)
    else:
        assert isinstance(data, dict) and all(isinstance(k, str) for k in data)


def test_recipe_alias_bomb_is_refused_quickly() -> None:
    import time

    from meissonic_cli.readers import parse_yaml

    rows = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    start = time.perf_counter()
    with pytest.raises(MeissonicError, match="aliases"):
        parse_yaml("\n".join(rows) + "\nlr: *i\n", "recipe.yaml")
    assert time.perf_counter() - start < 2
    assert parse_yaml("x: &a [1, 2]\ny: *a\n", "ok.yaml") == {"x": [1, 2], "y": [1, 2]}  # small aliases are fine
