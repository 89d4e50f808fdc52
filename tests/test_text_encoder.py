"""CLIP text encoder: tokenization, penultimate features, HF-format mapping and round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.text_encoder import EOT_ID, SOT_ID, ClipTokenizer, TextEncoder

PROMPTS = ["a photo of a cat", "a red circle on the left of a blue square"]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.tiny(seed=3).eval()


def test_tokenizer_known_ids_padding_and_truncation():
    tok = ClipTokenizer()
    ids = tok(["a photo of a cat", "word " * 200, ""])
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    # CLIP BPE ids of "a photo of a cat" (the same in the Hugging Face CLIP tokenizer).
    assert ids[0, :7].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID]
    assert ids[0, 7:].eq(0).all()
    assert ids[1, 0] == SOT_ID and ids[1, -1] == EOT_ID and not ids[1].eq(0).any()
    assert ids[2, :2].tolist() == [SOT_ID, EOT_ID] and ids[2, 2:].eq(0).all()


def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def _hf_layer(x, sd, i, heads):
    """One CLIP encoder layer computed from Hugging Face weight names, with its eager-attention formula."""
    p = f"text_model.encoder.layers.{i}."
    b, n, d = x.shape
    hd = d // heads
    h = _layer_norm(x, sd, p + "layer_norm1")

    def proj(name):
        return h @ sd[p + f"self_attn.{name}.weight"].T + sd[p + f"self_attn.{name}.bias"]

    q = (proj("q_proj") * hd ** -0.5).view(b, n, heads, hd).transpose(1, 2)
    k = proj("k_proj").view(b, n, heads, hd).transpose(1, 2)
    v = proj("v_proj").view(b, n, heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2)
    causal = torch.full((n, n), float("-inf")).triu(1)
    attn = torch.softmax(scores + causal, dim=-1) @ v
    attn = attn.transpose(1, 2).reshape(b, n, d)
    x = x + attn @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
    h = _layer_norm(x, sd, p + "layer_norm2")
    h = h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def test_hf_weights_reproduced_by_hand(encoder, tmp_path):
    """The saved HF-format weights, run with CLIP's own formulas, give our seq and pooled outputs."""
    encoder.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    ids = encoder.tokenize(PROMPTS)
    x = sd["text_model.embeddings.token_embedding.weight"][ids] + sd["text_model.embeddings.position_embedding.weight"]
    h1 = _hf_layer(x, sd, 0, heads=2)  # hidden_states[1] == hidden_states[-2] for 2 layers
    h2 = _hf_layer(h1, sd, 1, heads=2)
    final = _layer_norm(h2, sd, "text_model.final_layer_norm")
    pooled_ref = final[torch.arange(len(PROMPTS)), ids.argmax(-1)] @ sd["text_projection.weight"].T

    with torch.no_grad():
        seq, pooled = encoder(ids)
    assert seq.shape == (2, 77, 32) and pooled.shape == (2, 32)
    torch.testing.assert_close(seq, h1, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pooled, pooled_ref, atol=2e-5, rtol=1e-4)
    # The sequence is the penultimate layer, not the last one (with or without the final norm).
    assert (seq - h2).abs().max() > 1e-2
    assert (seq - final).abs().max() > 1e-2


def test_save_load_round_trip(encoder, tmp_path):
    root = tmp_path / "model"
    encoder.save_pretrained(root / "text_encoder")
    ClipTokenizer().save_pretrained(root / "tokenizer")
    cfg = json.loads((root / "text_encoder" / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 2 and cfg["projection_dim"] == 32
    assert cfg["architectures"] == ["CLIPTextModelWithProjection"]
    keys = load_file(str(root / "text_encoder" / "model.safetensors"))
    assert keys["text_projection.weight"].shape == (32, 32)
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in keys

    with torch.no_grad():
        ref = encoder.encode(PROMPTS)
    for folder in (root, root / "text_encoder"):  # the model root or the folder itself
        loaded = TextEncoder.from_pretrained(folder).eval()
        with torch.no_grad():
            got = loaded.encode(PROMPTS)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_sharded_index_loads(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in parts.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / fname))
    index = {"weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = TextEncoder.from_pretrained(tmp_path).eval()
    ids = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[1], encoder(ids)[1])


def test_from_open_clip_checkpoint(encoder, tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "tiny-clip.json").write_text(json.dumps(cfg))
    full = {k: v.clone() for k, v in encoder.model.state_dict().items() if k != "attn_mask"}
    full["visual.conv1.weight"] = torch.zeros(32, 3, 16, 16)  # image-tower weights are ignored
    full["logit_scale"] = torch.tensor(4.6)
    torch.save({"state_dict": {"module." + k: v for k, v in full.items()}}, tmp_path / "ckpt.pt")
    loaded = TextEncoder.from_open_clip(str(tmp_path / "tiny-clip.json"), tmp_path / "ckpt.pt").eval()
    ids = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], encoder(ids)[0])

    with pytest.raises(ModelFormatError, match="missing"):
        torch.save({"logit_scale": torch.tensor(1.0)}, tmp_path / "bad.pt")
        TextEncoder.from_open_clip(str(tmp_path / "tiny-clip.json"), tmp_path / "bad.pt")
    with pytest.raises(ModelFormatError, match="unknown open_clip model"):
        TextEncoder.from_open_clip("no-such-model", tmp_path / "ckpt.pt")


def test_missing_and_mismatched_files(encoder, tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        TextEncoder.from_pretrained(tmp_path / "nope")
    (tmp_path / "te").mkdir()
    with pytest.raises(ModelFormatError, match="config.json"):
        TextEncoder.from_pretrained(tmp_path / "te")
    encoder.save_pretrained(tmp_path / "te")
    (tmp_path / "te" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        TextEncoder.from_pretrained(tmp_path / "te")
    sd = load_file(str(tmp_path / "moved.safetensors"))
    sd.pop("text_projection.weight")
    save_file(sd, str(tmp_path / "te" / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="text_projection.weight"):
        TextEncoder.from_pretrained(tmp_path / "te")


def test_tokenizer_folder_settings(tmp_path):
    ClipTokenizer().save_pretrained(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab["a</w>"] == 320 and vocab["<|endoftext|>"] == EOT_ID and vocab["!"] == 0
    assert ClipTokenizer.from_pretrained(tmp_path).pad_id == 0

    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    special["pad_token"] = "<|endoftext|>"  # OpenAI-style padding
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = ClipTokenizer.from_pretrained(tmp_path)
    assert tok.pad_id == EOT_ID and tok("a cat")[0, -1] == EOT_ID

    # The BPE comes from the folder's own files: a merges.txt that names a token vocab.json lacks is refused,
    # and one whose merges differ tokenizes by them.
    lines = (tmp_path / "merges.txt").read_text().split("\n")
    saved = list(lines)
    lines[5] = "q z"
    (tmp_path / "merges.txt").write_text("\n".join(lines))
    with pytest.raises(ModelFormatError, match="do not belong together"):
        ClipTokenizer.from_pretrained(tmp_path)
    cut = "\n".join(line for line in saved if line != "c at</w>")  # drop the merge that makes 'cat</w>'
    (tmp_path / "merges.txt").write_text(cut)
    pieces = ClipTokenizer.from_pretrained(tmp_path).tokens("a cat")
    assert pieces[0] == "a</w>" and "cat</w>" not in pieces and "".join(pieces[1:]) == "cat</w>"
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(ModelFormatError, match="has merges.txt but not vocab.json"):
        ClipTokenizer.from_pretrained(tmp_path)


def test_added_tokens_split_before_bpe(tmp_path):
    """Every special token (and `added_tokens_decoder` entry) is cut out of the raw text before the BPE,
    by exact match, with its strip flags; the laion pad token `!` is then id 0 on its own."""
    tok = ClipTokenizer()
    assert tok.pad_id == 0 and tok.added["!"].id == 0
    ids = tok(["wow!", "!!!", "go!<|endoftext|>", "<|ENDOFTEXT|>"])
    assert ids[0, :4].tolist() == [SOT_ID, tok.vocab.encoder["wow</w>"], 0, EOT_ID]
    assert ids[1, :5].tolist() == [SOT_ID, 0, 0, 0, EOT_ID]
    assert ids[2, :5].tolist() == [SOT_ID, tok.vocab.encoder["go</w>"], 0, EOT_ID, EOT_ID]
    # Upper case is not an exact match: it reaches the BPE, whose regex still knows the token.
    assert ids[3, :3].tolist() == [SOT_ID, EOT_ID, EOT_ID]
    assert tok.tokens("wow！") == ["wow</w>", "!</w>"]  # a "!" made by cleaning (fullwidth) is BPE's own

    ClipTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(tok.vocab.encoder["cat</w>"]): {
        "content": "<cat>", "lstrip": True, "rstrip": True, "single_word": False, "normalized": False, "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    custom = ClipTokenizer.from_pretrained(tmp_path)
    assert custom.tokens("a  <cat>  dog") == ["a</w>", "<cat>", "dog</w>"]
    assert custom("a<cat>")[0, :4].tolist() == [SOT_ID, 320, tok.vocab.encoder["cat</w>"], EOT_ID]


def _clip_model_folder(encoder: TextEncoder, folder) -> None:
    """A full Hugging Face CLIPModel folder around `encoder` (random vision tower), with tokenizer files."""
    encoder.save_pretrained(folder)
    text_cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    weights["vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 4, 4)
    weights["vision_model.post_layernorm.weight"] = torch.ones(8)
    weights["visual_projection.weight"] = torch.randn(text_cfg["projection_dim"], 8)
    weights["logit_scale"] = torch.tensor(4.6)
    save_file(weights, str(folder / "model.safetensors"))
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": text_cfg["projection_dim"],
              "text_config": {k: v for k, v in text_cfg.items() if k != "architectures"},
              "vision_config": {"hidden_size": 8, "patch_size": 4, "image_size": 8}}
    # laion's config keeps the text tower's real values in text_config_dict; text_config holds defaults.
    config["text_config"]["hidden_size"] = 1024
    config["text_config_dict"] = {"hidden_size": text_cfg["hidden_size"]}
    (folder / "config.json").write_text(json.dumps(config))
    ClipTokenizer().save_pretrained(folder)


def test_full_clip_model_folder_loads_its_text_tower(encoder, tmp_path):
    _clip_model_folder(encoder, tmp_path / "clip")
    loaded = TextEncoder.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        ref, got = encoder.encode(PROMPTS), loaded.encode(PROMPTS)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert loaded.tokenizer.pad_id == 0
    # A text-model folder with vision weights (no CLIPModel config) is still refused, naming them.
    encoder.save_pretrained(tmp_path / "te")
    sd = load_file(str(tmp_path / "te" / "model.safetensors"))
    sd["vision_model.post_layernorm.weight"] = torch.ones(8)
    save_file(sd, str(tmp_path / "te" / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="unexpected 1 key"):
        TextEncoder.from_pretrained(tmp_path / "te")


def test_trainable_under_autograd():
    enc = TextEncoder.tiny(seed=1).train()
    enc.set_grad_checkpointing(True)
    seq, pooled = enc.encode(PROMPTS)
    (seq.square().mean() + pooled.square().mean()).backward()
    assert enc.model.token_embedding.weight.grad is not None
    assert enc.model.token_embedding.weight.grad.abs().sum() > 0
    assert enc.model.text_projection.grad.abs().sum() > 0
