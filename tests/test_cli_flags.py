"""One flag vocabulary: options built from the config dataclasses (`commands/_options.py`), the shared
sampler options, one --resolution and --device syntax, switches without a metavar, and the deprecated
spellings that still work for one release."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

import meissonic_cli.data.tokenize as tokenize_mod
import meissonic_cli.metrics.evaluate as evaluate_mod
import meissonic_cli.sample.edit as edit_mod
import meissonic_cli.sample.sample as sample_mod
import meissonic_cli.train.config as train_config_mod
from meissonic_cli.cli import _COMMAND_MODULES, app
from meissonic_cli.commands import _options
from meissonic_cli.commands.edit import NOT_IN_EDIT
from meissonic_cli.commands.sample import JOB_FIELDS
from meissonic_cli.config import field, parse_resolution
from meissonic_cli.errors import MeissonicError
from meissonic_cli.sample.sample import SampleConfig

ROOT = get_command(app)


def _params(command: str) -> dict[str, object]:
    """Click parameters of `meissonic COMMAND` by their first spelling."""
    cmd = ROOT.commands[command]  # type: ignore[attr-defined]
    return {p.opts[0]: p for p in cmd.params}


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "220"})
    assert res.exit_code == 0, res.output
    return res.output


class Captured(MeissonicError):
    """Raised by a stand-in for a command's library function: the command got this far with `config`."""

    def __init__(self, config: object) -> None:
        super().__init__("captured")
        self.config = config


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Stand-ins for what sample/edit/eval/tokenize/train/curate/download run: they record the config."""
    seen: list[object] = []

    def stop(config: object, *args: object, **kwargs: object) -> None:
        seen.append(config)
        raise Captured(config)

    def load(path: object = None, overrides: object = None) -> None:
        seen.append(overrides)
        raise Captured(overrides)

    import meissonic_cli.data.curate as curate_mod
    import meissonic_cli.data.download as download_mod

    monkeypatch.setattr(sample_mod, "run_sample", stop)
    monkeypatch.setattr(edit_mod, "run_edit", stop)
    monkeypatch.setattr(evaluate_mod, "run_eval", stop)
    monkeypatch.setattr(tokenize_mod, "tokenize", stop)
    monkeypatch.setattr(curate_mod, "curate", stop)
    monkeypatch.setattr(download_mod, "download", stop)
    monkeypatch.setattr(train_config_mod, "load_train_config", load)
    return seen


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


# Minimal arguments that reach each command's library call.
BASE = {
    "sample": ["sample", "--model", "m", "--prompt", "a cat"],
    "edit": ["edit", "--model", "m", "--image", "x.png", "--prompt", "a cat", "--box", "0,0,8,8"],
    "eval": ["eval", "--prompts", "p.txt", "--model", "m", "--out", "o"],
    "tokenize": ["tokenize", "in", "--out", "o", "--model", "m"],
    "train": ["train", "--data", "d", "--out", "o"],
}


def _resolution_of(command: str, config: object) -> object:
    if command == "eval":
        return config.sample.resolution  # type: ignore[attr-defined]
    if command == "train":
        return config["resolution"]  # type: ignore[index]
    return config.resolution  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("command", [None, *_COMMAND_MODULES])
def test_help_shows_no_bool_metavar(command: Optional[str]) -> None:
    text = _help(*([command] if command else []))
    assert "<bool>" not in text and "BOOLEAN" not in text
    if command:  # every switch has its off spelling beside it, and no switch asks for a value
        cmd = ROOT.commands[command]  # type: ignore[attr-defined]
        for p in cmd.params:
            if getattr(p, "is_bool_flag", False) and not p.hidden:
                assert p.metavar == "", (command, p.opts)


def test_every_command_builds_its_flags_from_config_dataclasses() -> None:
    """Each command's options are its config fields: same help text, nothing written twice."""
    from meissonic_cli.commands.synth import SynthConfig
    from meissonic_cli.data.curate import CurateConfig
    from meissonic_cli.data.download import DownloadConfig
    from meissonic_cli.data.tokenize import TokenizeConfig
    from meissonic_cli.metrics.evaluate import EvalConfig
    from meissonic_cli.sample.edit import EditConfig
    from meissonic_cli.shapes.demo import DemoConfig
    from meissonic_cli.train.config import TrainConfig

    configs = {"sample": SampleConfig, "edit": EditConfig, "eval": EvalConfig, "tokenize": TokenizeConfig,
               "curate": CurateConfig, "download": DownloadConfig, "demo": DemoConfig, "train": TrainConfig,
               "synth": SynthConfig}
    for command, cls in configs.items():
        helps = {p.help for p in ROOT.commands[command].params}  # type: ignore[attr-defined]
        for f in dataclasses.fields(cls):
            if _options._field_kinds(cls)[f.name] is None or f.metadata.get("cli", True) is False:
                continue  # a nested config (edit's and eval's sampler settings), or a field set by code only
            assert f.metadata["help"] in {h.split(" Choices:")[0] for h in helps if h}, (command, f.name)


def test_sampler_options_are_shared_with_one_help_and_one_default() -> None:
    sampler = [s for s in _options.specs_of(_options.Group(SampleConfig)) if s.name not in JOB_FIELDS]
    assert {"steps", "cfg", "temperature", "token_temperature", "seed", "dtype", "negative_prompt"} <= {s.name for s in sampler}
    skipped = {"edit": set(NOT_IN_EDIT), "eval": {"device"}}  # edit's own --resolution; eval's one --device
    for spec in sampler:
        seen = []
        for command in ("sample", "edit", "eval"):
            if spec.name in skipped.get(command, ()):
                continue
            param = _params(command)[spec.flag]
            seen.append((param.help, param.default, tuple(param.opts)))
        assert len(set(seen)) == 1 and len(seen) >= 2, (spec.name, seen)
        assert seen[0][0] == SampleConfig.__dataclass_fields__[spec.name].metadata["help"]
        default = _options.field_default(SampleConfig.__dataclass_fields__[spec.name])
        assert seen[0][1] == (None if default in ("", []) else default)


def test_guidance_scale_and_its_short_alias_set_the_same_field(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture(monkeypatch)
    for flag in ("--guidance-scale", "--cfg"):
        res = _run(*BASE["sample"], flag, "3.5")
        assert res.exit_code == 1 and res.stderr.strip() == "Error: captured", res.output
    assert [c.cfg for c in seen] == [3.5, 3.5]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# One --resolution and --device syntax


@pytest.mark.parametrize("command", list(BASE))
def test_resolution_parses_the_same_way_everywhere(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _params(command)["--resolution"].metavar == _options.RESOLUTION_METAVAR
    seen = _capture(monkeypatch)
    for text, size in (("256", (256, 256)), ("256x256", (256, 256)), ("256x128", (256, 128))):
        res = _run(*BASE[command], "--resolution", text)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1, res.output
        if command in ("tokenize", "train") and size[0] != size[1]:
            # Square-only stages read the same syntax and say why they refuse a non-square size.
            assert lines[0].startswith("Error: --resolution '256x128'") and "square" in lines[0]
            continue
        assert lines[0] == "Error: captured", res.output
        assert parse_resolution(_resolution_of(command, seen[-1])) == size
    res = _run(*BASE[command], "--resolution", "big")
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
        "Error: --resolution 'big' is not a size like 1024 or 1024x768 (width x height)"]


@pytest.mark.parametrize("command", ["sample", "edit", "eval", "tokenize", "train"])
def test_device_vocabulary_is_checked_the_same_way(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture(monkeypatch)
    res = _run(*BASE[command], "--device", "cuda:1")
    assert res.exit_code == 1 and res.stderr.strip() == "Error: captured", res.output
    config = seen[-1]
    device = config["device"] if command == "train" else (config.sample if command == "edit" else config).device  # type: ignore
    assert device == "cuda:1"
    res = _run(*BASE[command], "--device", "gpu0")
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == ["Error: unknown device 'gpu0'; use auto, cpu, cuda, cuda:N or mps"]


# ---------------------------------------------------------------------------------------------
# Deprecated spellings

DEPRECATED = [
    # (command line with the old spelling, old, new, what the command got)
    (["curate", "in.parquet", "--output", "OUT"], "--output", "--out", lambda c: c.output),
    (["download", "in.parquet", "--output", "OUT"], "--output", "--out", lambda c: c.output),
    (["train", "--data", "d", "--output", "OUT"], "--output", "--out", lambda c: c["output"]),
    (["train", "--data", "d", "--out", "o", "--model", "OUT"], "--model", "--arch", lambda c: c["model"]),
    (["eval", "--images", ".", "--grid", "7"], "--grid", "--grid-size", lambda c: c.grid),
]


@pytest.mark.parametrize("argv,old,new,got", DEPRECATED, ids=[f"{d[0][0]}{d[1]}" for d in DEPRECATED])
def test_deprecated_spelling_warns_once_and_still_works(argv, old, new, got, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture(monkeypatch)
    res = _run(*argv)
    assert res.exit_code == 1, res.output
    assert res.stderr.splitlines() == [f"Warning: {old} is deprecated; use {new}", "Error: captured"]
    value = got(seen[-1])
    assert value == (7 if old == "--grid" else "OUT")
    assert not re.search(rf"{re.escape(old)}\b(?!-)", _help(argv[0])), f"{old} is listed in `{argv[0]} --help`"
    # The new spelling: no warning.
    new_argv = [new if a == old else a for a in argv]
    res = _run(*new_argv)
    assert res.stderr.splitlines() == ["Error: captured"]


def test_info_config_is_now_arch() -> None:
    res = _run("info", "--config", "tiny")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == ["Warning: --config is deprecated; use --arch"]
    assert "architecture tiny" in res.stdout
    assert "--config" not in _help("info") and "--arch" in _help("info")


def test_synth_folder_argument_is_now_out(tmp_path) -> None:
    res = _run("synth", str(tmp_path / "a"), "--rows", "4", "--sides", "32")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == ["Warning: the OUT argument is deprecated; use --out"]
    res = _run("synth", "--out", str(tmp_path / "b"), "--rows", "4", "--sides", "32")
    assert res.exit_code == 0 and res.stderr == "", res.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    usage = [line for line in _help("synth").splitlines() if "Usage:" in line][0]
    assert usage.rstrip().endswith("[OPTIONS]")


# ---------------------------------------------------------------------------------------------
# The builder itself: a new field of any supported type is a flag with its help


@dataclass
class _Demo:
    name: str = field("x", help="A name.", short="-n")
    count: int = field(3, help="A count.")
    ratio: float = field(0.5, help="A ratio.", also=("--r",))
    loud: bool = field(False, help="Be loud.")
    gentle: bool = field(True, help="Be gentle.", flag="--gentle/--rough")
    maybe: Optional[int] = field(None, help="Maybe a number.")
    tags: list[str] = field(default_factory=list, help="Tags (repeatable).", flag="--tag")
    mode: Literal["fast", "slow"] = field("fast", help="How.")
    secret: str = field("", help="Not listed.", hidden=True)
    renamed: str = field("", help="Renamed.", flag="--new-name", aliases=("--old-name",))
    internal: str = field("", help="Set by code.", cli=False)
    resolution: int = field(64, help="Square size.")


def _demo_app(seen: list[_Demo]) -> typer.Typer:
    demo_app = typer.Typer()

    @_options.command(demo_app, "go", [_options.Group(_Demo, key="demo")])
    def go(opts: _options.Options) -> None:
        seen.append(opts.build("demo"))

    @demo_app.command("other")
    def other() -> None:  # a second command keeps `go` a subcommand
        pass

    return demo_app


def test_builder_turns_every_field_type_into_a_flag() -> None:
    seen: list[_Demo] = []
    demo_app = _demo_app(seen)
    runner = CliRunner()
    res = runner.invoke(demo_app, ["go"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == _Demo()
    res = runner.invoke(demo_app, ["go", "-n", "y", "--count", "4", "--r", "0.25", "--loud", "--rough", "--maybe", "2",
                                   "--tag", "a", "--tag", "b", "--mode", "slow", "--secret", "s", "--new-name", "z",
                                   "--resolution", "32x32"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == _Demo(name="y", count=4, ratio=0.25, loud=True, gentle=False, maybe=2, tags=["a", "b"],
                             mode="slow", secret="s", renamed="z", resolution=32)
    res = runner.invoke(demo_app, ["go", "--old-name", "w"])
    assert res.exit_code == 0 and seen[-1].renamed == "w"
    assert res.stderr.splitlines() == ["Warning: --old-name is deprecated; use --new-name"]
    res = runner.invoke(demo_app, ["go", "--mode", "medium"])
    assert res.exit_code == 1 and res.stderr.strip() == "Error: --mode must be one of fast, slow, got 'medium'"
    assert runner.invoke(demo_app, ["go", "--internal", "x"]).exit_code == 2  # cli=False: not a flag

    text = runner.invoke(demo_app, ["go", "--help"], env={"COLUMNS": "200"}).output
    for shown in ("--name", "-n", "A name.", "--count", "--ratio", "--r", "--loud", "--no-loud", "--gentle", "--rough",
                  "--maybe", "--tag", "--mode", "Choices: fast, slow.", "--new-name", "[default: 3]"):
        assert shown in text, shown
    for hidden in ("--secret", "--old-name", "--internal", "<bool>"):
        assert hidden not in text, hidden


def test_two_groups_may_not_claim_one_flag() -> None:
    with pytest.raises(ValueError, match="--name is both"):
        _options.command(typer.Typer(), "clash", [_options.Group(_Demo, key="a"), _options.Group(_Demo, key="b")])


@dataclass
class _Unresolvable:
    count: int = field(1, help="A count.")
    picked: Literal["a", "b"] = field("a", help="A pick.")
    engine: "NotImportedHere" = field(None, help="Set by code.")  # noqa: F821  (a TYPE_CHECKING-only name)


def test_field_types_that_cannot_be_evaluated_are_read_from_their_text() -> None:
    kinds = _options._field_kinds(_Unresolvable)
    assert kinds == {"count": (int, None, False), "picked": ("choice", ("a", "b"), False), "engine": None}
    specs = _options.specs_of(_options.Group(_Unresolvable))
    assert [(s.flag, s.choices) for s in specs] == [("--count", None), ("--picked", ("a", "b"))]
    assert _options._from_string("str | None") == (str, None, True)
    assert _options._from_string("Optional[list[str]]") == ("list", None, True)
