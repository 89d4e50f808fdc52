"""One reader per kind of structured file, each checking the shape it promises.

Every JSON or YAML file the toolkit reads from disk (dataset.json, shard stats, sidecars, recipes,
a checkpoint's train_config.yaml, JSONL lines) goes through here, so a file that is not UTF-8, not
valid, nested without end, a size bomb, or of the wrong shape is one error naming the file (and the
key), never an exception from deep inside a stage.

- JSON: `parse_json` / `read_json`; nesting deeper than Python's recursion limit is refused.
- YAML: `read_yaml` loads with PyYAML's safe loader, but refuses aliases whose expansion would exceed
  `MAX_YAML_NODES` nodes (the "billion laughs" recipe) and keys that are not strings.
- Shapes: `check_shape(data, schema, where)`: each key of `schema` names the types its value may
  have; `required` keys must be present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from meissonic_cli.errors import InputError, MeissonicError

# What `eval` reads from a sample/edit sidecar (keys it may lack; these types when present).
SIDECAR_SCHEMA: dict[str, Any] = {"prompt": (str, None), "category": (str, None), "source": (str, None),
                                  "source_prompt": (str, None), "file": str}
MAX_YAML_NODES = 100_000  # a recipe is a few dozen nodes; aliases may not expand past this
MAX_FILE_BYTES = 64 * 2**20  # a settings/stats/sidecar file larger than this is not one of ours

# Schema value types: JSON "number" accepts int and float (never bool).
NUMBER = "number"
INT = "int"


def _read_text(path: Path, what: str, error: type[MeissonicError]) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise error(f"{what} {path} is {size:,} bytes, too large for a settings file")
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, expected a file") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None


def parse_json(text: str, where: str, error: type[MeissonicError] = InputError) -> Any:
    """The JSON value in `text`, or `error` naming `where` (invalid, or nested too deep)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deep") from None
    except ValueError as err:  # e.g. an integer with too many digits
        raise error(f"{where}: not valid JSON ({err})") from None


def read_json(path: str | os.PathLike, what: str = "file", error: type[MeissonicError] = InputError) -> Any:
    path = Path(path)
    return parse_json(_read_text(path, what, error), f"{what} {path}", error)


def _type_ok(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == INT or kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))


def _type_name(kind: Any) -> str:
    return {None: "null", NUMBER: "a number", INT: "a whole number", int: "a whole number", str: "text",
            list: "a list", dict: "an object", bool: "true/false", float: "a number"}.get(kind, str(kind))


def check_shape(data: Any, where: str, schema: Optional[dict[str, Any]] = None, required: Iterable[str] = (),
                error: type[MeissonicError] = InputError) -> dict[str, Any]:
    """`data` when it is an object whose keys in `schema` have one of the listed types (a type or a
    tuple of them; None allows null) and which has every `required` key; else `error` naming `where`
    and the key."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise error(f"{where}: missing key(s) {', '.join(missing)}")
    for key, kinds in (schema or {}).items():
        if key not in data:
            continue
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not any(_type_ok(data[key], k) for k in kinds):
            raise error(f"{where}: {key!r} must be {' or '.join(_type_name(k) for k in kinds)}, got {data[key]!r}"[:300])
    return data


def read_json_object(path: str | os.PathLike, what: str = "file", schema: Optional[dict[str, Any]] = None,
                     required: Iterable[str] = (), error: type[MeissonicError] = InputError) -> dict[str, Any]:
    """The JSON object in `path`, its shape checked (`check_shape`)."""
    return check_shape(read_json(path, what, error), f"{what} {Path(path)}", schema, required, error)


# ----------------------------------------------------------------------------------------------
# YAML


def _count_nodes(node: Any, memo: dict[int, int], depth: int = 0) -> int:
    """Nodes `node` stands for once every alias is expanded (aliases share the node object)."""
    if id(node) in memo:
        return memo[id(node)]
    if depth > 200:
        raise RecursionError
    value = node.value
    total = 1
    if isinstance(value, list):
        for item in value:
            if isinstance(item, tuple):  # mapping: (key node, value node)
                total += _count_nodes(item[0], memo, depth + 1) + _count_nodes(item[1], memo, depth + 1)
            else:
                total += _count_nodes(item, memo, depth + 1)
            if total > MAX_YAML_NODES:
                break
    memo[id(node)] = total
    return total


def parse_yaml(text: str, where: str, error: type[MeissonicError] = InputError) -> Any:
    """The YAML value in `text` (safe tags only), refusing alias bombs, deep nesting and non-text keys."""
    import yaml

    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reading the stream can already fail (control characters)
        node = loader.get_single_node()
        if node is None:
            return None
        if _count_nodes(node, {}) > MAX_YAML_NODES:
            raise error(f"{where}: expands to more than {MAX_YAML_NODES:,} values through YAML aliases (&/*); "
                        "write the values out")
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error(f"{where}: not valid YAML ({first})") from None
    except RecursionError:
        raise error(f"{where}: YAML nested too deep") from None
    finally:
        if loader is not None:
            loader.dispose()
    _check_keys(data, where, error)
    return data


def _check_keys(data: Any, where: str, error: type[MeissonicError], depth: int = 0) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                raise error(f"{where}: key {key!r} must be text (a field name), got {type(key).__name__}")
            _check_keys(value, where, error, depth + 1)
    elif isinstance(data, list):
        for value in data:
            _check_keys(value, where, error, depth + 1)


def read_yaml(path: str | os.PathLike, what: str = "file", error: type[MeissonicError] = InputError) -> Any:
    path = Path(path)
    return parse_yaml(_read_text(path, what, error), f"{what} {path}", error)


def read_yaml_mapping(path: str | os.PathLike, what: str = "file", error: type[MeissonicError] = InputError,
                      empty_ok: bool = True) -> dict[str, Any]:
    """The mapping of field: value in the YAML file `path` (an empty file is {} when `empty_ok`)."""
    data = read_yaml(path, what, error)
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {Path(path)} must hold a mapping of field: value, got {type(data).__name__}")
    return data


__all__ = ["MAX_YAML_NODES", "check_shape", "parse_json", "parse_yaml", "read_json", "read_json_object", "read_yaml",
           "read_yaml_mapping"]
