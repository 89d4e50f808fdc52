"""Typer options built from the config dataclasses, so that every field is a flag documented once.

A command lists the config dataclasses it exposes as `Group`s; `command()` turns every field of
each into a `typer.Option` (or a positional argument) whose help is the field's `help`, and the
command body receives an `Options` object that builds the dataclasses from the flags given. A field
added to a config dataclass is therefore a flag of every command that shows that dataclass.

Field metadata (see `meissonic_cli.config.field`) shapes the flag: `flag`, `short`, `also`,
`aliases` (deprecated spellings: hidden, and one `Warning: ... is deprecated` line on stderr when
used), `hidden`, `panel` (help section) and `cli=False` (no flag). Types: str, int, float, bool
(`--x/--no-x`), Optional[...] of those, list[str] (a repeatable flag) and Literal[...] (choices);
fields of other types (nested configs, dicts) are not flags.

Every flag defaults to "not given"; the dataclass supplies the default, which `--help` shows. Three
field names share one vocabulary in every command: `resolution` (N or WxH, `config.parse_resolution`),
`device` (`device.valid_device_name`) and `dtype` (`device.valid_dtype_name`); a bad value is one
`Error:` line (exit 1), like every other bad input.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, List, Literal, Optional, Sequence, Union

import typer
from typer.core import TyperCommand, TyperGroup

from meissonic_cli.config import parse_resolution
from meissonic_cli.device import DEVICE_CHOICES, valid_device_name, valid_dtype_name
from meissonic_cli.errors import InputError

from ._common import handle_errors

_SCALARS = {"str": str, "int": int, "float": float, "bool": bool, "Path": str}
_CTX = "ctx__"
RESOLUTION_METAVAR = "N|WxH"


@dataclasses.dataclass
class Group:
    """The fields of config dataclass `cls` that a command exposes as flags.

    `key` names the group inside `Options` (default: the class name). `only`/`exclude` pick fields
    (`only` keeps the dataclass order); `flags` renames a field's flag for this command (e.g. eval's
    `--sample-batch-size`); `arguments` are positional (in the given order), `required` must be given;
    `panel` is the help section of the whole group, `panel_of(name)` one per field.
    """

    cls: type
    key: str = ""
    only: Optional[Sequence[str]] = None
    exclude: Sequence[str] = ()
    flags: dict[str, str] = dataclasses.field(default_factory=dict)
    arguments: Sequence[str] = ()
    required: Sequence[str] = ()
    panel: Optional[str] = None
    panel_of: Optional[Callable[[str], Optional[str]]] = None

    def __post_init__(self) -> None:
        self.key = self.key or self.cls.__name__


@dataclasses.dataclass
class Spec:
    """One flag (or positional argument) made from one dataclass field."""

    group: str
    name: str
    param: str
    kind: Any  # str, int, float, bool or list
    flag: str
    decls: list[str]
    aliases: tuple[str, ...]
    choices: Optional[tuple[Any, ...]]
    default: Any
    help: str
    argument: bool = False
    required: bool = False
    hidden: bool = False
    panel: Optional[str] = None

    def alias_param(self, i: int) -> str:
        return f"{self.param}__old{i}"


class _NoSwitchMetavar:
    """`-h/--help` is a switch: list it without a `<bool>` value in `--help` (like every other switch)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_NoSwitchMetavar, TyperCommand):
    """The click command class of every `meissonic` subcommand: hidden (deprecated) positional
    arguments stay out of the usage line too."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not getattr(param, "hidden", False):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class RootGroup(_NoSwitchMetavar, TyperGroup):
    """The click group class of `meissonic` itself."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:  # Typer's --install-completion / --show-completion are switches too
            if param.name in ("install_completion", "show_completion"):
                param.metavar = ""
        return params


# ----------------------------------------------------------------------------------------------
# Field types


def _from_string(text: str) -> Any:
    """A field type written as a string (`from __future__ import annotations`) that could not be
    evaluated: the same analysis on the text."""
    text = text.strip()
    optional = False
    if text.startswith("Optional[") and text.endswith("]"):
        text, optional = text[len("Optional["):-1].strip(), True
    parts = [p.strip() for p in text.split("|")]
    if "None" in parts:
        optional = True
        parts = [p for p in parts if p != "None"]
        text = parts[0] if len(parts) == 1 else text
    if text.startswith(("Literal[", "typing.Literal[")) and text.endswith("]"):
        try:
            choices = ast.literal_eval("(" + text[text.index("[") + 1:-1] + ",)")
        except (ValueError, SyntaxError):
            return None
        return ("choice", tuple(choices), optional)
    if text in ("list", "List") or (text.startswith(("list[", "List[")) and text[5:-1].strip() in ("str", "Path")):
        return ("list", None, optional)
    if text in _SCALARS:
        return (_SCALARS[text], None, optional)
    return None


def _analyse(tp: Any) -> Any:
    """(kind, choices, optional) of a resolved field type, or None when it is not a flag type."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return None
        tp, origin = args[0], typing.get_origin(args[0])
    if origin is Literal:
        return ("choice", typing.get_args(tp), optional)
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return ("list", None, optional) if not args or args[0] in (str, Path) else None
    if tp is Path:
        return (str, None, optional)
    if tp in (str, int, float, bool):
        return (tp, None, optional)
    return None


@functools.lru_cache(maxsize=None)
def _field_kinds(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a TYPE_CHECKING-only name somewhere in the class: fall back to the text
        hints = {}
    kinds = {}
    for f in dataclasses.fields(cls):
        if f.name in hints:
            kinds[f.name] = _analyse(hints[f.name])
        elif isinstance(f.type, str):
            kinds[f.name] = _from_string(f.type)
        else:
            kinds[f.name] = _analyse(f.type)
    return kinds


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def specs_of(group: Group) -> list[Spec]:
    """The flags of `group`, in dataclass order (positional arguments in `group.arguments` order)."""
    kinds = _field_kinds(group.cls)
    fields = {f.name: f for f in dataclasses.fields(group.cls)}
    names = list(group.only) if group.only is not None else list(fields)
    specs = []
    for name in names:
        f = fields[name]
        meta = f.metadata
        if name in group.exclude or meta.get("cli", True) is False or kinds.get(name) is None:
            continue
        kind, choices, _ = kinds[name]
        if kind == "choice":
            kind = type(choices[0]) if choices else str
        default = field_default(f)
        flag_spec = group.flags.get(name) or meta.get("flag") or "--" + name.replace("_", "-")
        flag, _, off = flag_spec.partition("/")
        off = off or "--no-" + flag[2:]
        decls = [f"{flag}/{off}"] if kind is bool else [flag]
        decls += list(meta.get("also", ()))
        if meta.get("short"):
            decls.append(meta["short"])
        help_text = meta.get("help", "")
        if choices:
            help_text += f" Choices: {', '.join(str(c) for c in choices)}."
        spec = Spec(
            group=group.key, name=name, param=f"{group.key}__{name}", kind=kind, flag=flag, decls=decls,
            aliases=tuple(meta.get("aliases", ())), choices=tuple(choices) if choices else None, default=default,
            help=help_text, argument=name in group.arguments,
            required=name in group.required, hidden=bool(meta.get("hidden", False)),
            panel=meta.get("panel") or (group.panel_of(name) if group.panel_of else None) or group.panel,
        )
        specs.append(spec)
    positional = {s.name: s for s in specs if s.argument}
    return [positional[n] for n in group.arguments if n in positional] + [s for s in specs if not s.argument]


# ----------------------------------------------------------------------------------------------
# Typer parameters


def _annotation(spec: Spec) -> Any:
    if spec.kind == "list":
        return Optional[List[str]]
    if spec.name == "resolution":
        return Optional[str]
    return Optional[spec.kind]


def _metavar(spec: Spec) -> Optional[str]:
    if spec.argument:
        return spec.name.upper()
    if spec.name == "resolution":
        return RESOLUTION_METAVAR
    if spec.choices:
        return "[" + "|".join(str(c) for c in spec.choices) + "]"
    return None


def parameters(spec: Spec) -> list[inspect.Parameter]:
    """The Typer parameter of `spec` and one hidden parameter per deprecated spelling.

    The default is the dataclass's (so `--help` shows it); whether a flag was given is read from the
    click context, not from its value.
    """
    annotation = _annotation(spec)
    kw: dict[str, Any] = {"help": spec.help, "hidden": spec.hidden}
    if spec.panel and not spec.argument:
        kw["rich_help_panel"] = spec.panel
    metavar = "" if spec.kind is bool else _metavar(spec)  # a switch takes no value: show none
    if metavar is not None:
        kw["metavar"] = metavar
    if spec.required:
        default: Any = ...
    elif spec.default in ("", [], ()):
        default = None
    elif spec.kind == "list":
        default = list(spec.default)
    elif spec.name == "resolution" and spec.default is not None:
        default = str(spec.default)
    else:
        default = spec.default
    if spec.argument:
        option = typer.Argument(default, **kw)
    else:
        option = typer.Option(default, *spec.decls, **kw)
    params = [inspect.Parameter(spec.param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)]
    for i, alias in enumerate(spec.aliases):
        old = typer.Option(None, alias, hidden=True, show_default=False, **({"metavar": ""} if spec.kind is bool else {}))
        params.append(inspect.Parameter(spec.alias_param(i), inspect.Parameter.KEYWORD_ONLY, default=old,
                                        annotation=annotation))
    return params


def _given(ctx: Any, param: str) -> bool:
    """Whether parameter `param` was set on the command line (or from the environment), not defaulted."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def deprecated(old: str, new: str) -> None:
    """The one line that says a spelling is deprecated (stderr)."""
    typer.echo(f"Warning: {old} is deprecated; use {new}", err=True)


def _check(spec: Spec, value: Any) -> Any:
    """`value` as the field wants it, or InputError naming the flag."""
    if spec.kind == "list" and isinstance(value, tuple):
        value = list(value)
    if spec.name == "resolution":
        size = parse_resolution(value, spec.flag)
        if spec.kind is int:
            if size is None:
                raise InputError(f"{spec.flag} must not be empty")
            if size[0] != size[1]:
                raise InputError(f"{spec.flag} {value!r}: this command takes square images; give one number such as "
                                 f"{size[0]}")
            return size[0]
        return value
    if spec.name == "device" and not valid_device_name(value):
        raise InputError(f"unknown device {value!r}; use {DEVICE_CHOICES}")  # as resolve_device says
    if spec.name == "dtype" and not valid_dtype_name(value):
        raise InputError(f"unknown {spec.flag} {value!r}; use fp32, bf16 or fp16")
    if spec.choices and value not in spec.choices:
        raise InputError(f"{spec.flag} must be one of {', '.join(str(c) for c in spec.choices)}, got {value!r}")
    return value


class Options:
    """The flags given to one command run, by group: `given(key)` (field -> value) and `build(key)`."""

    def __init__(self, groups: Sequence[Group], specs: dict[str, list[Spec]], kwargs: dict[str, Any],
                 given: Callable[[str], bool]) -> None:
        self.groups = {g.key: g for g in groups}
        self.values: dict[str, dict[str, Any]] = {g.key: {} for g in groups}
        for key, group_specs in specs.items():
            for spec in group_specs:
                value = kwargs.pop(spec.param, None)
                have = given(spec.param)
                for i, alias in enumerate(spec.aliases):
                    old = kwargs.pop(spec.alias_param(i), None)
                    if not given(spec.alias_param(i)):
                        continue
                    deprecated(alias, spec.flag)
                    if not have:
                        value, have = old, True
                if have:
                    self.values[key][spec.name] = _check(spec, value)

    def given(self, key: str) -> dict[str, Any]:
        """The fields of group `key` set on the command line."""
        return dict(self.values[key])

    def get(self, key: str, name: str, default: Any = None) -> Any:
        return self.values[key].get(name, default)

    def build(self, key: str, **fixed: Any) -> Any:
        """Group `key`'s dataclass: its defaults, then the flags given, then `fixed`."""
        return self.groups[key].cls(**{**self.values[key], **fixed})


def command(app: typer.Typer, name: str, groups: Sequence[Group], extra: Sequence[inspect.Parameter] = (),
            **command_kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `func(opts, **extra)` as command `name`: the flags of every group, then `extra`.

    `extra` are hand-made parameters (`inspect.Parameter` with a Typer default) for what is not a
    config field; errors (`MeissonicError`) become one `Error:` line.
    """
    specs = {g.key: specs_of(g) for g in groups}
    seen: dict[str, str] = {}
    for group_specs in specs.values():
        for spec in group_specs:
            for decl in [d for part in spec.decls for d in part.split("/")] + list(spec.aliases):
                if decl in seen and not spec.argument:
                    raise ValueError(f"`meissonic {name}`: {decl} is both {seen[decl]} and {spec.param}; exclude the "
                                     f"field from one group or give it another flag")
                seen[decl] = spec.param

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        params: list[inspect.Parameter] = []
        flagged = [s for group_specs in specs.values() for s in group_specs]
        for spec in [s for s in flagged if s.argument] + list(extra) + [s for s in flagged if not s.argument]:
            params += parameters(spec) if isinstance(spec, Spec) else [spec]
        extra_names = {p.name for p in extra}

        params.insert(0, inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        def run(**kwargs: Any) -> Any:
            ctx = kwargs.pop(_CTX)
            own = {k: kwargs.pop(k) for k in list(kwargs) if k in extra_names}
            opts = Options(groups, specs, kwargs, lambda param: _given(ctx, param))
            return func(opts, **own)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__doc__ = func.__doc__
        run.__name__ = func.__name__
        command_kwargs.setdefault("cls", Command)
        app.command(name, **command_kwargs)(handle_errors(run))
        return func

    return decorator


def extra_option(name: str, annotation: Any, option: Any) -> inspect.Parameter:
    """A hand-made parameter for `command(extra=...)`."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


__all__ = ["Command", "RootGroup", "Group", "Options", "RESOLUTION_METAVAR", "Spec", "command", "deprecated", "extra_option", "field_default",
           "parameters", "specs_of"]
