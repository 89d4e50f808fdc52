"""Helpers shared by the typed config dataclasses of every stage.

Each config field carries its documentation in `metadata={"help": ...}`; the CLI uses that same
text for `--help` (`help_of`), so every field is documented exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from meissonic_cli.errors import ConfigError, InputError, MeissonicError, ModelFormatError


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          flag: str | None = None, short: str | None = None, aliases: tuple[str, ...] | list[str] = (),
          also: tuple[str, ...] | list[str] = (), hidden: bool = False, cli: bool = True,
          panel: str | None = None) -> Any:
    """A dataclass field with its help text and how the CLI exposes it (see `commands/_options.py`).

    - `flag`: the option's name (default `--field-name`); a boolean's off switch may follow a slash
      (`--random-crop/--center-crop`; default `--no-NAME`).
    - `short`: a one-letter spelling such as `-o`.
    - `aliases`: deprecated spellings, hidden from `--help`; using one prints one deprecation line.
    - `also`: further spellings that stay (shown in `--help`), e.g. `--cfg` beside `--guidance-scale`.
    - `hidden`: a working flag left out of `--help`.
    - `cli=False`: not a flag at all (set by code or by a config file only).
    - `panel`: the `--help` section the flag is listed under.
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


def read_json_object(path: str | os.PathLike, missing: Optional[str] = None,
                     error: type[MeissonicError] = ModelFormatError, hint: str = "") -> dict[str, Any]:
    """The JSON object stored in `path` (a config file), or `error` naming the file when it is
    missing (message `missing`, default "PATH not found"), not valid JSON or not a JSON object;
    `hint` (e.g. which command writes the file) ends the last two messages."""
    path = Path(path)
    if not path.is_file():
        raise error(missing or f"{path} not found")
    tail = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}){tail}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}{tail}")
    return data


class Problems:
    """Collects validation problems so a config reports all of them at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

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
