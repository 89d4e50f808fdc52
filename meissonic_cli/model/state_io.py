"""Reading weights: one routine and one policy for every model the toolkit loads.

- `read_safetensors(path)`: one safetensors file (tensors and metadata).
- `read_weights(folder, weights, index, variant)`: a folder's weights, a single file or a sharded
  `*.safetensors.index.json`; index entries must name files inside the folder.
- Weight variants, named as diffusers and transformers name them (`save_pretrained(variant="fp16")`):
  `diffusion_pytorch_model.fp16.safetensors`, `model.fp16.safetensors`, sharded
  `diffusion_pytorch_model.fp16-00001-of-00002.safetensors` + `diffusion_pytorch_model.safetensors.index.fp16.json`.
  `pick_variant` chooses the files: the asked-for variant when the folder holds it, else the plain files;
  a folder holding only one variant's files loads them and says so in one `Note:` line on stderr.
- `read_torch_file(path)`: a `.bin/.pt/.pth` state dict, through torch's weights-only unpickler;
  anything else in the file (code to run) is refused with a plain message.
- `check_keys` / `load_weights_into`: the key policy. Strict by default: every key the module
  expects must be present and no other key may appear, shapes must match, and the error names the
  keys. Keys that may be absent or extra are listed explicitly (`allow_missing`, `allow_unexpected`,
  fnmatch patterns such as `"down_block.*"`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.hub import VARIANTS


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                     with_metadata: bool = False, dtype: torch.dtype | None = None) -> Any:
    """The tensors of one safetensors file (and its metadata with `with_metadata`).

    With `dtype`, each floating-point tensor is cast as it is read, so a float32 file loaded in bf16
    never holds more than one float32 tensor at a time.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            metadata = fh.metadata() or {}
            if dtype is not None:
                # safe_open validated the header; read the data with plain reads, not through the memory
                # map, whose touched pages count as this process's resident memory until it closes.
                tensors = _read_cast(path, dtype, device)
            else:
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as err:  # safetensors raises its own error types (and OSError) for bad headers
        raise ModelFormatError(f"cannot read weights in {path}: not a readable safetensors file ({_first_line(err)})") from None
    return (tensors, metadata) if with_metadata else tensors


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a shard may lie: inside the folder, and for a snapshot of the Hugging Face cache
    (`models--o--n/snapshots/<rev>/...`, whose files link to `models--o--n/blobs/`) that repo's blobs."""
    roots = [folder.resolve()]
    for parent in folder.absolute().parents:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            if (parent.parent / "blobs").is_dir():
                roots.append((parent.parent / "blobs").resolve())
            break
    return roots
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _read_cast(path: Path, dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a (header-validated) safetensors file, floating ones cast to `dtype` one at a time."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
        start = 8 + header_len
        tensors: dict[str, torch.Tensor] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            kind = _SAFETENSORS_DTYPES.get(info["dtype"])
            begin, end = (int(x) for x in info["data_offsets"])
            if kind is None or start + end > size or end < begin:
                raise ModelFormatError(f"{path}: tensor {key} has dtype {info['dtype']} or offsets this reader cannot use")
            raw = torch.empty(end - begin, dtype=torch.uint8)
            if fh.seek(start + begin) != start + begin or fh.readinto(raw.numpy()) != end - begin:
                raise ModelFormatError(f"{path}: truncated data for tensor {key}")
            tensor = raw.view(kind).reshape(info["shape"]) if end > begin else torch.empty(info["shape"], dtype=kind)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[key] = tensor.to(device)
    return tensors


def index_files(folder: str | os.PathLike, index: str) -> list[Path]:
    """The shard files a sharded-checkpoint index names, each checked to lie inside `folder` and exist."""
    folder = Path(folder)
    path = folder / index
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ModelFormatError(f"{path} is not a safetensors index (needs a 'weight_map' of key -> file name): {err}") from None
    roots = _allowed_roots(folder)
    files = []
    for name in names:
        if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
            raise ModelFormatError(f"{path}: shard name {name!r} must be a file name inside {folder}")
        file = folder / name
        # Refuse `../x.safetensors`, absolute paths and symlinks that lead out of the model folder.
        if not any(file.resolve().is_relative_to(root) for root in roots):
            raise ModelFormatError(f"{path}: shard {name!r} lies outside the model folder {folder}; refusing to read it")
        if not file.is_file():
            raise ModelFormatError(f"shard {file} listed in {index} is missing")
        files.append(file)
    return files


def note(message: str) -> None:
    """One `Note:` line on stderr: something the user should know about what was loaded, not an error."""
    print(f"Note: {message}", file=sys.stderr)


def variant_name(name: str, variant: str | None) -> str:
    """`name` in weight variant `variant`, as diffusers/transformers name it: `x.safetensors` ->
    `x.fp16.safetensors`, the index `x.safetensors.index.json` -> `x.safetensors.index.fp16.json`."""
    if not variant:
        return name
    if name.endswith(".index.json"):
        return f"{name[:-len('.json')]}.{variant}.json"
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def _present(folder: Path, weights: str, index: str | None, variant: str | None) -> bool:
    return (folder / variant_name(weights, variant)).is_file() or bool(index and (folder / variant_name(index, variant)).is_file())


def folder_variants(folder: str | os.PathLike, weights: str, index: str | None = None) -> list[str]:
    """The weight variants (of `VARIANTS`) whose single file or index the folder holds."""
    return [v for v in VARIANTS if _present(Path(folder), weights, index, v)]


def has_weights(folder: str | os.PathLike, weights: str, index: str | None = None) -> bool:
    """Whether the folder holds the plain weights or any variant's."""
    folder = Path(folder)
    return _present(folder, weights, index, None) or bool(folder_variants(folder, weights, index))


def pick_variant(folder: str | os.PathLike, weights: str, index: str | None = None, variant: str | None = None,
                 quiet: bool = False) -> str | None:
    """Which files of the folder to read: `variant` when the folder holds it, else the plain files (None).

    With no variant asked for and no plain files, the one variant the folder holds is picked and said
    in one `Note:` line (unless `quiet`); several variants and no plain files is an error asking to choose.
    """
    folder = Path(folder)
    if variant is not None and variant not in VARIANTS:
        raise ModelFormatError(f"unknown weight variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if variant and _present(folder, weights, index, variant):
        return variant
    if _present(folder, weights, index, None):
        return None
    found = folder_variants(folder, weights, index)
    if len(found) > 1:
        raise ModelFormatError(f"{folder} holds only variant weights ({', '.join(found)}) and no {weights}; "
                               f"choose one with --variant {found[0]} (Python: variant={found[0]!r})")
    if found:
        if not quiet:
            note(f"{folder} holds only {found[0]} weights ({variant_name(weights, found[0])}); loading them")
        return found[0]
    return None  # nothing at all: weight_files names the expected file


def weight_files(folder: str | os.PathLike, weights: str, index: str | None = None,
                 variant: str | None = None) -> list[Path]:
    """`folder/weights` if present, else the shards named by `folder/index`; in the variant `pick_variant` chooses."""
    folder = Path(folder)
    chosen = pick_variant(folder, weights, index, variant)
    weights, index = variant_name(weights, chosen), index and variant_name(index, chosen)
    if (folder / weights).is_file():
        return [folder / weights]
    if index and (folder / index).is_file():
        return index_files(folder, index)
    expected = f"{folder / weights}" + (f" or {folder / index}" if index else "")
    raise ModelFormatError(f"weights not found: expected {expected}")


def read_weights(folder: str | os.PathLike, weights: str, index: str | None = None,
                 device: str | torch.device = "cpu", variant: str | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors weights (single file or sharded index, see `weight_files`);
    floating-point tensors cast to `dtype` one by one as they are read (see `read_safetensors`)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder, weights, index, variant):
        state.update(read_safetensors(file, device=device, dtype=dtype))
    return state


_ADVICE = re.compile(r"weights_only", re.IGNORECASE)


def read_torch_file(path: str | os.PathLike, safe_globals: Sequence[type] = ()) -> Any:
    """A `torch.save` file read with the weights-only unpickler (tensors and plain containers only).

    A file that asks the unpickler to build anything else (which is how a pickle runs code) is
    refused without running it; the message never suggests turning the safe loader off.
    `safe_globals` adds plain-data classes a known checkpoint layout holds (e.g. DINO's
    `argparse.Namespace`), for this one read only.
    """
    import pickle

    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFormatError(f"{path} does not exist") from None
    except pickle.UnpicklingError as err:
        culprit = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        what = f" (it asks for {culprit.group(1)})" if culprit else ""
        raise ModelFormatError(
            f"{path}: holds objects other than tensors and plain values{what}; refused without loading it. "
            "Use a checkpoint saved as safetensors or as a plain state dict"
        ) from None
    except Exception as err:  # zip/pickle damage comes in many types; all mean "not a usable checkpoint"
        raise ModelFormatError(f"{path}: cannot read checkpoint ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip() and not _ADVICE.search(line)]
    return lines[0].strip() if lines else type(err).__name__


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_keys(expected: Mapping[str, Any], state: Mapping[str, Any], source: str, *,
               allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
               what: str = "the model") -> None:
    """Raise one ModelFormatError naming every problem between `state` and `expected` (key -> tensor or shape).

    Missing and unexpected keys are errors unless they match a pattern of `allow_missing` /
    `allow_unexpected`; shapes of the keys both hold must agree.
    """
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)

    def shape(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = sorted(k for k in expected if k not in state and not _matches(k, allow_missing))
    unexpected = sorted(k for k in state if k not in expected and not _matches(k, allow_unexpected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:4])})")
    wrong = [f"{k} {shape(state[k])} != {shape(expected[k])}" for k in sorted(expected)
             if k in state and shape(state[k]) != shape(expected[k])]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise ModelFormatError(f"{source} does not match {what}: {'; '.join(problems)}")


def load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                    allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                    what: str = "the model", dtype: torch.dtype | str = "module", assign: bool = True) -> nn.Module:
    """Check `state` against `module` (see `check_keys`), then load it.

    `dtype`: "module" casts each tensor to the module's dtype, "stored" keeps the file's, or a
    torch dtype. With `assign` the module adopts the loaded tensors (so a module built on the meta
    device becomes real). Allowed-extra keys are dropped; allowed-missing keys keep the module's values.
    """
    own = module.state_dict()
    check_keys(own, state, source, allow_missing=allow_missing, allow_unexpected=allow_unexpected, what=what)

    def cast(k: str, v: torch.Tensor) -> torch.Tensor:
        target = own[k].dtype if dtype == "module" else v.dtype if dtype == "stored" else dtype
        return v.to(target).contiguous()

    loaded = {k: cast(k, v) for k, v in state.items() if k in own}
    strict = len(loaded) == len(own)
    module.load_state_dict(loaded, strict=strict, assign=assign)
    return module


def load_weights_into(module: nn.Module, folder: str | os.PathLike, weights: str, index: str | None = None, *,
                      allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                      what: str = "the model", dtype: torch.dtype | str = "module",
                      device: str | torch.device = "cpu", variant: str | None = None) -> nn.Module:
    """Read a folder's safetensors weights (single file or sharded index) and load them into `module`."""
    state = read_weights(folder, weights, index, device=device, variant=variant)
    return load_state_into(module, state, f"weights in {folder}", allow_missing=allow_missing,
                           allow_unexpected=allow_unexpected, what=what, dtype=dtype)


__all__ = [
    "VARIANTS",
    "check_keys",
    "folder_variants",
    "has_weights",
    "index_files",
    "load_state_into",
    "load_weights_into",
    "note",
    "pick_variant",
    "read_safetensors",
    "read_torch_file",
    "read_weights",
    "variant_name",
    "weight_files",
]
