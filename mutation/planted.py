"""Hand-planted bugs, run like mutmut's mutants: `python mutation/run.py --planted FILE`.

mutmut's operators (flip a comparison, change a constant) miss the bugs people make when they change
code: the local rank where the global one belongs, a seed without the rank, `int` where `round` was
meant. A reviewer writes such bugs down as plain replacements and this runner applies them one at a
time to a snapshot of the tree, runs the tests that should catch each, and reports which did.

FILE is YAML: a list of entries

    - name: rank-local-shards          # unique, printed in the report
      class: multi-rank                # free text: what kind of bug
      file: meissonic_cli/train/trainer.py
      old: "rank_shards(self.shards, self.env.rank, self.env.world_size)"
      new: "rank_shards(self.shards, self.env.local_rank, self.env.world_size)"
      tests: [tests/test_multinode.py]  # optional: default the tests of the module that owns `file`
      slow: true                       # optional: also run tests marked slow (default false)

`old` must occur exactly once in `file` (a plant that matches nothing or several places is reported as
`invalid` and counts as not caught). A plant is `caught` when pytest fails on it (or runs past
--timeout), `survived` when every selected test passes. The snapshot lives under --work (default
$TMPDIR/meissonic-mutation/planted) and is restored after each plant; the repository is never written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["meissonic_cli", "tests", "pipelines", "benchmarks", "mutation", "pyproject.toml"]


@dataclass
class Plant:
    name: str
    file: str
    old: str
    new: str
    kind: str = ""
    tests: list[str] = field(default_factory=list)
    slow: bool = False


def read_plants(path: Path) -> list[Plant]:
    """The entries of a planted-bug file, checked for the keys each needs."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a YAML list of entries (name, file, old, new)")
    plants, seen = [], set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise SystemExit(f"{path}: entry {i} is not a mapping")
        missing = [k for k in ("name", "file", "old", "new") if not isinstance(entry.get(k), str)]
        if missing:
            raise SystemExit(f"{path}: entry {i} lacks {', '.join(missing)} (strings)")
        if entry["name"] in seen:
            raise SystemExit(f"{path}: two entries are named {entry['name']!r}")
        seen.add(entry["name"])
        tests = entry.get("tests") or []
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise SystemExit(f"{path}: entry {entry['name']!r}: tests must be a list of strings")
        plants.append(Plant(entry["name"], entry["file"], entry["old"], entry["new"], str(entry.get("class", "")),
                            tests, bool(entry.get("slow", False))))
    return plants


def default_tests(file: str, modules: dict) -> list[str]:
    """The tests mutation/run.py runs for the module that mutates `file`."""
    for files, tests, _k, _globs in modules.values():
        if file in files:
            return list(tests)
    raise SystemExit(f"no module of mutation/run.py owns {file}; give the entry its own `tests:`")


def snapshot(work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, work / name)


def first_failure(output: str) -> str:
    """The first failing test's node id in pytest's -q output ('' when none is named)."""
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return m.group(1) if m else ""


def run_plant(plant: Plant, work: Path, tests: list[str], timeout: float, env: dict) -> dict:
    target = work / plant.file
    original = target.read_text(encoding="utf-8")
    count = original.count(plant.old)
    if count != 1:
        return {"name": plant.name, "class": plant.kind, "status": "invalid",
                "why": f"`old` occurs {count} times in {plant.file}"}
    target.write_text(original.replace(plant.old, plant.new), encoding="utf-8")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if not plant.slow:
        cmd += ["-m", "not slow"]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        status = "survived" if done.returncode == 0 else "caught"
        # Exit 5 (no tests collected) or 4 (usage) mean the entry selects nothing: not a catch.
        if done.returncode in (4, 5):
            status = "invalid"
        caught_by = first_failure(done.stdout) if status == "caught" else ""
        tail = done.stdout[-600:] if status == "invalid" else ""
    except subprocess.TimeoutExpired:
        status, caught_by, tail = "caught", f"timeout after {timeout:.0f} s", ""
    finally:
        target.write_text(original, encoding="utf-8")
    out = {"name": plant.name, "class": plant.kind, "status": status, "caught_by": caught_by,
           "seconds": round(time.monotonic() - start, 1)}
    if tail:
        out["why"] = tail
    return out


def run_planted(path: Path, modules: dict, work: Path, only: list[str], timeout: float) -> int:
    plants = read_plants(path)
    if only:
        plants = [p for p in plants if p.name in only]
    snapshot(work)
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(work))
    env.setdefault("MEISSONIC_CONFORMANCE_DIR", str(ROOT.parent / "shared" / "conformance"))
    results = []
    for plant in plants:
        tests = plant.tests or default_tests(plant.file, modules)
        result = run_plant(plant, work, tests, timeout, env)
        results.append(result)
        print(f"{result['status']:9s} {plant.name:40s} {result.get('caught_by') or result.get('why', '')}", flush=True)
    caught = sum(r["status"] == "caught" for r in results)
    summary = {"file": str(path), "total": len(results), "caught": caught,
               "survived": sum(r["status"] == "survived" for r in results),
               "invalid": sum(r["status"] == "invalid" for r in results), "plants": results}
    (work / "planted_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "plants"}))
    return 0 if caught == len(results) else 1
