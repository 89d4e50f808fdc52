"""The transformer module: released key layout, config files, loading/saving, the fast path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from meissonic_cli.errors import ConfigError, InputError, ModelFormatError
from meissonic_cli.model.transformer import (
    MeissonicTransformer,
    TransformerConfig,
    build_on_meta,
    from_pretrained,
    image_ids,
    meissonic_1b,
    meissonic_tiny,
    num_parameters,
    parameter_counts,
)


def _tiny_model(seed: int = 0, **overrides) -> MeissonicTransformer:
    torch.manual_seed(seed)
    model = MeissonicTransformer(meissonic_tiny(**overrides)).eval()
    # Non-trivial weights everywhere (norms and the zero-init-free layers alike).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(cfg: TransformerConfig, b: int = 2, grid=(4, 6), t: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.codebook_size, (b, *grid), generator=g)
    tokens[torch.rand(b, *grid, generator=g) < 0.5] = cfg.mask_token_id
    return dict(
        hidden_states=tokens,
        encoder_hidden_states=torch.randn(b, t, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([7]),
        micro_conds=torch.tensor([[96.0, 64.0, 0.0, 0.0, 6.0]]).repeat(b, 1),
    )


# -- released 1B layout ------------------------------------------------------------------------


def test_released_config_on_meta_matches_checkpoint_keys(conformance_dir: Path) -> None:
    real = json.loads((conformance_dir / "real_model_keys.json").read_text())
    cases = json.loads((conformance_dir / "cases.json").read_text())
    cfg = meissonic_1b()
    assert {k: v for k, v in cfg.to_json_dict().items() if not k.startswith("_")} == real["config"]
    model = build_on_meta(cfg)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == real["shapes"]
    assert num_parameters(model) == cases["real_size"]["num_params"] == 1_006_946_304
    assert len(shapes) == cases["real_size"]["num_tensors"]
    assert parameter_counts(model) == cases["real_size"]["params_by_prefix"]
    assert num_parameters(model, exclude_compression=True) == 1_006_946_304 - 2 * 4_195_328
    assert list(model.buffers()) == []


def test_tiny_state_dict_matches_conformance_weights(conformance_dir: Path) -> None:
    cases = json.loads((conformance_dir / "cases.json").read_text())
    tiny = cases["tiny_model"]
    model = build_on_meta(TransformerConfig.from_dict(tiny["config"]))
    ref = load_file(str(conformance_dir / tiny["weights_file"]))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert num_parameters(model) == tiny["num_params"]
    assert model.config.mask_token_id == tiny["mask_token_id"] and model.config.inner_dim == tiny["inner_dim"]


# -- config ------------------------------------------------------------------------------------


def test_config_json_round_trip_and_errors(tmp_path: Path) -> None:
    cfg = meissonic_1b()
    data = cfg.to_json_dict()
    assert data["_class_name"] == "Transformer2DModel" and data["axes_dims_rope"] == [16, 56, 56]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(data, _name_or_path="x")))
    assert TransformerConfig.from_json(path) == cfg

    path.write_text(json.dumps(dict(data, sample_size=64, norm_type="rms")))
    with pytest.raises(ModelFormatError, match="norm_type, sample_size"):
        TransformerConfig.from_json(path)
    missing = {k: v for k, v in data.items() if k != "codebook_size"}
    path.write_text(json.dumps(missing))
    with pytest.raises(ModelFormatError, match="missing .*codebook_size"):
        TransformerConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        TransformerConfig.from_json(path)
    with pytest.raises(ModelFormatError, match="expected .*nope"):
        TransformerConfig.from_json(tmp_path / "nope" / "config.json")


def test_config_validation_names_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        meissonic_tiny(pooled_projection_dim=16, axes_dims_rope=(2, 2, 2), downsample=False)
    text = str(err.value)
    assert "pooled_projection_dim" in text and "axes_dims_rope" in text and "downsample and upsample" in text


# -- loading and saving --------------------------------------------------------------------------


def test_save_and_load_single_and_sharded(tmp_path: Path) -> None:
    model = _tiny_model()
    root = tmp_path / "model"
    tdir = model.save_pretrained(root / "transformer")
    assert sorted(p.name for p in tdir.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((tdir / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    for folder in (root, tdir):  # model root or the transformer folder itself
        loaded = from_pretrained(folder)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())

    model.save_pretrained(tdir, max_shard_size="40KB")
    names = sorted(p.name for p in tdir.iterdir())
    assert "diffusion_pytorch_model.safetensors" not in names  # stale single file removed
    shards = [n for n in names if n.startswith("diffusion_pytorch_model-")]
    assert len(shards) > 1 and "diffusion_pytorch_model.safetensors.index.json" in names
    index = json.loads((tdir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    loaded = from_pretrained(root, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(v.to(torch.bfloat16), loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(p.name.endswith(".tmp") for p in tdir.iterdir())


def test_load_errors_name_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="model folder not found"):
        from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="transformer/config.json"):
        from_pretrained(tmp_path / "empty")

    model = _tiny_model()
    tdir = model.save_pretrained(tmp_path / "m" / "transformer")
    weights = tdir / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    with pytest.raises(ModelFormatError, match="diffusion_pytorch_model.safetensors"):
        from_pretrained(tmp_path / "m")

    bad = dict(state)
    bad.pop("embed.conv.weight")
    bad["norm_out.linear.weight"] = torch.zeros(2)
    save_file(bad, str(weights))
    with pytest.raises(ModelFormatError, match=r"missing key\(s\) \(e.g. embed.conv.weight\).*unexpected key\(s\) \(e.g. norm_out"):
        from_pretrained(tmp_path / "m")

    bad = dict(state)
    bad["embed.embeddings.weight"] = torch.zeros(3, 3)
    save_file(bad, str(weights))
    with pytest.raises(ModelFormatError, match="shape mismatch"):
        from_pretrained(tmp_path / "m")

    weights.write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="cannot read weights"):
        from_pretrained(tmp_path / "m")


# -- forward semantics ------------------------------------------------------------------------


def test_image_ids_cover_the_grid_the_blocks_see() -> None:
    down = image_ids(4, 6, meissonic_tiny())
    assert down.shape == (6, 3) and down[:, 0].eq(0).all()
    assert down[4].tolist() == [0.0, 1.0, 1.0]  # row-major over the 2x3 compressed grid
    full = image_ids(4, 6, meissonic_tiny(downsample=False, upsample=False))
    assert full.shape == (24, 3) and full[-1].tolist() == [0.0, 3.0, 5.0]


def test_forward_shapes_and_bad_inputs() -> None:
    model = _tiny_model()
    cfg = model.config
    inp = _inputs(cfg)
    with torch.no_grad():
        logits = model(**inp)
        assert logits.shape == (2, cfg.codebook_size, 4, 6)
        explicit = model(**inp, img_ids=image_ids(4, 6, cfg), txt_ids=torch.zeros(5, 3))
        assert torch.equal(logits, explicit)
        with pytest.raises(InputError, match=r"img_ids must be \(6, 3\)"):
            model(**inp, img_ids=image_ids(8, 12, cfg))  # the official 512-style ids on a compressing model
        with pytest.raises(InputError, match="even sides"):
            model(**dict(inp, hidden_states=inp["hidden_states"][:, :3]))
        with pytest.raises(InputError, match="micro_conds"):
            model(**dict(inp, micro_conds=torch.zeros(2, 4)))


def test_timestep_broadcast_and_scaling() -> None:
    model = _tiny_model()
    inp = _inputs(model.config)
    with torch.no_grad():
        one = model(**inp)
        both = model(**dict(inp, timestep=torch.tensor([7.0, 7.0])))
        other = model(**dict(inp, timestep=torch.tensor([3])))
    assert torch.allclose(one, both, atol=1e-6)
    assert not torch.allclose(one, other, atol=1e-3)


def test_forward_cached_equals_forward_on_conformance_weights(conformance_dir: Path) -> None:
    cases = json.loads((conformance_dir / "cases.json").read_text())["cases"]
    weights = load_file(str(conformance_dir / "tiny_weights.safetensors"))
    for name, case in cases.items():
        cfg = TransformerConfig.from_dict(case["config"])
        model = MeissonicTransformer(cfg).eval()
        model.load_state_dict({k: v for k, v in weights.items() if cfg.downsample or not k.startswith(("down_", "up_"))})
        t = load_file(str(conformance_dir / case["file"]))
        inp = {k[6:]: v for k, v in t.items() if k.startswith("input.")}
        with torch.no_grad():
            full = model(**inp)
            cond = model.prepare_conditioning(
                inp["encoder_hidden_states"], inp["pooled_projections"], inp["micro_conds"],
                tuple(inp["hidden_states"].shape[1:]), inp["img_ids"], inp["txt_ids"],
            )
            cached = model.forward_cached(inp["hidden_states"], inp["timestep"], cond)
            assert (cached - full).abs().max().item() <= 1e-5, name
            b, k, h, w = full.shape
            g = torch.Generator().manual_seed(0)
            positions = torch.stack([torch.randperm(h * w, generator=g)[: h * w // 3] for _ in range(b)])
            picked = model.forward_cached(inp["hidden_states"], inp["timestep"], cond, positions=positions)
            expected = torch.gather(full.flatten(2).transpose(1, 2), 1, positions[..., None].expand(-1, -1, k))
            assert picked.shape == (b, h * w // 3, k)
            assert (picked - expected).abs().max().item() <= 1e-5, name


def test_conditioning_is_reused_across_steps_and_batches() -> None:
    model = _tiny_model()
    inp = _inputs(model.config, b=1)
    with torch.no_grad():
        cond = model.prepare_conditioning(inp["encoder_hidden_states"], inp["pooled_projections"], inp["micro_conds"], (4, 6))
        tokens = inp["hidden_states"].repeat(3, 1, 1)
        for step in (9, 2):
            ref = model(**dict(inp, timestep=torch.tensor([step])))
            out = model.forward_cached(tokens, torch.tensor([step]), cond)
            assert torch.allclose(out, ref.expand_as(out), atol=1e-5)
        with pytest.raises(InputError, match="grid"):
            model.forward_cached(tokens[:, :2], torch.tensor([1]), cond)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = _tiny_model().train()
    inp = _inputs(model.config)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(**inp).float().logsumexp(1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_half_precision_forward_runs_and_stays_close() -> None:
    model = _tiny_model()
    inp = _inputs(model.config)
    with torch.no_grad():
        ref = model(**inp)
        out = model.to(torch.bfloat16)(**inp)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
