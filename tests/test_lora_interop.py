"""LoRA adapters written by peft and diffusers load into meissonic with peft's own logits, and the adapters
meissonic writes load back into peft (issue 19, item 2).

Every reference here is the package itself: adapters are built with peft (`LoraConfig`, `get_peft_model`,
`inject_adapter_in_model`) on the tiny transformer, saved with peft's `save_pretrained` and with diffusers'
`save_lora_weights` (the official trainer's `unet.` prefix and the `transformer.` prefix of other pipelines),
and peft-injected models (scales set with peft's `set_scale`, several adapters made active with
`set_adapter`) give the logits ours must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from meissonic_cli.errors import InputError, ModelFormatError  # noqa: E402
from meissonic_cli.model.lora import LoRA, apply_lora, save_lora  # noqa: E402
from meissonic_cli.model.lora_files import parse_lora_spec, read_adapter  # noqa: E402
from meissonic_cli.model.transformer import MeissonicTransformer, meissonic_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=1e-5, rtol=0)


def _base() -> MeissonicTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MeissonicTransformer(meissonic_tiny()).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return ((torch.randint(0, 64, (2, 4, 4), generator=g), torch.randn(2, 77, 32, generator=g),
             torch.randn(2, 32, generator=g), torch.tensor([500.0])),
            dict(micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]]).expand(2, 5)))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    args, kw = _inputs()
    with torch.no_grad():
        return model(*args, **kw)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-zero A and B (peft starts B at zero) so the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_scale(model: torch.nn.Module, scale: float, adapter: str = "default") -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(adapter, scale)


def _ours(specs) -> torch.Tensor:
    base = _base()
    applied = apply_lora(base, specs)
    out = _logits(base)
    for a in applied:
        a.remove()
    return out


CONFIGS = {
    # The official trainer's config.
    "official": dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]),
    # Every attention projection and MLP, per-layer ranks and alphas, rsLoRA.
    "patterns": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                                         "proj_mlp", "proj_out", "ff.net.2"],
                     rank_pattern={"single_transformer_blocks.1.attn.to_q": 2}, alpha_pattern={"proj_out": 3}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_save_pretrained_folder_gives_peft_logits_at_scale_1_and_half(tmp_path, name):
    model = get_peft_model(_base(), LoraConfig(**CONFIGS[name]))
    _randomize(model, 2)
    model.save_pretrained(tmp_path / "adapter")
    base_logits = _logits(_base())
    for scale in (1.0, 0.5):
        _peft_scale(model, scale)
        expected = _logits(model.get_base_model())
        ours = _ours([f"{tmp_path / 'adapter'}:{scale}"])
        assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(ours, expected, **TOL)
    # Naming the weights file (config beside it) reads the same adapter.
    torch.testing.assert_close(_ours([(tmp_path / "adapter" / "adapter_model.safetensors", 0.5)]), expected, **TOL)


def _diffusers_save(folder: Path, state: dict, prefix: str, metadata: dict | None = None) -> Path:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin

    if prefix == "unet":  # the official trainer: LoraLoaderMixin.save_lora_weights(unet_lora_layers=...)
        StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=state,
                                                         unet_lora_adapter_metadata=metadata)
    elif prefix == "transformer":
        FluxLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=state,
                                              transformer_lora_adapter_metadata=metadata)
    else:
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "pytorch_lora_weights.safetensors"))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("prefix", ["unet", "transformer", "none"])
def test_diffusers_files_give_peft_logits(tmp_path, prefix):
    config = LoraConfig(**CONFIGS["official"])
    model = inject_adapter_in_model(config, _base())
    _randomize(model, 3)
    state = get_peft_model_state_dict(model)
    expected = _logits(model)
    # Without metadata the file has no alpha: alpha = rank (scale 1 per layer), as diffusers loads it, and a note
    # says so; the trained alpha/r = 2 is then the user's scale.
    plain = _diffusers_save(tmp_path / "plain", state, prefix)
    notes = []
    base = _base()
    applied = apply_lora(base, [f"{plain}:2"], notify=notes.append)
    torch.testing.assert_close(_logits(base), expected, **TOL)
    assert len(notes) == 1 and notes[0].startswith("Note: ") and "alpha = rank" in notes[0]
    assert applied[0].record["scale"] == 2.0 and applied[0].adapter.layout == "diffusers"
    if prefix != "none":  # diffusers writes the LoRA config into the metadata when given it
        with_meta = _diffusers_save(tmp_path / "meta", state, prefix, metadata=config.to_dict())
        torch.testing.assert_close(_ours([with_meta]), expected, **TOL)
        _peft_scale(model, 0.5)
        torch.testing.assert_close(_ours([f"{with_meta.parent}:0.5"]), _logits(model), **TOL)


def test_old_lora_down_up_spelling_with_alphas(tmp_path):
    from safetensors.torch import save_file

    model = inject_adapter_in_model(LoraConfig(**CONFIGS["official"]), _base())
    _randomize(model, 4)
    old = {}
    for key, value in get_peft_model_state_dict(model).items():
        old[key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")] = value
        if ".lora_A." in key:
            old[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(8.0)
    save_file(old, str(tmp_path / "old.safetensors"))
    torch.testing.assert_close(_ours([tmp_path / "old.safetensors"]), _logits(model), **TOL)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_adapters_stack_as_peft_with_both_active(tmp_path):
    first = LoraConfig(**CONFIGS["official"])
    second = LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "proj_out"])
    model = inject_adapter_in_model(first, _base(), adapter_name="a")
    model = inject_adapter_in_model(second, model, adapter_name="b")
    _randomize(model, 5)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(["a", "b"])
    _peft_scale(model, 0.5, "b")
    expected = _logits(model)
    files = [_diffusers_save(tmp_path / n, get_peft_model_state_dict(model, adapter_name=n), "transformer",
                             metadata=c.to_dict()) for n, c in (("a", first), ("b", second))]
    torch.testing.assert_close(_ours([files[0], f"{files[1]}:0.5"]), expected, **TOL)
    # Removing the adapters gives the base model back exactly (nothing was merged).
    base = _base()
    for a in apply_lora(base, files):
        a.remove()
    assert torch.equal(_logits(base), _logits(_base()))


def _our_lora(seed: int = 6) -> tuple[MeissonicTransformer, LoRA]:
    base = _base()
    lora = LoRA(base, rank=2, alpha=3.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return base, lora


def test_adapters_we_save_load_into_peft_and_diffusers_with_the_same_logits(tmp_path):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import set_peft_model_state_dict

    base, lora = _our_lora()
    ours = _logits(base)  # base + our hooks
    save_lora(tmp_path / "lora", lora, model=base)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "to_k", "to_out.0",
                                        "to_q", "to_v"]
    peft_model = PeftModel.from_pretrained(_base(), tmp_path / "lora")
    torch.testing.assert_close(_logits(peft_model.get_base_model()), ours, **TOL)
    # The diffusers file, read by diffusers' own reader (state dict + metadata), injected with peft as diffusers does.
    state, _, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", return_lora_metadata=True)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    model = inject_adapter_in_model(LoraConfig(**meta), _base())
    set_peft_model_state_dict(model, state)
    torch.testing.assert_close(_logits(model), ours, **TOL)
    # And back into meissonic, from the folder and from each file.
    for spec in (tmp_path / "lora", tmp_path / "lora" / "pytorch_lora_weights.safetensors"):
        torch.testing.assert_close(_ours([spec]), ours, **TOL)


def test_bad_adapters_are_refused_naming_the_problem(tmp_path):
    from safetensors.torch import save_file

    base, lora = _our_lora()
    good = {f"{k}": v for k, v in lora.adapter_state_dict().items()}
    cases = {
        "unknown.safetensors": ({"blocks.9.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                                 "blocks.9.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
                                "unknown target modules: blocks.9.attn.to_q"),
        "shape.safetensors": ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16),
                               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
                              r"shape mismatches: transformer_blocks.0.attn.to_q \(adapter 16->32, model 32->32\)"),
        "conv.safetensors": ({"mlm_layer.conv1.lora_A.weight": torch.zeros(2, 32),
                              "mlm_layer.conv1.lora_B.weight": torch.zeros(32, 2)}, r"not linear layers: mlm_layer.conv1"),
        "dora.safetensors": ({**good, "transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(32)},
                             "DoRA magnitudes"),
        "text.safetensors": ({**good, "text_encoder.layer.lora_A.weight": torch.zeros(2, 4)}, "text-encoder adapter"),
        "half.safetensors": ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)}, "lack their A or B"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(ModelFormatError, match=message):
            apply_lora(_base(), [tmp_path / name])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFormatError, match="not a readable safetensors file"):
        read_adapter(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="does not exist"):
        read_adapter(tmp_path / "missing")
    (tmp_path / "loha").mkdir()
    save_lora(tmp_path / "loha", lora)
    cfg = json.loads((tmp_path / "loha" / "adapter_config.json").read_text())
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ModelFormatError, match=r"uses DoRA \(use_dora\)"):
        read_adapter(tmp_path / "loha")
    # Nothing stays attached after a refused adapter in a stack.
    save_lora(tmp_path / "ok", lora)
    model = _base()
    with pytest.raises(ModelFormatError, match="shape mismatches"):
        apply_lora(model, [tmp_path / "ok", tmp_path / "shape.safetensors"])
    assert torch.equal(_logits(model), _logits(_base()))


def test_lora_spec_parsing(tmp_path):
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_lora_spec("x.safetensors") == parse_lora_spec("x.safetensors:1")
    assert parse_lora_spec("x.safetensors:0.7").scale == 0.7
    assert parse_lora_spec(f"{odd}:-0.5") == type(parse_lora_spec("x"))(odd, -0.5)
    assert parse_lora_spec(str(odd)).path == odd  # the colon belongs to the path
    assert parse_lora_spec("C:/adapters/x.safetensors").path == Path("C:/adapters/x.safetensors")
    for bad in ("x:nan", "x:inf", "x:11", "x:-1e9"):
        with pytest.raises(InputError, match="finite number between -10 and 10"):
            parse_lora_spec(bad)


def test_applied_adapters_follow_the_model_to_another_dtype(tmp_path):
    base, lora = _our_lora()
    save_lora(tmp_path / "lora", lora, model=base)
    expected = _logits(base).double()
    model = _base()
    apply_lora(model, [tmp_path / "lora"])
    model.double()  # moved after the adapters were attached
    torch.testing.assert_close(_logits(model), expected, **TOL)


def test_half_precision_model_keeps_float32_adapters_as_peft_does(tmp_path):
    model = get_peft_model(_base().to(torch.bfloat16), LoraConfig(**CONFIGS["official"]))  # peft: float32 adapters
    _randomize(model, 7)
    model.save_pretrained(tmp_path / "adapter")
    expected = _logits(model.get_base_model())
    ours = _base().to(torch.bfloat16)
    applied = apply_lora(ours, [tmp_path / "adapter"])
    assert {p.dtype for a in applied for p in a.updates.parameters()} == {torch.float32}
    assert torch.equal(_logits(ours), expected)
