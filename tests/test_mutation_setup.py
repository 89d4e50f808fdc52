"""The mutation-testing setup (mutation/run.py, mutation/equivalent.txt) stays runnable and honest:
every module's files and tests exist, every equivalent/accepted entry names a mutant mutmut still
generates and gives a reason, the sampler is seeded, and a tiny run kills known mutants."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_run():
    spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "mutation" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()


def test_every_module_names_existing_files_and_tests() -> None:
    assert set(run.MODULES) >= {"atomic", "scheduler", "transformer", "text_encoder", "shards", "tokenize", "curate",
                                "pipeline", "edit", "train", "checkpoint"}
    for name, (files, tests, _k, _globs) in run.MODULES.items():
        for f in files:
            assert (ROOT / f).is_file(), (name, f)
        for t in tests:
            path, _, func = t.partition("::")
            assert (ROOT / path).is_file(), (name, t)
            if func:
                assert f"def {func}(" in (ROOT / path).read_text(encoding="utf-8"), (name, t)


def test_equivalent_entries_name_mutants_that_still_exist_and_give_reasons(tmp_path: Path) -> None:
    entries = run.read_equivalent()
    assert entries, "mutation/equivalent.txt is empty"
    # Only the files that have entries: generating every module's mutants takes minutes.
    modules = {n.split(".x_")[0].split(".xǁ")[0] for n in entries}
    files = sorted(f for fs, *_ in run.MODULES.values() for f in fs if f.removesuffix(".py").replace("/", ".") in modules)
    assert len(files) == len(modules), f"entries for modules no run mutates: {modules}"
    names = set(run.all_mutant_names(files))
    stale = sorted(n for n in entries if n not in names)
    assert not stale, f"entries whose mutant mutmut no longer generates (function edited? rerun and relist): {stale}"
    assert all(len(why) > 10 for why in entries.values())

    bad = tmp_path / "eq.txt"
    bad.write_text("meissonic_cli.atomic.x_write_json__mutmut_1\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="has no reason"):
        run.read_equivalent(bad)


def test_sample_is_seeded_and_a_subset() -> None:
    names = run.all_mutant_names(["meissonic_cli/train/optim.py"])
    assert len(names) == len(set(names)) > 50
    a, b = run.sample_names(names, 20, seed=3), run.sample_names(names, 20, seed=3)
    assert a == b and len(a) == 20 and set(a) <= set(names)
    assert run.sample_names(names, 20, seed=4) != a
    assert run.sample_names(names, 10_000, seed=3) == sorted(names)


def test_wilson_interval() -> None:
    lo, hi = run.wilson(90, 100)
    assert lo < 0.9 < hi and (lo, hi) == pytest.approx((0.8256, 0.9448), abs=1e-4)
    assert run.wilson(100, 100)[1] == 1.0 and run.wilson(0, 100)[0] == 0.0 and run.wilson(0, 0) == (0.0, 1.0)


def test_summary_counts_caught_equivalent_and_accepted() -> None:
    codes = {"m.x_f__mutmut_1": 1, "m.x_f__mutmut_2": 0, "m.x_f__mutmut_3": 0, "m.x_f__mutmut_4": 0,
             "m.x_f__mutmut_5": 36}  # killed, survived x3, timeout
    summary, open_ = run.summarise(codes, {"m.x_f__mutmut_2": "cannot change anything here",
                                           "m.x_f__mutmut_3": "accepted: only on a GPU"})
    assert (summary["killed"], summary["timeout"], summary["survived"]) == (1, 1, 3)
    assert (summary["equivalent"], summary["accepted"]) == (1, 1)
    assert summary["caught_fraction"] == 0.5  # 2 caught of 5 - 1 equivalent
    assert open_ == ["survived    m.x_f__mutmut_4"]


@pytest.mark.slow
def test_a_small_run_kills_known_mutants(tmp_path: Path) -> None:
    mutants = ["meissonic_cli.train.optim.xǁLRScheduleǁ__call____mutmut_1",
               "meissonic_cli.train.optim.xǁLRScheduleǁ__call____mutmut_21"]
    proc = subprocess.run([sys.executable, str(ROOT / "mutation" / "run.py"), "train", "--work", str(tmp_path / "w"),
                           "--mutants", *mutants], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert (summary["total"], summary["killed"] + summary["timeout"]) == (2, 2)


def _load_planted():
    spec = importlib.util.spec_from_file_location("mutation_planted", ROOT / "mutation" / "planted.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while it is created
    spec.loader.exec_module(module)
    return module


planted = _load_planted()


def test_planted_bugs_still_apply_to_the_code_and_name_existing_tests() -> None:
    """Every plant of mutation/planted.yaml matches its file exactly once (a refactor that moves the code
    must move the plant), and names tests that exist."""
    plants = planted.read_plants(ROOT / "mutation" / "planted.yaml")
    assert {p.kind for p in plants} >= {"multi-rank", "values", "boundaries", "rerun-identity", "help-promise"}
    for p in plants:
        assert (ROOT / p.file).read_text(encoding="utf-8").count(p.old) == 1, (p.name, p.file)
        for t in p.tests:
            path, _, func = t.partition("::")
            assert (ROOT / path).is_file(), (p.name, t)
            if func:
                assert f"def {func}(" in (ROOT / path).read_text(encoding="utf-8"), (p.name, t)


def test_planted_runner_reports_caught_survived_and_invalid(tmp_path: Path) -> None:
    """A tiny planted run: a bug the named test catches, one it cannot see, and a plant that matches nothing."""
    plants = tmp_path / "plants.yaml"
    plants.write_text(
        "- name: caught\n  file: mutation/run.py\n  old: 'p = caught / n'\n  new: 'p = caught / (n + 1)'\n"
        "  tests: ['tests/test_mutation_setup.py::test_wilson_interval']\n"
        "- name: survived\n  file: mutation/run.py\n  old: 'ap.add_argument(\"--list\"'\n  new: 'ap.add_argument(\"--listing\"'\n"
        "  tests: ['tests/test_mutation_setup.py::test_wilson_interval']\n"
        "- name: invalid\n  file: mutation/run.py\n  old: 'no such text'\n  new: 'x'\n"
        "  tests: ['tests/test_mutation_setup.py::test_wilson_interval']\n")
    proc = subprocess.run([sys.executable, str(ROOT / "mutation" / "run.py"), "--planted", str(plants), "--work",
                           str(tmp_path / "w")], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # not every plant caught
    summary = json.loads((tmp_path / "w" / "planted_summary.json").read_text())
    status = {p["name"]: p["status"] for p in summary["plants"]}
    assert status == {"caught": "caught", "survived": "survived", "invalid": "invalid"}
    caught = next(p for p in summary["plants"] if p["name"] == "caught")
    assert caught["caught_by"] == "tests/test_mutation_setup.py::test_wilson_interval"
    # The repository itself is never written.
    assert "p = caught / n" in (ROOT / "mutation" / "run.py").read_text(encoding="utf-8")
