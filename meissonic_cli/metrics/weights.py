"""Where `meissonic eval` finds its metric networks' weights: local files only, unless asked.

Flags (`--clip-checkpoint`, ...) win over a `--weights-config` YAML/JSON file mapping `clip`, `hps`,
`dino`, `inception` (and `clip_model`, `hps_model`, `dino_model`) to paths. Every missing file is
named with where to get it before anything loads. `--allow-download` fetches from the published
location (never when HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from meissonic_cli.errors import ConfigError

if TYPE_CHECKING:
    from meissonic_cli.metrics.evaluate import EvalConfig


@dataclass(frozen=True)
class WeightSpec:
    """A checkpoint a suite needs, and what to tell a user who does not have it."""

    metric: str
    flag: str
    key: str  # key in --weights-config
    filename: str
    source: str
    hub: Optional[tuple[str, str]] = None  # (repo id, file) for --allow-download
    url: Optional[str] = None  # direct URL for --allow-download when the file is not on the hub


WEIGHTS: dict[str, WeightSpec] = {
    "clip": WeightSpec("CLIP-T/CLIP-I (--suite clip)", "--clip-checkpoint", "clip", "open_clip_pytorch_model.bin",
                       "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                       hub=("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin")),
    "hps": WeightSpec("HPS v2 (--suite hps)", "--hps-checkpoint", "hps", "HPS_v2_compressed.pt",
                      "https://huggingface.co/xswu/HPSv2", hub=("xswu/HPSv2", "HPS_v2_compressed.pt")),
    "dino": WeightSpec("DINO (--suite dino)", "--dino-checkpoint", "dino", "dino_deitsmall16_pretrain.pth",
                       "facebookresearch/dino (https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
                       "dino_deitsmall16_pretrain.pth) or model.safetensors of "
                       "https://huggingface.co/timm/vit_small_patch16_224.dino",
                       hub=("timm/vit_small_patch16_224.dino", "model.safetensors")),
    "inception": WeightSpec("FID (--suite fid)", "--inception-checkpoint", "inception",
                            "pt_inception-2015-12-05-6726825d.pth",
                            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                            "pt_inception-2015-12-05-6726825d.pth",
                            url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                                "pt_inception-2015-12-05-6726825d.pth"),
}
SUITE_WEIGHTS = {"clip": "clip", "hps": "hps", "dino": "dino", "fid": "inception"}
# --hps-version -> the checkpoint published for it in xswu/HPSv2 (the same open_clip ViT-H-14, other weights).
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}


def hps_spec(version: str) -> WeightSpec:
    """The HPS checkpoint of `version` ('2.0' or '2.1')."""
    name = HPS_FILES[version]
    return dataclasses.replace(WEIGHTS["hps"], metric=f"HPS v{version} (--suite hps --hps-version {version})",
                               filename=name, hub=("xswu/HPSv2", name))


def check_hps_name(path: Path, version: str) -> None:
    """A checkpoint named as another version's published file is a mix-up: say so before loading."""
    for other, name in HPS_FILES.items():
        if path.name == name and other != version:
            raise ConfigError(f"--hps-checkpoint {path} is the published HPS v{other} checkpoint but --hps-version is "
                              f"{version}; pass --hps-version {other}, or the {HPS_FILES[version]} file")
# --weights-config keys that name an architecture rather than a file.
MODEL_KEYS = ("clip_model", "hps_model", "dino_model")


def _read_weights_config(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--weights-config {path}: cannot be read as UTF-8 text ({err})") from None
    from meissonic_cli.readers import parse_json, parse_yaml

    parse = parse_json if path.suffix.lower() == ".json" else parse_yaml  # bounded aliases, text keys
    data = parse(text, f"--weights-config {path}", ConfigError) or {}
    allowed = set(WEIGHTS) | set(MODEL_KEYS)
    if not isinstance(data, dict) or set(map(str, data)) - allowed:
        extra = sorted(set(map(str, data)) - allowed) if isinstance(data, dict) else []
        raise ConfigError(f"--weights-config {path}: expected a mapping with keys among {', '.join(sorted(allowed))}"
                          + (f"; unknown: {', '.join(extra)}" if extra else ""))
    out = {}
    for key, value in data.items():
        if value is None:
            continue
        value = str(value)
        # Paths in the file are relative to the file, so a weights.yaml can live beside the weights.
        if key in WEIGHTS and not Path(value).expanduser().is_absolute():
            value = str((path.parent / value).resolve())
        out[str(key)] = str(Path(value).expanduser()) if key in WEIGHTS else value
    return out


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _download(spec: WeightSpec) -> Path:
    if _hf_offline():
        raise ConfigError(f"{spec.metric}: --allow-download was given but HF_HUB_OFFLINE is set; get {spec.filename} "
                          f"from {spec.source} and pass {spec.flag} PATH")
    try:
        if spec.hub is not None:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.hub[0], spec.hub[1]))
        import torch

        target = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(target), progress=True)
        return target
    except Exception as err:  # network and hub errors come in many types; the message is what matters
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{spec.metric}: could not download {spec.filename} ({first}); get it from {spec.source} "
                          f"and pass {spec.flag} PATH") from None


def resolve_weights(cfg: "EvalConfig") -> tuple[dict[str, Path], dict[str, str]]:
    """The checkpoint of every suite in `cfg.suites` that needs one, and the architectures to build.

    Flags win over --weights-config. Raises one ConfigError naming every missing file, the flag that
    sets it and where to obtain it (unless --allow-download fetches it).
    """
    from_file = _read_weights_config(Path(cfg.weights_config)) if cfg.weights_config else {}
    flags = {"clip": cfg.clip_checkpoint, "hps": cfg.hps_checkpoint, "dino": cfg.dino_checkpoint,
             "inception": cfg.inception_checkpoint}
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg)) if f.name in MODEL_KEYS}
    models = {key: (getattr(cfg, key) if getattr(cfg, key) != defaults[key] else from_file.get(key, defaults[key]))
              for key in MODEL_KEYS}
    found: dict[str, Path] = {}
    problems: list[str] = []
    for suite in cfg.suites:
        key = SUITE_WEIGHTS.get(suite)
        if key is None:
            continue
        spec = hps_spec(cfg.hps_version) if key == "hps" else WEIGHTS[key]
        value = flags[key] or from_file.get(key)
        if value and Path(value).expanduser().is_file():
            found[key] = Path(value).expanduser()
            if key == "hps":
                check_hps_name(found[key], cfg.hps_version)
            continue
        if cfg.allow_download and not value:
            found[key] = _download(spec)
            continue
        where = f"{value} does not exist" if value else "no checkpoint given"
        problems.append(f"{spec.metric} needs {spec.filename}: {where}; get it from {spec.source} and pass "
                        f"{spec.flag} PATH (or '{spec.key}: PATH' in --weights-config)"
                        + ("" if value else ", or add --allow-download"))
    if problems:
        raise ConfigError(problems)
    return found, models


__all__ = ["HPS_FILES", "MODEL_KEYS", "SUITE_WEIGHTS", "WEIGHTS", "WeightSpec", "check_hps_name", "hps_spec",
           "resolve_weights"]
