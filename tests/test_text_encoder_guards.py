"""Text encoder guards: HF config mapping, open_clip configs and checkpoints, full-CLIP detection,
tokenizer/dtype choice of the loaders, and what save_pretrained writes."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_text_encoder import PROMPTS, _clip_model_folder

from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.text_encoder import (
    EOT_ID,
    ClipTokenizer,
    TextEncoder,
    TextEncoderConfig,
    hf_to_open_clip,
    open_clip_to_hf,
    tiny_text_config,
)
from meissonic_cli.model.text_encoder import _config_from_open_clip as config_from_open_clip

# The text_encoder/config.json of the released checkpoint (CLIP-ViT-H-14 text tower), as transformers writes it.
RELEASED_HF_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_size": 1024,
    "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "max_position_embeddings": 77,
    "vocab_size": 49408, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-05, "bos_token_id": 0,
    "eos_token_id": 2, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
    "initializer_range": 0.02,
}


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.tiny(seed=5).eval()


def _same_outputs(a: TextEncoder, b: TextEncoder) -> bool:
    ids = a.tokenize(PROMPTS)
    with torch.no_grad():
        (sa, pa), (sb, pb) = a(ids), b(ids)
    return torch.equal(sa, sb) and torch.equal(pa, pb)


# ----- Hugging Face config mapping


def test_hf_config_round_trips_on_every_field():
    ours = TextEncoderConfig.from_hf(RELEASED_HF_CONFIG)
    assert ours == TextEncoderConfig()  # the released encoder is the paper's ViT-H-14 default
    assert ours.to_hf() == RELEASED_HF_CONFIG
    odd = TextEncoderConfig(width=48, layers=3, heads=4, intermediate_size=96, context_length=64, vocab_size=49500,
                            embed_dim=24, act="quick_gelu", layer_norm_eps=1e-6)
    hf = odd.to_hf()
    assert TextEncoderConfig.from_hf(hf) == odd
    assert TextEncoderConfig.from_hf(hf).to_hf() == hf


def test_hf_config_defaults_and_errors():
    minimal = TextEncoderConfig.from_hf({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    assert minimal == TextEncoderConfig(width=64, layers=2, heads=4, intermediate_size=256, embed_dim=64)
    with pytest.raises(ModelFormatError) as err:
        TextEncoderConfig.from_hf({"hidden_size": 64})
    assert str(err.value) == "config.json: missing field(s) num_hidden_layers, num_attention_heads of a CLIP text config"
    with pytest.raises(ModelFormatError, match=r"hidden_act 'relu' is not supported"):
        TextEncoderConfig.from_hf({**RELEASED_HF_CONFIG, "hidden_act": "relu"})


def test_nested_clip_config_projection_dim():
    text = {k: v for k, v in tiny_text_config().to_hf().items() if k not in ("architectures", "projection_dim")}
    # The top-level projection_dim wins; without it, the text_config's own; without both, the width.
    top = TextEncoderConfig.from_hf({"text_config": {**text, "projection_dim": 8}, "projection_dim": 16})
    assert top.embed_dim == 16 and top.width == 32
    assert TextEncoderConfig.from_hf({"text_config": {**text, "projection_dim": 8}}).embed_dim == 8
    assert TextEncoderConfig.from_hf({"text_config": text}).embed_dim == 32


# ----- What save_pretrained writes


def test_save_pretrained_files_and_config(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "f32")
    assert sorted(p.name for p in (tmp_path / "f32").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert cfg == {**encoder.config.to_hf(), "torch_dtype": "float32"}
    # transformers only loads safetensors files whose metadata names the format.
    with safe_open(str(tmp_path / "f32" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    wide = TextEncoder.tiny(seed=5).double()
    wide.save_pretrained(tmp_path / "f64")
    assert json.loads((tmp_path / "f64" / "config.json").read_text())["torch_dtype"] == "float64"


def test_position_ids_buffer_is_ignored(encoder, tmp_path):
    """Older transformers versions save `embeddings.position_ids`; such folders load all the same."""
    encoder.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert _same_outputs(TextEncoder.from_pretrained(tmp_path).eval(), encoder)


def test_hf_key_mismatch_message(encoder):
    hf = open_clip_to_hf(encoder.model.state_dict(), encoder.config)
    gone = sorted(hf)[:4]
    for k in gone:
        hf.pop(k)
    hf["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelFormatError) as err:
        hf_to_open_clip(hf, encoder.config)
    assert str(err.value) == (f"text_encoder: weights do not match its config.json (missing 4 key(s), e.g. "
                              f"{', '.join(gone[:3])}; unexpected 1 key(s), e.g. extra.weight)")


# ----- from_pretrained: folders, tokenizer and dtype


def test_missing_config_message(tmp_path):
    (tmp_path / "te").mkdir()
    with pytest.raises(ModelFormatError) as err:
        TextEncoder.from_pretrained(tmp_path / "te")
    assert str(err.value) == (f"{tmp_path / 'te'}: expected config.json (a CLIPTextModelWithProjection or "
                              "CLIPModel config)")


def test_tokenizer_choice_and_dtype(encoder, tmp_path):
    root = tmp_path / "model"
    encoder.save_pretrained(root / "text_encoder")
    ClipTokenizer(pad_id=EOT_ID).save_pretrained(root / "tokenizer")  # OpenAI-style padding
    # No vocab.json in text_encoder/: the sibling tokenizer/ folder is used.
    loaded = TextEncoder.from_pretrained(root / "text_encoder", dtype=torch.float64)
    assert loaded.tokenizer.pad_id == EOT_ID and loaded.dtype == torch.float64
    # An explicit tokenizer object is used as it is; a folder is read.
    tok = ClipTokenizer()
    assert TextEncoder.from_pretrained(root, tokenizer=tok).tokenizer is tok
    from_folder = TextEncoder.from_pretrained(root / "text_encoder", tokenizer=root / "tokenizer")
    assert isinstance(from_folder.tokenizer, ClipTokenizer) and from_folder.tokenizer.pad_id == EOT_ID
    assert _same_outputs(from_folder.eval(), encoder)


def test_for_model_pairs_the_model_tokenizer_and_keeps_dtype(encoder, tmp_path):
    root = tmp_path / "model"
    encoder.save_pretrained(root / "text_encoder")
    ClipTokenizer(pad_id=EOT_ID).save_pretrained(root / "tokenizer")
    other = TextEncoder.tiny(seed=9).eval()
    _clip_model_folder(other, tmp_path / "clip")  # its own tokenizer files pad with "!" (id 0)

    own = TextEncoder.for_model(root, dtype=torch.float64)
    assert own.dtype == torch.float64 and _same_outputs(own.float().eval(), encoder)
    paired = TextEncoder.for_model(root, tmp_path / "clip", dtype=torch.float64)
    assert paired.dtype == torch.float64 and paired.tokenizer.pad_id == EOT_ID
    assert _same_outputs(paired.float().eval(), other)
    alone = TextEncoder.for_model(None, tmp_path / "clip")
    assert alone.tokenizer.pad_id == 0 and alone.dtype == torch.float32


# ----- Full CLIPModel folders vs text-model folders


def _with_vision_weights(encoder, folder, config_update):
    encoder.save_pretrained(folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["vision_model.post_layernorm.weight"] = torch.ones(8)
    sd["logit_scale"] = torch.tensor(4.6)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config_update(cfg)))


def _nested(cfg, **extra):
    return {"projection_dim": cfg["projection_dim"], "text_config": cfg, **extra}


@pytest.mark.parametrize("marker", [{"vision_config": {"hidden_size": 8}}, {"model_type": "clip"},
                                    {"architectures": ["CLIPModel"]}], ids=["vision_config", "model_type", "arch"])
def test_any_clip_model_marker_makes_a_full_clip_folder(encoder, tmp_path, marker):
    _with_vision_weights(encoder, tmp_path, lambda cfg: _nested(cfg, **marker))
    assert _same_outputs(TextEncoder.from_pretrained(tmp_path).eval(), encoder)


@pytest.mark.parametrize("update", [
    lambda cfg: _nested(cfg),  # nested text config, but nothing says CLIPModel
    lambda cfg: {**cfg, "model_type": "clip", "text_config": {}},  # a flat text config, whatever its labels
], ids=["nested-unmarked", "flat-labelled-clip"])
def test_vision_weights_refused_unless_a_full_clip_config(encoder, tmp_path, update):
    _with_vision_weights(encoder, tmp_path, update)
    with pytest.raises(ModelFormatError, match=r"unexpected 2 key\(s\), e.g. logit_scale, vision_model"):
        TextEncoder.from_pretrained(tmp_path)


# ----- open_clip configs and checkpoints


def _open_clip_cfg(tmp_path, quick_gelu=False, **text):
    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **text}}
    path = tmp_path / "tiny-clip.json"
    path.write_text(json.dumps(cfg))
    return path, cfg


def test_open_clip_checkpoint_matches_open_clip_and_round_trips(tmp_path):
    """A quick_gelu model with its own vocabulary size: our pooled output is open_clip's encode_text, and
    the HF-format copy save_pretrained writes loads back identical."""
    import open_clip

    path, cfg = _open_clip_cfg(tmp_path, quick_gelu=True, vocab_size=49500)
    assert config_from_open_clip(str(path)) == TextEncoderConfig(
        width=32, layers=2, heads=2, intermediate_size=128, vocab_size=49500, embed_dim=16, act="quick_gelu")
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong activation or layout shows
        for name, p in ref.transformer.named_parameters():
            if "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    enc = TextEncoder.from_open_clip(str(path), tmp_path / "open_clip_pytorch_model.bin").eval()
    ids = enc.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids)[1], ref.encode_text(ids), atol=1e-5, rtol=1e-5)
    enc.save_pretrained(tmp_path / "hf")
    back = TextEncoder.from_pretrained(tmp_path / "hf").eval()
    assert back.config == enc.config and _same_outputs(back, enc)


@pytest.mark.parametrize("option", [{"hf_model_name": "roberta-base"}, {"ls_init_value": 1e-4},
                                    {"final_ln_after_pool": True}, {"proj_type": "mlp"}, {"pool_type": "first"}])
def test_unsupported_open_clip_text_options(tmp_path, option):
    path, _ = _open_clip_cfg(tmp_path, **option)
    name = "pool_type/proj_type" if {"proj_type", "pool_type"} & set(option) else next(iter(option))
    with pytest.raises(ModelFormatError) as err:
        config_from_open_clip(str(path))
    assert str(err.value) == f"open_clip model {str(path)!r}: unsupported text tower option(s) {name}"


def test_from_open_clip_errors(tmp_path):
    with pytest.raises(ModelFormatError) as err:
        TextEncoder.from_open_clip()
    assert str(err.value) == ("from_open_clip needs a local checkpoint file (open_clip_pytorch_model.bin or "
                              ".safetensors); nothing is downloaded")
    torch.save({"logit_scale": torch.tensor(1.0)}, tmp_path / "other.pt")
    # The default model is open_clip's ViT-H-14 (its config ships with open_clip; nothing is downloaded).
    with pytest.raises(ModelFormatError, match=re.escape("not an open_clip ViT-H-14 checkpoint; missing")):
        TextEncoder.from_open_clip(checkpoint=tmp_path / "other.pt")
    with pytest.raises(ModelFormatError) as err:
        TextEncoder.from_open_clip("no-such-model", tmp_path / "other.pt")
    assert str(err.value) == ("unknown open_clip model 'no-such-model'; use a name from open_clip.list_models() "
                              "(e.g. ViT-H-14) or the path of a model config JSON")


def test_config_dataclass_fields_all_reach_hf():
    """Every field of our config is written to config.json and read back (none is silently dropped)."""
    changes = {"width": 2048, "layers": 12, "heads": 8, "intermediate_size": 5000, "context_length": 64,
               "vocab_size": 49500, "embed_dim": 768, "act": "quick_gelu", "layer_norm_eps": 1e-6}
    assert set(changes) == {f.name for f in dataclasses.fields(TextEncoderConfig)}
    for name, value in changes.items():
        cfg = dataclasses.replace(TextEncoderConfig(), **{name: value})
        assert TextEncoderConfig.from_hf(cfg.to_hf()) == cfg, name
