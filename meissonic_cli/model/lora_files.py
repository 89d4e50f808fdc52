"""LoRA adapter files: read the layouts other tools write, write the ones they read.

Read (a file, or a folder holding one of them):
- PEFT (`save_pretrained`): `adapter_model.safetensors` keyed `base_model.model.<layer>.lora_A.weight`,
  with `adapter_config.json` (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora);
- diffusers / the official trainer (`save_lora_weights`): `pytorch_lora_weights.safetensors` keyed
  `unet.<layer>...` (the official trainer), `transformer.<layer>...` (other diffusers pipelines) or
  `<layer>...`, with the LoRA config in the `lora_adapter_metadata` safetensors metadata when the
  diffusers version wrote it, else per-layer `<layer>.alpha` tensors, else alpha = rank (diffusers'
  loader assumes the same, and says so here so the user can pass a scale); the older
  `lora.down`/`lora.up` (and `lora_down`/`lora_up`) spelling of A and B is read too;
- meissonic's own `meissonic-lora` files (rank and alpha in the metadata).

Layer names are the transformer's module names, which equal the released diffusers transformer's,
so an adapter that peft built on the diffusers model maps 1:1. Each layer's update is
`scaling * B (A x)`, scaling = alpha / rank (alpha / sqrt(rank) with use_rslora), as peft computes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from meissonic_cli.atomic import atomic_write, write_json
from meissonic_cli.config import MAX_LORA_ALPHA, MAX_LORA_RANK
from meissonic_cli.errors import InputError, ModelFormatError

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
OWN_FORMAT = "meissonic-lora"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoRA config in the safetensors metadata
# Key prefixes: PEFT's wrapper, the official trainer's (diffusers' unet name), other diffusers pipelines'.
PREFIXES = ("base_model.model.", "unet.", "transformer.")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "lora_te")
# Suffix of each key -> which tensor it is ("A" down, "B" up, "alpha").
_PARTS = (
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)
MAX_SCALE = 10.0  # |SCALE| of --lora PATH:SCALE; beyond this an adapter swamps the model's own weights
# adapter_config.json settings that change what the tensors mean, which meissonic does not implement.
_UNSUPPORTED_CONFIG = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
                       "layer_replication": "layer_replication", "target_parameters": "target_parameters",
                       "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)"}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:SCALE]`."""

    path: Path
    scale: float = 1.0


def parse_lora_spec(text: Any) -> LoraSpec:
    """`PATH` or `PATH:SCALE` (split at the last colon only when a number follows it, so paths with
    colons work); the scale must be finite and within +-MAX_SCALE."""
    if isinstance(text, LoraSpec):
        spec = text
    elif isinstance(text, (tuple, list)) and len(text) == 2:
        spec = LoraSpec(Path(text[0]).expanduser(), _scale(text[1], f"{text[0]}"))
    else:
        raw = str(text)
        head, sep, tail = raw.rpartition(":")
        spec = LoraSpec(Path(raw).expanduser())
        if sep and head and _is_number(tail) and (Path(head).expanduser().exists() or not Path(raw).expanduser().exists()):
            spec = LoraSpec(Path(head).expanduser(), _scale(tail, raw))
    if not str(spec.path) or str(spec.path) == ".":
        raise InputError(f"--lora {text!r}: give an adapter file or folder (PATH or PATH:SCALE)")
    _scale(spec.scale, str(text))
    return spec


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return bool(text.strip())


def _scale(value: Any, where: str) -> float:
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise InputError(f"--lora {where}: the scale must be a finite number between -{MAX_SCALE:g} and {MAX_SCALE:g} "
                         f"(1 = the adapter as trained), got {value!r}")
    return scale


@dataclasses.dataclass
class LayerUpdate:
    """The low-rank update of one linear layer: `scaling * up @ down`."""

    down: torch.Tensor  # A, (rank, in_features)
    up: torch.Tensor  # B, (out_features, rank)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclasses.dataclass
class AdapterFile:
    """An adapter as read from disk: its layers, which files it came from and how it was read."""

    source: Path  # what the user named (file or folder)
    layout: str  # "peft", "diffusers" or "meissonic-lora"
    files: list[Path]  # every file whose content went into the layers (weights, config)
    layers: dict[str, LayerUpdate]
    notes: list[str] = dataclasses.field(default_factory=list)

    def sha256(self) -> str:
        """Digest of the files read (weights, and the PEFT config whose alpha sets the scale)."""
        return file_digest(self.files)

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers.values()})


# ----------------------------------------------------------------------------------------------
# Reading


def find_adapter_file(path: str | Path) -> tuple[Path, Optional[Path]]:
    """(weights file, adapter_config.json or None) for a file or a folder holding one of the layouts."""
    path = Path(path).expanduser()
    if path.is_file():
        config = path.with_name(PEFT_CONFIG) if path.name == PEFT_WEIGHTS else None
        return path, config if config is not None and config.is_file() else None
    if not path.is_dir():
        raise InputError(f"LoRA adapter {path} does not exist (give a .safetensors file or a folder holding "
                         f"{PEFT_WEIGHTS} + {PEFT_CONFIG} or {DIFFUSERS_WEIGHTS})")
    if (path / PEFT_WEIGHTS).is_file():
        return path / PEFT_WEIGHTS, (path / PEFT_CONFIG) if (path / PEFT_CONFIG).is_file() else None
    if (path / DIFFUSERS_WEIGHTS).is_file():
        return path / DIFFUSERS_WEIGHTS, None
    found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return found[0], None
    what = f"{len(found)} .safetensors files ({', '.join(p.name for p in found[:4])}); name one" if found else \
        "no adapter file"
    raise InputError(f"LoRA folder {path}: {what} (expected {PEFT_WEIGHTS} + {PEFT_CONFIG} or {DIFFUSERS_WEIGHTS})")


def file_digest(files: Sequence[Path]) -> str:
    """sha256 of the files' bytes in order."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def lora_record(spec: Any) -> dict[str, Any]:
    """What a sidecar records of one `--lora PATH[:SCALE]`: the resolved path, sha256 of the files read, scale."""
    spec = parse_lora_spec(spec)
    weights, config = find_adapter_file(spec.path)
    return {"path": str(spec.path.resolve()), "sha256": file_digest([weights] + ([config] if config else [])),
            "scale": spec.scale}


def read_adapter(path: str | Path) -> AdapterFile:
    """The adapter at `path` (any supported layout), or ModelFormatError/InputError saying what is wrong."""
    from meissonic_cli.model.state_io import read_safetensors

    source = Path(path).expanduser()
    weights, config_file = find_adapter_file(source)
    if weights.suffix != ".safetensors":
        raise InputError(f"LoRA adapter {weights}: only .safetensors files are read (a .bin/.pt file is a pickle, "
                         "which can run code when loaded); convert it with the tool that wrote it")
    tensors, meta = read_safetensors(weights, with_metadata=True)
    files = [weights] + ([config_file] if config_file is not None else [])
    where = str(weights)
    if meta.get("format") == OWN_FORMAT:
        pieces = _split_keys(tensors, where)
        if "rank" not in meta or "alpha" not in meta:
            raise ModelFormatError(f"{where}: meissonic-lora file without a rank/alpha in its metadata")
        rank = _rank_number(_metadata_number(meta["rank"]), where, "metadata rank")
        alpha = _alpha_number(_metadata_number(meta["alpha"]), where, "metadata alpha")

        def own_scaling(name: str, r: int) -> float:
            if r != rank:
                raise ModelFormatError(f"{where}: layer {name} has rank {r} in the weights but {rank} in its "
                                       "metadata rank")
            return alpha / rank

        return AdapterFile(source, OWN_FORMAT, files, _layers(pieces, where, own_scaling))
    notes: list[str] = []
    if config_file is not None:
        config, layout = _read_json(config_file), "peft"
    else:
        config, layout = _metadata_config(meta, where), "diffusers"
    pieces = _split_keys(tensors, where)
    if config is not None:
        _check_config(config, config_file or weights)
        scaling = _config_scaling(config, config_file or weights)
    elif any("alpha" in parts for parts in pieces.values()):
        def scaling(name: str, r: int) -> float:
            alpha = pieces[name].get("alpha")
            if alpha is None:
                return 1.0
            if alpha.numel() < 1:
                raise ModelFormatError(f"{where}: layer {name} has an empty alpha tensor")
            return _alpha_number(float(alpha.float().reshape(-1)[0]), where, f"{name}.alpha") / r
    else:
        ranks = sorted({int(p["A"].shape[0]) for p in pieces.values() if "A" in p})
        notes.append(f"{weights} stores no LoRA alpha: using alpha = rank ({'/'.join(map(str, ranks))}), i.e. the update "
                     f"B A at scale 1, as diffusers' loader does; if it was trained with another alpha, pass "
                     f"PATH:alpha/rank (the official trainer's r=16, alpha=32 is PATH:2)")

        def scaling(name: str, r: int) -> float:
            return 1.0
    return AdapterFile(source, layout, files, _layers(pieces, where, scaling), notes)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{path}: not a readable adapter config ({err})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: not an adapter config (expected a JSON object)")
    return data


def _metadata_config(meta: dict[str, str], where: str) -> Optional[dict[str, Any]]:
    """The LoRA config diffusers stores in the metadata (keys prefixed `unet.`/`transformer.` or not)."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{where}: unreadable {METADATA_KEY} metadata ({err})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{where}: {METADATA_KEY} metadata is not a JSON object")
    if any(k.startswith(TEXT_ENCODER_PREFIXES) for k in data):
        data = {k: v for k, v in data.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
    out = {}
    for key, value in data.items():
        for prefix in ("unet.", "transformer."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out or None


def _check_config(config: dict[str, Any], where: Path) -> None:
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ModelFormatError(f"{where}: a {kind} adapter; meissonic applies LoRA adapters only")
    used = [label for key, label in _UNSUPPORTED_CONFIG.items() if config.get(key) not in (None, False, [], {}, "")]
    if used:
        raise ModelFormatError(f"{where}: uses {', '.join(used)}, which meissonic does not apply (plain LoRA only)")


def _metadata_number(text: Any) -> Any:
    """A safetensors metadata value (a string) as the int or float it spells, or the text when it is neither."""
    for kind in (int, float):
        try:
            return kind(str(text).strip())
        except ValueError:
            pass
    return text


def _rank_number(value: Any, where: Any, key: str) -> int:
    """A LoRA rank from a config: a whole number in 1..MAX_LORA_RANK, else ModelFormatError naming `key`."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole or not 1 <= value <= MAX_LORA_RANK:
        raise ModelFormatError(f"{where}: LoRA rank {key} must be a whole number from 1 to {MAX_LORA_RANK}, "
                               f"got {value!r}")
    return int(value)


def _alpha_number(value: Any, where: Any, key: str) -> float:
    """A LoRA alpha from a config: a finite number in (0, MAX_LORA_ALPHA], else ModelFormatError naming `key`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= MAX_LORA_ALPHA:
        raise ModelFormatError(f"{where}: LoRA alpha {key} must be a finite number above 0 and at most "
                               f"{MAX_LORA_ALPHA:g}, got {value!r}")
    return float(value)


def _patterns(config: dict[str, Any], key: str, where: Any, check: Any) -> list[tuple[re.Pattern[str], Any]]:
    """peft's rank_pattern/alpha_pattern as (compiled `(.*\\.)?(KEY)$`, checked value) pairs, in order."""
    raw = config.get(key)
    if raw in (None, {}):
        return []
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{where}: {key} must be a JSON object of layer pattern -> number")
    out = []
    for pattern, value in raw.items():
        try:
            compiled = re.compile(rf"(.*\.)?({pattern})$")
        except re.error as err:
            raise ModelFormatError(f"{where}: {key} key {pattern!r} is not a valid regular expression ({err})") from None
        out.append((compiled, check(value, where, f"{key}[{pattern!r}]")))
    return out


def _pattern_value(patterns: list[tuple[re.Pattern[str], Any]], name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of the layer name."""
    for compiled, value in patterns:
        if compiled.match(name):
            return value
    return default


def _config_scaling(config: dict[str, Any], where: Any) -> Any:
    r_default = _rank_number(config.get("r", 8), where, "r")
    alpha_default = _alpha_number(config.get("lora_alpha", 8), where, "lora_alpha")
    rank_patterns = _patterns(config, "rank_pattern", where, _rank_number)
    alpha_patterns = _patterns(config, "alpha_pattern", where, _alpha_number)
    rslora = bool(config.get("use_rslora", False))

    def scaling(name: str, r: int) -> float:
        expected = _pattern_value(rank_patterns, name, r_default)
        if expected != r:
            raise ModelFormatError(f"{where}: layer {name} has rank {r} in the weights but {expected} in its "
                                   "config (r / rank_pattern)")
        alpha = _pattern_value(alpha_patterns, name, alpha_default)
        return alpha / math.sqrt(r) if rslora else alpha / r

    return scaling


def _split_keys(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"A", "B", maybe "alpha"}} from the file's keys, prefixes stripped; anything else is refused."""
    text = sorted(k for k in tensors if k.startswith(TEXT_ENCODER_PREFIXES))
    if text:
        raise ModelFormatError(f"{where} also holds {len(text)} text-encoder adapter tensors (first: {text[0]}); "
                               "meissonic applies transformer adapters only, so it would not reproduce this adapter")
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in tensors.items():
        name = key
        while name.startswith(PREFIXES):  # `unet.base_model.model.<layer>` from a wrapped model too
            name = name[len(next(p for p in PREFIXES if name.startswith(p))):]
        for suffix, part in _PARTS:
            if name.endswith(suffix):
                pieces.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            other.append(key)
    if other:
        why = ("DoRA magnitudes" if any("lora_magnitude_vector" in k for k in other) else
               "LoRA biases" if any(".lora_B.bias" in k for k in other) else
               "embedding adapters" if any("lora_embedding" in k for k in other) else "not LoRA A/B weights")
        raise ModelFormatError(f"{where}: {len(other)} tensors are {why}, which meissonic does not apply "
                               f"(first: {sorted(other)[0]})")
    if not pieces:
        raise ModelFormatError(f"{where} holds no LoRA weights")
    broken = sorted(n for n, p in pieces.items() if "A" not in p or "B" not in p)
    if broken:
        raise ModelFormatError(f"{where}: {len(broken)} layers lack their A or B weight (first: {broken[0]})")
    return pieces


def _layers(pieces: dict[str, dict[str, torch.Tensor]], where: str, scaling: Any) -> dict[str, LayerUpdate]:
    layers = {}
    for name in sorted(pieces):
        down, up = pieces[name]["A"], pieces[name]["B"]
        if down.dim() == 4 and down.shape[2:] == (1, 1) and up.dim() == 4 and up.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)  # 1x1-conv spelling of a linear adapter
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ModelFormatError(f"{where}: layer {name} has A {tuple(down.shape)} and B {tuple(up.shape)}, not a "
                                   "rank-r pair (r, in) / (out, r)")
        if not 1 <= down.shape[0] <= MAX_LORA_RANK:
            raise ModelFormatError(f"{where}: layer {name} has rank {down.shape[0]}; a LoRA rank is 1 to {MAX_LORA_RANK}")
        if not (down.is_floating_point() and up.is_floating_point()):
            raise ModelFormatError(f"{where}: layer {name} holds non-float LoRA weights")
        s = float(scaling(name, int(down.shape[0])))
        if not math.isfinite(s):
            raise ModelFormatError(f"{where}: layer {name} has a non-finite LoRA scale")
        layers[name] = LayerUpdate(down, up, s)
    return layers


def check_fits(adapter: AdapterFile, model: nn.Module) -> None:
    """One ModelFormatError naming every adapter layer the model lacks, that is not linear, or whose shapes differ."""
    modules = dict(model.named_modules())
    unknown, not_linear, shapes = [], [], []
    for name, layer in adapter.layers.items():
        module = modules.get(name)
        if module is None:
            unknown.append(name)
        elif not isinstance(module, nn.Linear):
            not_linear.append(f"{name} ({type(module).__name__})")
        elif layer.down.shape[1] != module.in_features or layer.up.shape[0] != module.out_features:
            shapes.append(f"{name} (adapter {layer.down.shape[1]}->{layer.up.shape[0]}, model "
                          f"{module.in_features}->{module.out_features})")
    problems = []
    for what, items in (("unknown target modules", unknown), ("not linear layers", not_linear),
                        ("shape mismatches", shapes)):
        if items:
            problems.append(f"{what}: {', '.join(items[:6])}" + (f" and {len(items) - 6} more" if len(items) > 6 else ""))
    if problems:
        raise ModelFormatError(f"LoRA adapter {adapter.source} does not fit this transformer: {'; '.join(problems)}")


# ----------------------------------------------------------------------------------------------
# Writing


def target_modules(names: Sequence[str], model: Optional[nn.Module] = None) -> list[str]:
    """peft `target_modules` for the layers `names`: their last name parts when those pick exactly
    these linear layers of `model` (as the official trainer's [to_q, to_k, to_v]), else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] if not n.endswith(".0") else ".".join(n.split(".")[-2:]) for n in names})
    if model is None:
        return sorted(names)
    picked = {n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in short)}
    return short if picked == set(names) else sorted(names)


def save_adapter(folder: str | Path, adapters: dict[str, torch.Tensor], *, rank: int, alpha: float,
                 targets: Sequence[str], base_model: Optional[str] = None, extra: Optional[dict[str, Any]] = None) -> None:
    """Write `adapters` (`<layer>.lora_A.weight` / `.lora_B.weight`) into `folder` in both layouts others read:
    PEFT (`adapter_model.safetensors` + `adapter_config.json`) and diffusers (`pytorch_lora_weights.safetensors`,
    `transformer.` keys, the config in its metadata). Tensors are written as they are (float32 stays bit-exact)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapters.items()}
    config = {"peft_type": "LORA", "task_type": None, "r": int(rank), "lora_alpha": float(alpha),
              "target_modules": list(targets), "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
              "use_dora": False, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
              "base_model_name_or_path": base_model, **(extra or {})}
    peft_tensors = {f"base_model.model.{k}": v for k, v in tensors.items()}
    atomic_write(folder / PEFT_WEIGHTS, lambda tmp: save_file(peft_tensors, tmp, metadata={"format": "pt"}))
    write_json(folder / PEFT_CONFIG, config)
    meta = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()
                                                      if k not in ("base_model_name_or_path",)}, sort_keys=True)}
    diffusers_tensors = {f"transformer.{k}": v for k, v in tensors.items()}
    atomic_write(folder / DIFFUSERS_WEIGHTS, lambda tmp: save_file(diffusers_tensors, tmp, metadata=meta))


def adapter_tensors(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """The layers' tensors keyed `<layer>.lora_A.weight` / `<layer>.lora_B.weight`, exactly as stored."""
    out = {}
    for name, layer in adapter.layers.items():
        out[f"{name}.lora_A.weight"] = layer.down
        out[f"{name}.lora_B.weight"] = layer.up
    return out


__all__ = ["AdapterFile", "LayerUpdate", "LoraSpec", "adapter_tensors", "check_fits", "find_adapter_file",
           "parse_lora_spec", "read_adapter", "save_adapter", "target_modules"]
