"""CLIP-based scores through open_clip, from local checkpoint files only: CLIP-T, CLIP-I, CLIP-dir, HPS v2.

- CLIP-T: torchmetrics' `CLIPScore` convention: each image's row is 100 x cos(image, prompt) and the
  set's score is max(mean of the rows, 0) (torchmetrics clamps the mean, not each image: `clip_score_mean`);
  the paper's editing tables (7-9) print the bare cosine (0.266 there is 26.6 here). Prompts longer than
  the text tower's 77 tokens are cut (as everywhere); `ClipModel.truncated` counts them.
- CLIP-I: cos(image, source image), for edits; identical images give 1.0 for any weights.
- CLIP-dir: cos(image - source image, prompt - source prompt) in CLIP space, for edits whose sidecar
  names the source caption (`source_prompt`).
- HPS v2: the same open_clip ViT-H-14 with the HPS v2 checkpoint; the score is 100 x cos(image, prompt)
  without logit scale, as HPS v2's own scorer computes it (the paper's Table 2 numbers, e.g. 28.83).

The model is described by an open_clip config name ("ViT-H-14") or a JSON file holding an open_clip
model config (`{"embed_dim", "vision_cfg", "text_cfg"}`, or open_clip's `open_clip_config.json` with
`model_cfg` + `preprocess_cfg`); tests pass a tiny one. It is built on the meta device and the
checkpoint's tensors are adopted as they are, so a ViT-H-14 loads without a throw-away random init.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from meissonic_cli.config import read_json_object
from meissonic_cli.errors import ModelFormatError

# Buffers that checkpoints may lack and that are rebuilt after loading: open_clip's causal text mask
# (non-persistent) and BatchNorm's training counter (absent from old checkpoints, unused in eval).
_REBUILT = ("attn_mask", "num_batches_tracked")


def open_clip_model_config(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess overrides) for an open_clip config name or a config JSON path."""
    path = Path(model)
    if path.suffix == ".json":
        data = read_json_object(path, f"open_clip model config not found: {path}")
        if "model_cfg" in data:
            return dict(data["model_cfg"]), dict(data.get("preprocess_cfg") or {})
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(data):
            raise ModelFormatError(f"{path}: expected an open_clip model config with embed_dim, vision_cfg and text_cfg")
        return dict(data), {}
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ModelFormatError(f"unknown open_clip model {model!r}; use a name from open_clip.list_models() "
                               f"(e.g. ViT-H-14) or the path of a model config .json")
    return dict(cfg), {}


def load_state_file(path: Path, wrappers: Sequence[str] = ("state_dict", "model"),
                    safe_globals: Sequence[type] = ()) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors/.bin/.pt/.pth file; unwraps `wrappers` keys and `module.` prefixes.

    `safe_globals`: plain-data classes the weights-only unpickler may build for this file (see
    `state_io.read_torch_file`). Anything else than a dict of tensors is refused with the keys found.
    """
    if not path.is_file():
        raise ModelFormatError(f"checkpoint not found: {path}")
    from meissonic_cli.model.state_io import read_safetensors, read_torch_file

    state: Any = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path, safe_globals)
    for wrapper in wrappers:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{path}: expected a state dict of tensors; {_describe(state)}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _describe(obj: Any) -> str:
    """What a non-state-dict checkpoint holds, and how to extract the weights from it."""
    if not isinstance(obj, dict):
        return f"found a {type(obj).__name__}"
    kinds = [f"{k} ({type(v).__name__})" for k, v in list(obj.items())[:12]]
    nested = [k for k, v in obj.items() if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values())]
    hint = (f"; save the network's weights alone, e.g. torch.save(ckpt[{nested[0]!r}], 'weights.pth')" if nested
            else "; save the network's state dict alone (torch.save(model.state_dict(), 'weights.pth'))")
    return f"found keys {', '.join(kinds)}" + (" ..." if len(obj) > 12 else "") + hint


def adopt_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load `state` into a module built on the meta device, checking names and shapes first."""
    own = module.state_dict()
    expected = {k for k in own if k.rsplit(".", 1)[-1] not in _REBUILT}
    missing = sorted(expected - set(state))
    if missing:
        raise ModelFormatError(f"{source}: not a {what} checkpoint; {len(missing)} tensor(s) missing, "
                               f"e.g. {', '.join(missing[:3])}")
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
           for k in expected if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelFormatError(f"{source}: tensor shapes do not match {what}: {'; '.join(bad[:3])}")
    module.load_state_dict({k: state[k].to(own[k].dtype).contiguous() for k in expected}, strict=False, assign=True)
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "attn_mask" and buf.dim() == 2:
            owner.register_buffer(leaf, torch.full(tuple(buf.shape), float("-inf")).triu(1), persistent=False)
        elif leaf == "num_batches_tracked":
            owner.register_buffer(leaf, torch.zeros((), dtype=torch.long))
        else:
            raise ModelFormatError(f"{source}: buffer {name} has no value after loading {what}")


@dataclass
class ClipModel:
    """An open_clip model with its eval preprocessing and tokenizer; features come back L2-normalised."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    device: torch.device
    name: str

    @torch.no_grad()
    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, E) unit vectors for PIL images."""
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1)

    def truncated(self, texts: Sequence[str]) -> int:
        """How many of `texts` do not fit the context (start and end tokens included) and are cut."""
        limit = int(getattr(self.tokenizer, "context_length", 77))
        return sum(len(self.tokenizer.encode(t)) + 2 > limit for t in texts)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, E) unit vectors for strings."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


def load_clip(model: str, checkpoint: str | Path, device: str | torch.device = "cpu", what: str = "open_clip") -> ClipModel:
    """Build open_clip `model` (name or config JSON) and load the local `checkpoint` into it."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    cfg, preprocess_overrides = open_clip_model_config(model)
    if "multimodal_cfg" in cfg:
        raise ModelFormatError(f"{model}: captioning (CoCa) models are not supported; use a CLIP model such as ViT-H-14")
    text_cfg = dict(cfg.get("text_cfg") or {})
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in text_cfg
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise ModelFormatError(f"{model}: models with a Hugging Face text tower are not supported (they load from the hub)")
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    try:
        with torch.device("meta"):
            net = cls(**cfg)
    except TypeError as err:
        raise ModelFormatError(f"{model}: not an open_clip CLIP config ({err})") from None
    path = Path(checkpoint)
    state = load_state_file(path)
    if custom_text and "positional_embedding" in state:
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    own_scale = net.state_dict().get("logit_scale")
    if "logit_scale" in state and own_scale is not None and state["logit_scale"].shape != own_scale.shape:
        state["logit_scale"] = state["logit_scale"].reshape(own_scale.shape)
    adopt_state(net, state, str(path), f"{what} {model}")
    dev = torch.device(device)
    net = net.float().eval().to(dev)

    pp = PreprocessCfg()
    values = {"size": cfg["vision_cfg"].get("image_size", pp.size), "mean": pp.mean, "std": pp.std,
              "interpolation": pp.interpolation, "resize_mode": pp.resize_mode}
    values.update({k: v for k, v in preprocess_overrides.items() if k in values})
    preprocess = open_clip.image_transform(values["size"], is_train=False, mean=tuple(values["mean"]),
                                           std=tuple(values["std"]), interpolation=values["interpolation"],
                                           resize_mode=values["resize_mode"])
    tokenizer = open_clip.SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)))
    return ClipModel(model=net, preprocess=preprocess, tokenizer=tokenizer, device=dev, name=str(model))


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine of two (N, E) batches of unit vectors."""
    return (a * b).sum(dim=-1).clamp(-1.0, 1.0).tolist()


def clip_score_mean(values: Sequence[float]) -> float:
    """The set's CLIPScore from per-image 100 x cos values: max(mean, 0), as torchmetrics' `CLIPScore.compute`."""
    return max(sum(values) / len(values), 0.0) if values else 0.0


def clip_direction(image: torch.Tensor, source: torch.Tensor, text: torch.Tensor, source_text: torch.Tensor) -> list[float]:
    """Row-wise cos(image - source, text - source_text): does the edit move the image the way the caption moved."""
    di = torch.nn.functional.normalize(image - source, dim=-1)
    dt = torch.nn.functional.normalize(text - source_text, dim=-1)
    return (di * dt).sum(dim=-1).tolist()


__all__ = ["ClipModel", "adopt_state", "clip_direction", "clip_score_mean", "cosine_rows", "load_clip", "load_state_file",
           "open_clip_model_config"]
