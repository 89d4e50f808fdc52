"""Helpers shared by the typed config dataclasses of every stage.

Each config field carries its documentation in `metadata={"help": ...}`; the CLI uses that same
text for `--help` (`help_of`), so every field is documented exactly once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from meissonic_cli.errors import ConfigError, InputError, MeissonicError, ModelFormatError


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          flag: str | None = None, short: str | None = None, aliases: tuple[str, ...] | list[str] = (),
          also: tuple[str, ...] | list[str] = (), hidden: bool = False, cli: bool = True,
          panel: str | None = None, bounds: tuple[float, float] | None = None) -> Any:
    """A dataclass field with its help text and how the CLI exposes it (see `commands/_options.py`).

    - `flag`: the option's name (default `--field-name`); a boolean's off switch may follow a slash
      (`--random-crop/--center-crop`; default `--no-NAME`).
    - `short`: a one-letter spelling such as `-o`.
    - `aliases`: deprecated spellings, hidden from `--help`; using one prints one deprecation line.
    - `also`: further spellings that stay (shown in `--help`), e.g. `--cfg` beside `--guidance-scale`.
    - `hidden`: a working flag left out of `--help`.
    - `cli=False`: not a flag at all (set by code or by a config file only).
    - `panel`: the `--help` section the flag is listed under.
    - `bounds`: (low, high), the range of a number field, inclusive (see `number_problems`; without
      it an int/float field gets `MAX_NUMBER`, a seed field the one seed range).
    """
    meta: dict[str, Any] = {"help": help}
    if flag:
        meta["flag"] = flag
    if short:
        meta["short"] = short
    if aliases:
        meta["aliases"] = tuple(aliases)
    if also:
        meta["also"] = tuple(also)
    if hidden:
        meta["hidden"] = True
    if not cli:
        meta["cli"] = False
    if panel:
        meta["panel"] = panel
    if bounds is not None:
        meta["bounds"] = tuple(bounds)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(cls: type, name: str) -> str:
    """The documented help text of field `name` of config dataclass `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def flag_of(cls: type, name: str) -> str:
    """The CLI flag for a field: explicit metadata, else `--field-name`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flag", "--" + name.replace("_", "-")).split("/")[0]
    raise KeyError(name)


def parse_resolution(value: Any, flag: str = "--resolution") -> Optional[tuple[int, int]]:
    """The one `--resolution` syntax of every command: '512' -> (512, 512), '768x512' -> (width 768,
    height 512); an int N is N x N; None or '' -> None (the command's default)."""
    if value is None or str(value).strip() == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", str(value))
    if not m or int(m.group(1)) <= 0 or (m.group(2) is not None and int(m.group(2)) <= 0):
        raise InputError(f"{flag} {value!r} is not a size like 1024 or 1024x768 (width x height)")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) is not None else w
    from meissonic_cli.safety import check_resolution

    check_resolution(w, h, flag)
    return w, h


def parse_temperature(value: str, flag: str = "--temperature") -> Any:
    """'2,0' -> (2.0, 0.0); '3' -> 3.0; each number in [0, MAX_TEMPERATURE] (the one check of every command's
    --temperature: sample, edit, eval's sampler flags, the app, and `distill --rollout-temperature`)."""
    parts = [s.strip() for s in str(value).split(",")]
    try:
        numbers = [float(s) for s in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or not all(math.isfinite(x) and 0 <= x <= MAX_TEMPERATURE for x in numbers):
        raise InputError(f"{flag} {value!r} must be 'start,end' (e.g. 2,0) or one number, each between 0 and "
                         f"{MAX_TEMPERATURE:g}")
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


def read_json_object(path: str | os.PathLike, missing: Optional[str] = None,
                     error: type[MeissonicError] = ModelFormatError, hint: str = "",
                     schema: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The JSON object stored in `path` (a config file), or `error` naming the file when it is
    missing (message `missing`, default "PATH not found"), not valid JSON or not a JSON object;
    `hint` (e.g. which command writes the file) ends the last two messages."""
    from meissonic_cli.readers import check_shape, parse_json

    path = Path(path)
    if not path.is_file():
        raise error(missing or f"{path} not found")
    tail = f"; {hint}" if hint else ""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise error(f"{path}: not valid JSON ({err}){tail}") from None
    try:
        return check_shape(parse_json(text, str(path), error), str(path), schema, error=error)
    except MeissonicError as err:
        raise error(f"{err}{tail}") from None


# ----------------------------------------------------------------------------------------------
# Numbers: the one range check every int/float setting passes (flags, YAML recipes, JSONL lines,
# a model folder's config.json), before any work starts.

MAX_NUMBER = 1e12  # no setting of this toolkit means anything beyond this magnitude
MIN_MAGNITUDE = 1e-30  # a non-zero float smaller than this overflows whatever it divides (1e-320)
MAX_SEED = 2**63 - 1  # the one seed range: 0 ..= MAX_SEED (torch, numpy and random all take it)
# Shared ranges of settings that size work or scale logits (the `bounds` of those fields).
MAX_STEPS = 10_000  # sampling steps (the paper samples 48-64)
MAX_BATCH = 65_536  # items per forward pass
MAX_IMAGES = 1_000_000  # images one `sample` run lists (prompts x --images-per-prompt)
MAX_GUIDANCE = 1_000.0  # classifier-free guidance scale (the paper uses 9)
MAX_SCORE = 1_000.0  # the score micro-condition (aesthetic scores are 0-10)
MAX_TEMPERATURE = 100.0  # the sampler's masking (Gumbel) temperature, each of start/end in [0, this] (the official 2,0)
MAX_NOISE_REG = 100.0  # the noise-regularization scale on the logits (the paper's 2)
MAX_LORA_RANK = 4096  # LoRA adapter rank (the released model's attention projections are 1024 wide; PEFT ranks are 4-256)
MAX_LORA_ALPHA = 10_000.0  # LoRA alpha (peft's lora_alpha; adapters use 1-2x their rank)


def number_kind(f: dataclasses.Field) -> Optional[str]:
    """'int' or 'float' when dataclass field `f` holds a number (optionally None), else None."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = {p.strip() for p in text.replace("Optional[", "").replace("]", "").split("|")} - {"None"}
    return parts.pop() if len(parts) == 1 and parts <= {"int", "float"} else None


def bounds_of(cls: type, name: str) -> tuple[float, float]:
    """The inclusive range of number field `name` of config dataclass `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if "bounds" in f.metadata:
                return f.metadata["bounds"]
            if name == "seed" or name.endswith("_seed"):
                return (0, MAX_SEED)
            return (-MAX_NUMBER, MAX_NUMBER)
    raise KeyError(name)


def number_problem(value: Any, where: str, kind: str, bounds: tuple[float, float]) -> Optional[str]:
    """Why `value` is not a usable `kind` ('int'/'float') number in `bounds` (None when it is)."""
    import math

    low, high = bounds
    span = f"between {low:g} and {high:g}" if kind == "float" else f"between {int(low)} and {int(high)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
        return f"{where} must be {'a whole number' if kind == 'int' else 'a number'} {span}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} must be a finite number {span}, got {value!r}"
    if not low <= value <= high:
        return f"{where} must be {span}, got {value!r}"
    if kind == "float" and value != 0 and abs(value) < MIN_MAGNITUDE:
        return f"{where} {value!r} is too close to 0 to compute with; use 0 or a magnitude of at least {MIN_MAGNITUDE:g}"
    return None


def check_number(value: Any, where: str, cls: type, name: str) -> Any:
    """`value` when it is a usable value of number field `name` of `cls` (e.g. a JSONL line's `cfg`
    checked by SampleConfig's `cfg` range), else `InputError` naming `where`."""
    kind = next(number_kind(f) for f in dataclasses.fields(cls) if f.name == name) or "float"
    problem = number_problem(value, where, kind, bounds_of(cls, name))
    if problem:
        raise InputError(problem)
    return value


def number_problems(cfg: Any, source: str = "") -> list[str]:
    """Every int/float field of dataclass `cfg` that is not a finite number in its range, by flag
    (or `source: name` for files such as config.json)."""
    out = []
    for f in dataclasses.fields(cfg):
        kind = number_kind(f)
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. edit's sampler settings
            out += number_problems(value, source)
        if kind is None or value is None:
            continue
        where = f"{source}: {f.name}" if source else f.metadata.get("flag", "--" + f.name.replace("_", "-")).split("/")[0]
        problem = number_problem(value, where, kind, bounds_of(type(cfg), f.name))
        if problem:
            out.append(problem)
    return out


class Problems:
    """Collects validation problems so a config reports all of them at once. Given the config, it
    first refuses the config's bad numbers (`number_problems`), all of them in one error."""

    def __init__(self, cfg: Any = None, source: str = "") -> None:
        self.items: list[str] = []
        bad = number_problems(cfg, source) if cfg is not None else []
        if bad:  # refused at once: the config's other checks compute with these numbers
            raise ConfigError(bad)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def update_from_dict(cfg: Any, values: dict[str, Any], source: str = "config") -> Any:
    """Return a copy of dataclass `cfg` with `values` applied; unknown keys are named in the error."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(k for k in values if k.replace("-", "_") not in names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)}; valid fields are: {', '.join(sorted(names))}"
        )
    return dataclasses.replace(cfg, **{k.replace("-", "_"): v for k, v in values.items()})
