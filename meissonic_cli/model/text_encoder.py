"""The CLIP text encoder that conditions Meissonic, built on open_clip's text tower.

Meissonic conditions on CLIP-ViT-H-14 (laion2B) text features, exactly as the official pipeline
reads them from `CLIPTextModelWithProjection(..., output_hidden_states=True)`:

- the text sequence `(B, 77, D)` is `hidden_states[-2]`: the output of the penultimate transformer
  layer, with no final layer norm;
- the pooled vector `(B, P)` is `text_embeds`: `ln_final(last layer)` at the end-of-text token
  (the highest token id), times the text projection.

The module is open_clip's `TextTransformer` (so open_clip checkpoints load as they are); the released
checkpoint's `text_encoder/` folder (Hugging Face CLIP format) is mapped onto it: q/k/v projections
are concatenated into `in_proj`, `fc1/fc2` become `c_fc/c_proj` and the projection is transposed.
`save_pretrained` writes that Hugging Face format back, so tiny test folders round-trip.

Prompts are tokenized to 77 ids exactly as the Hugging Face `CLIPTokenizer` the checkpoint was
trained with (`ClipTokenizer`, built from the folder's vocab.json/merges.txt and special-token
files; no transformers needed): added/special tokens (with the laion files the pad token "!") are
split out of the raw text first, each remaining chunk gets ftfy + whitespace + lower-case cleaning
and CLIP's byte-level BPE; then start-of-text, at most 75 ids, end-of-text and the pad id.

`TextEncoder.from_pretrained` reads a `CLIPTextModelWithProjection` folder, a model root holding
`text_encoder/`, or a full `CLIPModel` folder (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the
encoder the official scripts load), whose vision tower is ignored.

The encoder is a plain `nn.Module`: `forward(token_ids)` works under autograd, so a training stage
can unfreeze it.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from meissonic_cli.atomic import atomic_write, write_text
from meissonic_cli.config import read_json_object
from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.clip_tokenizer import ClipTokenizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"

SOT_ID = 49406
EOT_ID = 49407


MAX_TEXT_SIZE = 1 << 20  # any one size of a text encoder config (the released one's largest is 49408)

@dataclass
class TextEncoderConfig:
    """Shape of a CLIP text tower. Defaults are CLIP-ViT-H-14's, the paper's encoder."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate_size: int = 4096
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 1024  # projection_dim: size of the pooled output
    act: str = "gelu"  # "gelu" (laion ViT-H-14) or "quick_gelu" (OpenAI CLIP)
    layer_norm_eps: float = 1e-5

    def validate(self) -> None:
        sizes = {"hidden_size": self.width, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                 "intermediate_size": self.intermediate_size, "max_position_embeddings": self.context_length,
                 "vocab_size": self.vocab_size, "projection_dim": self.embed_dim}
        bad = [f"{k} must be a whole number in [1, {MAX_TEXT_SIZE:,}], got {v!r}" for k, v in sizes.items()
               if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TEXT_SIZE]
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and 0 < eps < 1):
            bad.append(f"layer_norm_eps must be a finite number in (0, 1), got {eps!r}")
        if bad:
            raise ModelFormatError("text encoder config: " + "; ".join(bad))
        from meissonic_cli.safety import check_parameter_count

        check_parameter_count((self.vocab_size + self.context_length) * self.width
                              + self.layers * (4 * self.width + 2 * self.intermediate_size) * self.width
                              + self.width * self.embed_dim, "text encoder config")
        problems = []
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.layers < 2:
            problems.append("the penultimate-layer features need at least 2 layers")
        if self.vocab_size <= EOT_ID:
            problems.append(f"vocab_size {self.vocab_size} is smaller than the CLIP BPE vocabulary (49408)")
        if self.act not in ("gelu", "quick_gelu"):
            problems.append(f"hidden_act {self.act!r} is not supported (expected gelu or quick_gelu)")
        if problems:
            raise ModelFormatError("text encoder config: " + "; ".join(problems))

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` of a Hugging Face `CLIPTextModelWithProjection`."""
        return {
            "architectures": ["CLIPTextModelWithProjection"],
            "model_type": "clip_text_model",
            "hidden_size": self.width,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "max_position_embeddings": self.context_length,
            "vocab_size": self.vocab_size,
            "projection_dim": self.embed_dim,
            "hidden_act": self.act,
            "layer_norm_eps": self.layer_norm_eps,
            "bos_token_id": 0,
            # eos_token_id 2 selects argmax pooling in transformers, which is what open_clip does.
            "eos_token_id": 2,
            "pad_token_id": 1,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
        }

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "TextEncoderConfig":
        # Some exported configs nest the text part under "text_config" (a full CLIPConfig).
        if "text_config" in cfg and "hidden_size" not in cfg:
            text = dict(cfg.get("text_config") or {})
            # Older CLIPModel configs (laion's among them) keep the values that matter in text_config_dict.
            text.update(cfg.get("text_config_dict") or {})
            cfg = {**text, "projection_dim": cfg.get("projection_dim", text.get("projection_dim"))}
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ModelFormatError(f"{source}: missing field(s) {', '.join(missing)} of a CLIP text config")
        def whole(key: str, default: Any = None) -> int:
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelFormatError(f"{source}: {key} must be a whole number, got {value!r}")
            return value

        eps = cfg.get("layer_norm_eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ModelFormatError(f"{source}: layer_norm_eps must be a number, got {eps!r}")
        width = whole("hidden_size")
        out = cls(
            width=width,
            layers=whole("num_hidden_layers"),
            heads=whole("num_attention_heads"),
            intermediate_size=whole("intermediate_size", 4 * width),
            context_length=whole("max_position_embeddings", 77),
            vocab_size=whole("vocab_size", 49408),
            embed_dim=whole("projection_dim", None) if cfg.get("projection_dim") else width,
            act=str(cfg.get("hidden_act", "gelu")),
            layer_norm_eps=float(eps),
        )
        try:
            out.validate()
        except ModelFormatError as err:
            raise ModelFormatError(f"{source}: {err}") from None
        return out


def vit_h14_text_config() -> TextEncoderConfig:
    """CLIP-ViT-H-14's text tower: width 1024, 24 layers, 16 heads, 77 tokens, projection 1024."""
    return TextEncoderConfig()


def tiny_text_config(embed_dim: int = 32) -> TextEncoderConfig:
    """A tiny text tower for tests (width 32, 2 layers, 2 heads); keeps the real BPE vocabulary."""
    return TextEncoderConfig(width=32, layers=2, heads=2, intermediate_size=128, embed_dim=embed_dim)


# ---------------------------------------------------------------------------------------------
# The encoder


class TextEncoder(nn.Module):
    """CLIP text tower returning (penultimate hidden states, projected pooled embedding)."""

    def __init__(self, config: TextEncoderConfig | None = None, tokenizer: ClipTokenizer | None = None):
        super().__init__()
        from open_clip.transformer import LayerNormFp32, QuickGELU, TextTransformer

        config = config or vit_h14_text_config()
        config.validate()
        self.config = config
        # LayerNormFp32 equals LayerNorm in float32 and keeps half-precision runs stable.
        self.model = TextTransformer(
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            width=config.width,
            heads=config.heads,
            layers=config.layers,
            mlp_ratio=config.intermediate_size / config.width,
            output_dim=config.embed_dim,
            pool_type="argmax",
            act_layer=QuickGELU if config.act == "quick_gelu" else nn.GELU,
            norm_layer=functools.partial(LayerNormFp32, eps=config.layer_norm_eps),
        )
        self.tokenizer = tokenizer or ClipTokenizer(config.context_length)
        self.grad_checkpointing = False

    @property
    def width(self) -> int:
        """D, the size of each text-sequence vector."""
        return self.config.width

    @property
    def pooled_dim(self) -> int:
        """P, the size of the pooled embedding."""
        return self.config.embed_dim

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    def tokenize(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Token ids `(B, context_length)` (int64, on CPU)."""
        return self.tokenizer(prompts)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(seq (B,L,D) from the penultimate layer, pooled (B,P))` for token ids `(B,L)`."""
        m = self.model
        length = token_ids.shape[1]
        x = m.token_embedding(token_ids).to(self.dtype) + m.positional_embedding[:length].to(self.dtype)
        mask = m.attn_mask[:length, :length].to(x.dtype)
        blocks = list(m.transformer.resblocks)
        seq = x
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, None, None, mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
            if i == len(blocks) - 2:
                seq = x
        last = m.ln_final(x)
        eot = token_ids.argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eot] @ m.text_projection
        return seq, pooled

    def encode(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and encode prompts: `(seq (B,77,D), pooled (B,P))` on the encoder's device."""
        return self(self.tokenize(prompts).to(self.device))

    def cast(self, dtype: torch.dtype) -> "TextEncoder":
        """Weights in `dtype`; in a half dtype the LayerNorms keep float32 weights (they compute in float32,
        `LayerNormFp32`, and on the CPU F.layer_norm takes no half weights for a float32 input)."""
        self.to(dtype)
        if dtype != torch.float32:
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.float()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ----- builders and loaders

    @classmethod
    def tiny(cls, seed: int = 0, embed_dim: int = 32) -> "TextEncoder":
        """A tiny randomly initialised encoder (width 32, 2 layers) for tests."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(tiny_text_config(embed_dim=embed_dim))

    @classmethod
    def from_open_clip(cls, model_name: str = "ViT-H-14", checkpoint: str | Path | None = None,
                       dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Build the text tower of an open_clip model and load its weights from a local checkpoint file.

        `model_name` is an open_clip config name (e.g. "ViT-H-14") or the path of an open_clip model
        config JSON; `checkpoint` is a local `.bin/.pt/.pth/.safetensors` file of the full CLIP model
        (the image tower's weights are ignored). Nothing is downloaded.
        """
        if checkpoint is None:
            raise ModelFormatError(
                "from_open_clip needs a local checkpoint file (open_clip_pytorch_model.bin or .safetensors); "
                "nothing is downloaded"
            )
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelFormatError(f"open_clip checkpoint not found: {path}")
        config = _config_from_open_clip(model_name)
        encoder = cls._empty(config)
        state = _load_state_file(path)
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        prefix = "text." if "text.token_embedding.weight" in state else ""
        own = encoder.model.state_dict()
        text_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own}
        missing = sorted(set(own) - set(text_state))
        if missing:
            raise ModelFormatError(
                f"{path}: not an open_clip {model_name} checkpoint; missing {len(missing)} text-tower key(s), "
                f"e.g. {', '.join(prefix + k for k in missing[:3])}"
            )
        _load_checked(encoder.model, text_state, str(path))
        return encoder.to(dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                        tokenizer: "ClipTokenizer | str | Path | None" = None,
                        variant: str | None = None) -> "TextEncoder":
        """Load a Hugging Face `CLIPTextModelWithProjection` folder, a model root holding `text_encoder/`,
        or a full `CLIPModel` folder (its vision tower and logit scale are ignored).

        The tokenizer is `tokenizer` (a ClipTokenizer or a tokenizer folder) when given; else the
        folder's own tokenizer files (vocab.json, as in a laion CLIP folder), else the sibling
        `tokenizer/` folder, else CLIP's bundled BPE in the laion layout. `variant` (fp16/bf16) reads
        `model.fp16.safetensors` when the folder holds it (`state_io.weight_files`).
        """
        folder = Path(folder)
        if (folder / "text_encoder").is_dir():
            root, folder = folder, folder / "text_encoder"
        else:
            root = folder.parent
        if not folder.is_dir():
            raise ModelFormatError(f"text encoder folder not found: {folder}")
        config_path = folder / HF_CONFIG
        raw = read_json_object(config_path, f"{folder}: expected {HF_CONFIG} (a CLIPTextModelWithProjection or "
                                            f"CLIPModel config)")
        config = TextEncoderConfig.from_hf(raw, str(config_path))
        if tokenizer is None:
            if (folder / "vocab.json").is_file():
                tokenizer = ClipTokenizer.from_pretrained(folder, config.context_length)
            elif (root / "tokenizer").is_dir():
                tokenizer = ClipTokenizer.from_pretrained(root / "tokenizer", config.context_length)
            else:
                tokenizer = ClipTokenizer(config.context_length)
        elif not isinstance(tokenizer, ClipTokenizer):
            tokenizer = ClipTokenizer.from_pretrained(tokenizer, config.context_length)
        hf_state = _read_safetensors_folder(folder, HF_WEIGHTS, HF_WEIGHTS_INDEX, variant)
        if _is_full_clip(raw):
            # A CLIPModel checkpoint: the text tower's keys are those of CLIPTextModelWithProjection.
            hf_state = {k: v for k, v in hf_state.items()
                        if not k.startswith(("vision_model.", "visual_projection.")) and k != "logit_scale"}
        encoder = cls._empty(config, tokenizer)
        _load_checked(encoder.model, hf_to_open_clip(hf_state, config, str(folder)), str(folder))
        return encoder.cast(dtype)

    @classmethod
    def for_model(cls, root: str | Path | None, folder: str | Path | None = None,
                  dtype: torch.dtype = torch.float32, variant: str | None = None) -> "TextEncoder":
        """The text encoder a model folder `root` runs with: its own `text_encoder/`, or `folder` (another
        CLIPTextModelWithProjection or CLIPModel folder, as the official scripts load laion's) with the
        model's `tokenizer/` when it has one (the official scripts pair them so)."""
        if folder is None:
            if root is None:
                raise ModelFormatError("no text encoder: give a model folder or a text encoder folder")
            return cls.from_pretrained(root, dtype, variant=variant)
        tokenizer = Path(root) / "tokenizer" if root is not None else None
        return cls.from_pretrained(folder, dtype, tokenizer=tokenizer if tokenizer and tokenizer.is_dir() else None,
                                   variant=variant)

    @classmethod
    def _empty(cls, config: TextEncoderConfig, tokenizer: ClipTokenizer | None = None) -> "TextEncoder":
        # Built on the meta device: random init of a 354M-parameter tower only to overwrite it is slow.
        with torch.device("meta"):
            encoder = cls(config, tokenizer)
        encoder.model.register_buffer("attn_mask", torch.full((config.context_length,) * 2, float("-inf")).triu(1),
                                      persistent=False)
        return encoder

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` + `model.safetensors` in the Hugging Face CLIPTextModelWithProjection format."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        hf = open_clip_to_hf(self.model.state_dict(), self.config)
        config = {**self.config.to_hf(), "torch_dtype": str(self.dtype).replace("torch.", "")}
        tensors = {k: v.detach().contiguous().cpu() for k, v in hf.items()}
        atomic_write(folder / HF_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        write_text(folder / HF_CONFIG, json.dumps(config, indent=2))


def _config_from_open_clip(model_name: str) -> TextEncoderConfig:
    path = Path(model_name)
    if path.suffix == ".json" and path.is_file():
        model_cfg = json.loads(path.read_text())
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ModelFormatError(
                f"unknown open_clip model {model_name!r}; use a name from open_clip.list_models() (e.g. ViT-H-14) "
                "or the path of a model config JSON"
            )
    text = model_cfg.get("text_cfg", {})
    unsupported = [k for k in ("hf_model_name", "embed_cls", "no_causal_mask", "ls_init_value", "qk_norm",
                               "proj_bias", "final_ln_after_pool") if text.get(k)]
    if text.get("pool_type", "argmax") != "argmax" or text.get("proj_type", "linear") != "linear":
        unsupported.append("pool_type/proj_type")
    if unsupported:
        raise ModelFormatError(f"open_clip model {model_name!r}: unsupported text tower option(s) {', '.join(unsupported)}")
    width = int(text.get("width", 512))
    return TextEncoderConfig(
        width=width,
        layers=int(text.get("layers", 12)),
        heads=int(text.get("heads", 8)),
        intermediate_size=int(width * float(text.get("mlp_ratio", 4.0))),
        context_length=int(text.get("context_length", 77)),
        vocab_size=int(text.get("vocab_size", 49408)),
        embed_dim=int(model_cfg.get("embed_dim", width)),
        act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face <-> open_clip key mapping

_HF = "text_model."


def hf_to_open_clip(hf: dict[str, torch.Tensor], config: TextEncoderConfig, source: str = "text_encoder") -> dict[str, torch.Tensor]:
    """Map Hugging Face CLIPTextModelWithProjection weights onto open_clip TextTransformer keys."""
    hf = {k: v for k, v in hf.items() if not k.endswith("position_ids")}
    expected = set(open_clip_to_hf_keys(config))
    missing = sorted(expected - set(hf))
    unexpected = sorted(set(hf) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:3])}")
        raise ModelFormatError(f"{source}: weights do not match its config.json ({'; '.join(parts)})")
    out = {
        "token_embedding.weight": hf[_HF + "embeddings.token_embedding.weight"],
        "positional_embedding": hf[_HF + "embeddings.position_embedding.weight"],
        "ln_final.weight": hf[_HF + "final_layer_norm.weight"],
        "ln_final.bias": hf[_HF + "final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),
    }
    for i in range(config.layers):
        src, dst = f"{_HF}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[dst + "attn.in_proj_weight"] = torch.cat([hf[src + f"self_attn.{p}_proj.weight"] for p in "qkv"], 0)
        out[dst + "attn.in_proj_bias"] = torch.cat([hf[src + f"self_attn.{p}_proj.bias"] for p in "qkv"], 0)
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[dst + b + ".weight"] = hf[src + a + ".weight"]
            out[dst + b + ".bias"] = hf[src + a + ".bias"]
    return out


def open_clip_to_hf_keys(config: TextEncoderConfig) -> list[str]:
    keys = [_HF + "embeddings.token_embedding.weight", _HF + "embeddings.position_embedding.weight",
            _HF + "final_layer_norm.weight", _HF + "final_layer_norm.bias", "text_projection.weight"]
    for i in range(config.layers):
        src = f"{_HF}encoder.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys += [src + name + ".weight", src + name + ".bias"]
    return keys


def open_clip_to_hf(state: dict[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_open_clip`."""
    width = config.width
    out = {
        _HF + "embeddings.token_embedding.weight": state["token_embedding.weight"],
        _HF + "embeddings.position_embedding.weight": state["positional_embedding"],
        _HF + "final_layer_norm.weight": state["ln_final.weight"],
        _HF + "final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
    }
    for i in range(config.layers):
        src, dst = f"transformer.resblocks.{i}.", f"{_HF}encoder.layers.{i}."
        w, b = state[src + "attn.in_proj_weight"], state[src + "attn.in_proj_bias"]
        for j, p in enumerate("qkv"):
            out[dst + f"self_attn.{p}_proj.weight"] = w[j * width:(j + 1) * width].contiguous()
            out[dst + f"self_attn.{p}_proj.bias"] = b[j * width:(j + 1) * width].contiguous()
        for a, bname in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[dst + a + ".weight"] = state[src + bname + ".weight"]
            out[dst + a + ".bias"] = state[src + bname + ".bias"]
    return out


# ---------------------------------------------------------------------------------------------
# Files


def _load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    from meissonic_cli.model.state_io import load_state_into

    # assign=True adopts the loaded tensors (the module may have been built on the meta device).
    load_state_into(module, state, source, what="the text encoder config")


def _load_state_file(path: Path) -> dict[str, Any]:
    from meissonic_cli.model.state_io import read_safetensors, read_torch_file

    return read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)


def _is_full_clip(config: dict[str, Any]) -> bool:
    """Whether a config.json describes a full CLIPModel (text and vision towers)."""
    return "text_config" in config and "hidden_size" not in config and (
        "vision_config" in config or config.get("model_type") == "clip"
        or "CLIPModel" in (config.get("architectures") or []))


def _read_safetensors_folder(folder: Path, weights: str, index: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Read `weights`, or every shard named by the sharded-checkpoint `index` file (in `variant` when present)."""
    from meissonic_cli.model.state_io import read_weights

    return read_weights(folder, weights, index, variant=variant)


__all__ = [
    "ClipTokenizer",
    "TextEncoder",
    "TextEncoderConfig",
    "hf_to_open_clip",
    "open_clip_to_hf",
    "tiny_text_config",
    "vit_h14_text_config",
]

