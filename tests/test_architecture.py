"""The package's shape: imports run one way along the chain, files stay readable, lint stays clean.

Layers, bottom to top (a module may import its own layer and the ones below it):
    helpers (config, errors, atomic, progress, device)  <-  model  <-  data | sample  <-  train
    <-  metrics  <-  shapes  <-  commands, cli
`data` and `sample` are peers that do not import each other. Imports inside functions count too:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "meissonic_cli"
HELPERS = {"config", "errors", "atomic", "progress", "device", "safety", "textfiles", "imaging", "readers", "__init__",
           "__version__"}
RANK = {"helpers": 0, "model": 1, "data": 2, "sample": 2, "train": 3, "metrics": 4, "shapes": 5, "commands": 6, "cli": 6,
        "__main__": 6}
PEERS_THAT_MUST_NOT_MIX = {("data", "sample"), ("sample", "data")}
# The one readable model file may be long; everything else stays under this many lines.
MAX_LINES = 600
LONG_FILES_ALLOWED = {"model/transformer.py"}


def _layer(module: str) -> str:
    """'meissonic_cli.model.vq.base' -> 'model'; helpers collapse to 'helpers'."""
    parts = module.split(".")
    assert parts[0] == "meissonic_cli", module
    if len(parts) == 1:
        return "helpers"
    head = parts[1]
    if head in HELPERS:
        return "helpers"
    if head not in RANK:
        raise AssertionError(f"module {module} is in no known layer; add its folder to RANK in this test")
    return head


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every meissonic_cli import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("meissonic_cli")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("meissonic_cli"):
                continue
            if target == "meissonic_cli":  # `from meissonic_cli import x`: x is the module
                found += [(node.lineno, f"meissonic_cli.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_run_one_way_along_the_chain():
    wrong = []
    for path in _package_files():
        source = _layer(_module_name(path))
        for line, target in _imports(path):
            dest = _layer(target)
            if RANK[dest] > RANK[source] or (source, dest) in PEERS_THAT_MUST_NOT_MIX:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {target} ({dest})")
    assert not wrong, "imports against the chain's direction:\n" + "\n".join(wrong)


def test_layer_check_sees_a_wrong_import(tmp_path):
    # The walker itself must catch an upward import, lazy or not, relative or absolute.
    fake = PACKAGE / "model" / "_probe_for_test.py"
    assert not fake.exists()
    src = "def f():\n    from ..shapes import world\n    import meissonic_cli.train.trainer\n"
    tree_targets = []
    try:
        fake.write_text(src)
        tree_targets = [t for _, t in _imports(fake)]
    finally:
        fake.unlink()
    assert tree_targets == ["meissonic_cli.shapes", "meissonic_cli.train.trainer"]
    assert all(RANK[_layer(t)] > RANK["model"] for t in tree_targets)


def test_shapes_world_is_used_only_by_the_demo_benchmark_and_commands():
    users = set()
    for path in _package_files():
        if any(t.startswith("meissonic_cli.shapes") for _, t in _imports(path)):
            users.add(_layer(_module_name(path)))
    assert users <= {"shapes", "commands", "cli"}, users


def test_no_file_over_the_line_limit():
    long = []
    for path in _package_files():
        rel = path.relative_to(PACKAGE).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and rel not in LONG_FILES_ALLOWED:
            long.append(f"{rel}: {n} lines")
    assert not long, f"files over {MAX_LINES} lines (split them): {long}"


def test_ruff_is_clean():
    # `python -m ruff`, not `ruff` on PATH: the suite must pass as `venv/bin/python -m pytest` without the
    # venv activated (ruff's package ships the `ruff.__main__` that finds its own binary).
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(f"ruff is not installed for {sys.executable}; `pip install -e '.[dev]'` installs it")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "meissonic_cli", "tests", "benchmarks", "mutation"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_cli_help_does_not_import_heavy_libraries():
    code = ("import sys, meissonic_cli.cli as c; c.app; "
            "heavy = [m for m in ('torch', 'duckdb', 'open_clip', 'diffusers', 'webdataset', 'img2dataset') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
