"""Mutation testing of one core module with mutmut, against only the tests that cover it.

    python mutation/run.py MODULE [--max-children N] [--work DIR] [--keep] [--mutants NAME ...] [--report]
    python mutation/run.py MODULE --sample N [--seed S]   # a seeded random sample of the module's mutants
    python mutation/run.py --list
    python mutation/run.py --planted FILE [--only NAME ...]   # hand-written bugs, see mutation/planted.py

MODULE is a key of MODULES below (e.g. `atomic`, `scheduler`, `train`). The run happens in a snapshot of
the working tree under --work (default: $TMPDIR/meissonic-mutation/MODULE), so edits made meanwhile do not
disturb it and nothing is written into the repository: the snapshot holds meissonic_cli/, tests/,
pipelines/, benchmarks/ and a pyproject.toml whose [tool.mutmut] is the repository's plus this module's
`only_mutate` and test selection. mutmut records which tests call each function and runs each mutant
against those tests only (`-x -q -p no:cacheprovider -m "not slow"`, from [tool.mutmut]).

At the end it prints killed / survived / no tests / timeout / equivalent counts and every survivor that
mutation/equivalent.txt does not list (one `mutant-name  reason` per line; a reason starting with
`accepted:` marks a survivor the tests cannot reach, which still counts as not caught), and writes the
counts to WORK/summary.json. `mutmut show NAME` in WORK/ prints a mutant's diff. Exit status 0 when
the caught fraction ((killed + timeout) / (all - equivalent)) is at least --target (default 0.9), else 1.

--sample N runs a seeded uniform random sample of N of the module's mutants (names listed with mutmut's own
generator, so they are exactly the names `mutmut run` would make). On two cores a large module's full run
takes hours; the sample's caught fraction is reported with its 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# module -> (files to mutate, test files that cover them, optional -k expression, optional mutant-name globs).
# The globs keep a large module's run to its core functions (the guidance and sampling functions of the
# pipeline); --mutants overrides them.
MODULES: dict[str, tuple[list[str], list[str], str | None, list[str]]] = {
    "atomic": (["meissonic_cli/atomic.py"], ["tests/test_atomic.py", "tests/test_atomic_behaviour.py"], None, []),
    "scheduler": (["meissonic_cli/model/scheduler.py"], ["tests/test_scheduler.py"], None, []),
    "transformer": (["meissonic_cli/model/transformer.py"],
                    ["tests/test_model.py", "tests/test_model_conformance.py", "tests/test_transformer_guards.py"],
                    None, []),
    "text_encoder": (["meissonic_cli/model/text_encoder.py"],
                     ["tests/test_text_encoder.py", "tests/test_parity_tokenizer.py",
                      "tests/test_text_encoder_guards.py"], None, []),
    "shards": (["meissonic_cli/data/shards.py"], ["tests/test_shards.py", "tests/test_shards_guards.py"], None, []),
    "tokenize": (["meissonic_cli/data/tokenize.py"], ["tests/test_tokenize.py", "tests/test_tokenize_own_images.py",
                                                    "tests/test_tokenize_guards.py"], None, []),
    "curate": (["meissonic_cli/data/curate_steps.py"],  # curate's SQL builder
               ["tests/test_curate.py", "tests/test_curate_schemas.py", "tests/test_curate_steps.py",
                "tests/test_behaviour_guards.py::test_curate_min_width_and_min_height_keep_rows_exactly_on_the_threshold"],
               None, []),
    "pipeline": (["meissonic_cli/sample/pipeline.py", "meissonic_cli/sample/guidance.py"],
                 ["tests/test_pipeline.py", "tests/test_behaviour_guards.py", "tests/test_samplers.py",
                  "tests/test_pipeline_guards.py"], None,
                 [f"meissonic_cli.sample.pipeline.x_{f}__mutmut_*" for f in
                  ("exact_logits", "masked_logits", "sample_tokens", "_check_init_tokens", "check_token_temperature")]
                 + [f"meissonic_cli.sample.guidance.x_{f}__mutmut_*" for f in ("guidance_batch", "check_negative_prompts")]
                 + [f"meissonic_cli.sample.pipeline.xǁMeissonicPipelineǁ{f}__mutmut_*" for f in
                    ("__call__", "logits", "_prompt_inputs", "_micro_conds", "_num_codes")]),
    "edit": (["meissonic_cli/sample/edit.py"], ["tests/test_edit.py", "tests/test_parity_edit.py",
                                                "tests/test_edit_guards.py"], None, []),
    "train": (["meissonic_cli/train/objective.py", "meissonic_cli/train/ema.py", "meissonic_cli/train/optim.py"],
              ["tests/test_behaviour_guards.py"] + [f"tests/test_train.py::test_{t}" for t in (
                  "masking_rate_follows_the_arccos_density", "mask_tokens_masks_round_L_r_positions_at_random",
                  "masked_cross_entropy_on_a_hand_built_batch", "masked_cross_entropy_matches_the_official_training_loss",
                  "forward_gets_timestep_rate_times_1000_and_the_shards_micro_conds")]
              + [f"tests/test_train_logging.py::test_{t}" for t in (
                  "ema_decay_schedule_is_diffusers_get_decay", "ema_equals_diffusers_ema_model_after_n_steps",
                  "masked_token_stats_against_a_direct_count")], None, []),
    "checkpoint": (["meissonic_cli/train/checkpoint.py"], ["tests/test_train.py", "tests/test_checkpoint_guards.py"],
                   None, []),
}
COPY = ["meissonic_cli", "tests", "pipelines", "benchmarks"]
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.txt"


def read_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """mutant name -> reason, from `name  reason` lines (blank lines and # comments ignored)."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}: {name} has no reason; write `name  why it cannot change behaviour`")
        out[name] = reason.strip()
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def prepare(work: Path, files: list[str], tests: list[str], k: str | None, keep: bool = False) -> None:
    """A fresh snapshot; with `keep` an existing one keeps its source (and mutmut's results) and only
    takes the current tests, so named survivors can be rerun against new tests."""
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in (["tests"] if keep else COPY):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=keep)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mm = dict(pyproject.get("tool", {}).get("mutmut", {}))
    mm["only_mutate"] = files
    mm["pytest_add_cli_args_test_selection"] = tests + (["-k", k] if k else [])
    mm["also_copy"] = [n for n in COPY if n not in ("meissonic_cli", "tests")]
    pytest_ini = pyproject.get("tool", {}).get("pytest", {}).get("ini_options", {})
    lines = ["[tool.mutmut]"] + [f"{key} = {_toml_value(v)}" for key, v in mm.items()]
    lines += ["", "[tool.pytest.ini_options]"] + [f"{key} = {_toml_value(v)}" for key, v in pytest_ini.items()]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def collect(work: Path, files: list[str]) -> dict[str, int | None]:
    """mutant name -> exit code, from mutmut's .meta files of the mutated files."""
    out: dict[str, int | None] = {}
    for f in files:
        meta = work / "mutants" / (f + ".meta")
        if meta.is_file():
            out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def summarise(codes: dict[str, int | None], equivalent: dict[str, str]) -> tuple[dict, list[str]]:
    """Counts per status; a mutant counts as caught when a test fails on it or it runs past the time
    limit (an endless loop the tests would hang on)."""
    from mutmut.stats import status_by_exit_code

    status = {name: status_by_exit_code[code] for name, code in codes.items()}
    counts = Counter(status.values())
    caught = {n for n, s in status.items() if s in ("killed", "timeout")}
    # "accepted: ..." entries are survivors the tests cannot reach here (e.g. a failing rmtree as root):
    # listed and explained, but still counted against the caught fraction.
    accepted = {n for n, why in equivalent.items() if why.lower().startswith("accepted:")}
    eq = sorted(n for n in status if n not in caught and n in equivalent and n not in accepted)
    acc = sorted(n for n in status if n not in caught and n in accepted)
    open_ = sorted(n for n in status if n not in caught and n not in equivalent)
    total = len(status)
    summary = {
        "total": total, "killed": counts.get("killed", 0), "timeout": counts.get("timeout", 0),
        "survived": counts.get("survived", 0), "no_tests": counts.get("no tests", 0),
        "other": total - sum(counts.get(k, 0) for k in ("killed", "timeout", "survived", "no tests")),
        "equivalent": len(eq), "accepted": len(acc), "caught_fraction": round(len(caught) / max(1, total - len(eq)), 4),
        "caught_but_listed_equivalent": sorted(n for n in caught if n in equivalent),
        "equivalent_not_found": sorted(n for n in equivalent if n not in status and n.startswith(_prefixes(codes))),
    }
    return summary, [f"{status[n]:11s} {n}" for n in open_]


def all_mutant_names(files: list[str]) -> list[str]:
    """Every mutant name mutmut generates for `files`, in file order (no tests run)."""
    from mutmut.__main__ import write_all_mutants_to_file

    names: list[str] = []
    for f in files:
        module = f.removesuffix(".py").replace("/", ".")
        mutated = write_all_mutants_to_file(out=io.StringIO(), source=(ROOT / f).read_text(encoding="utf-8"),
                                            filename=Path(f))
        names += [f"{module}.{n}" for n in mutated.mutant_names]
    return names


def sample_names(names: list[str], n: int, seed: int) -> list[str]:
    """A seeded uniform sample of n names, sorted; all of them when n >= len(names)."""
    return sorted(random.Random(seed).sample(sorted(names), min(n, len(names))))


def wilson(caught: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (for a sampled caught fraction)."""
    if n == 0:
        return (0.0, 1.0)
    p = caught / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def _prefixes(codes: dict[str, int | None]) -> tuple[str, ...]:
    return tuple({n.split(".x_")[0] + "." for n in codes}) or ("\0",)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", nargs="?", choices=sorted(MODULES))
    ap.add_argument("--list", action="store_true", help="print the modules, their files and tests")
    ap.add_argument("--max-children", type=int, default=1, help="parallel mutant workers (default 1)")
    ap.add_argument("--work", type=Path, help="snapshot folder (default $TMPDIR/meissonic-mutation/MODULE)")
    ap.add_argument("--keep", action="store_true", help="reuse the snapshot and mutmut's cached results")
    ap.add_argument("--report", action="store_true", help="only summarise the snapshot's last results")
    ap.add_argument("--mutants", nargs="*", default=[], help="only these mutant names or globs")
    ap.add_argument("--tests", nargs="+", help="test files to use instead of the module's (e.g. for a before/after)")
    ap.add_argument("--sample", type=int, help="run a seeded random sample of this many mutants")
    ap.add_argument("--seed", type=int, default=15, help="seed of --sample (default 15)")
    ap.add_argument("--target", type=float, default=0.9, help="caught fraction to reach (default 0.9)")
    ap.add_argument("--planted", type=Path, help="a YAML file of hand-planted bugs (file, old, new), run one at a time")
    ap.add_argument("--only", nargs="+", default=[], help="with --planted: only these entries")
    ap.add_argument("--timeout", type=float, default=900, help="with --planted: seconds before a plant counts as caught")
    args = ap.parse_args(argv)
    if args.planted:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from planted import run_planted

        work = args.work or Path(tempfile.gettempdir()) / "meissonic-mutation" / "planted"
        return run_planted(args.planted, MODULES, work, args.only, args.timeout)
    if args.list or not args.module:
        for name, (files, tests, k, globs) in MODULES.items():
            print(f"{name:13s} {' '.join(files)}  <-  {' '.join(tests)}{f' -k {k!r}' if k else ''}"
                  f"{f'  ({len(globs)} functions)' if globs else ''}")
        return 0
    files, tests, k, globs = MODULES[args.module]
    tests, k = (args.tests, None) if args.tests else (tests, k)
    work = args.work or Path(tempfile.gettempdir()) / "meissonic-mutation" / args.module
    keep = args.keep and (work / "mutants").is_dir()
    if args.sample and not args.mutants:
        pool = [n for n in all_mutant_names(files) if not globs or any(fnmatch.fnmatch(n, g) for g in globs)]
        args.mutants = sample_names(pool, args.sample, args.seed)
        print(f"sample: {len(args.mutants)} of {len(pool)} mutants (seed {args.seed})", flush=True)
    if not args.report:
        prepare(work, files, tests, k, keep=keep)
    # One thread: the tests use tiny models, and a forked child must not inherit an OpenMP pool.
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("MEISSONIC_CONFORMANCE_DIR", str(ROOT.parent / "shared" / "conformance"))
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *(args.mutants or globs)]
    rc = 0
    if not args.report:
        print("in", work, ":", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=work, env=env).returncode
    selected = args.mutants or globs
    codes = {n: c for n, c in collect(work, files).items()
             if not selected or any(n == g or fnmatch.fnmatch(n, g) for g in selected)}
    summary, open_ = summarise(codes, read_equivalent())
    summary.update(module=args.module, files=files, tests=tests, k=k, mutmut_exit=rc,
                   mutants=selected if not args.sample else f"sample of {len(selected)} (seed {args.seed})")
    if args.sample:
        n = summary["total"] - summary["equivalent"]
        caught = summary["killed"] + summary["timeout"]
        summary["caught_fraction_95ci"] = wilson(caught, n)
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("files", "tests")}))
    if open_:
        print(f"{len(open_)} not killed and not marked equivalent (`mutmut show NAME` in {work}):")
        print("\n".join(open_))
    return 0 if rc == 0 and summary["caught_fraction"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
