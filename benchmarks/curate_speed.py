"""How fast is `meissonic curate`, as a whole process, against the bare DuckDB query a user would write?

Generates LAION-schema parquet (laion2b-en-aesthetic columns with the synthetic source's dirt:
NULLs, NaNs, duplicate URLs and hashes) and times whole processes (start-up included) doing the
paper's stage-1 filter (aesthetic >= 4.5, watermark < 0.5, shorter side >= 256, URL and caption
present), writing parquet:

  bare:    `python -c` importing duckdb and running the one statement a user would write,
           COPY (SELECT ... WHERE ...) TO 'out.parquet' (no stats, DuckDB defaults);
  curate:  `python -m meissonic_cli curate DIR --preset stage1 --no-dedup-url --no-dedup-hash`
           (per-step counts, histograms, stats JSON, shards, atomic output, all included).

With --dedup, also `curate` with URL and hash dedup on (the default) against the bare query with
the two QUALIFY row_number() windows, to report what dedup costs on its own.

Runs are paired (bare, curate, bare, curate, ...) so both see the same machine load; CPU is user +
sys of the child process (resource.getrusage(RUSAGE_CHILDREN)), wall is time.perf_counter(). Both
must write the same rows in the same order. Prints rows/s/core (input rows per CPU-second) and the
time that rate projects for laion2B-en (2.3B rows) on 32 cores, assuming linear scaling.

    nice -n 5 python benchmarks/curate_speed.py --rows 8000000 --repeats 3 --workdir /tmp/curate_speed
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# The plain query: columns renamed to curate's output names; NaN compares above every number in
# DuckDB, so a correct filter must exclude it explicitly (the synthetic data has NaNs).
BARE = textwrap.dedent("""
    import sys, duckdb
    files, out = sys.argv[1:-1], sys.argv[-1]
    src = "read_parquet([" + ", ".join(repr(f) for f in files) + "])"
    n = duckdb.connect().execute(f'''
    COPY (SELECT URL AS url, TEXT AS caption, WIDTH AS width, HEIGHT AS height, similarity, hash,
                 punsafe, pwatermark, aesthetic
          FROM {src}
          WHERE aesthetic >= 4.5 AND NOT isnan(aesthetic) AND pwatermark < 0.5
            AND least(WIDTH, HEIGHT) >= 256 AND NOT isnan(WIDTH) AND NOT isnan(HEIGHT)
            AND URL <> '' AND trim(TEXT) <> '')
    TO '{out}' ''').fetchone()[0]
    print(n)
""")

BARE_DEDUP = textwrap.dedent("""
    import sys, duckdb
    files, out = sys.argv[1:-1], sys.argv[-1]
    src = "read_parquet([" + ", ".join(repr(f) for f in files) + "])"
    n = duckdb.connect().execute(f'''
    COPY (SELECT url, caption, width, height, similarity, hash, punsafe, pwatermark, aesthetic FROM (
            SELECT * FROM (
              SELECT URL AS url, TEXT AS caption, WIDTH AS width, HEIGHT AS height, similarity, hash,
                     punsafe, pwatermark, aesthetic, file_index AS f, file_row_number AS r
              FROM {src}
              WHERE aesthetic >= 4.5 AND NOT isnan(aesthetic) AND pwatermark < 0.5
                AND least(WIDTH, HEIGHT) >= 256 AND NOT isnan(WIDTH) AND NOT isnan(HEIGHT)
                AND URL <> '' AND trim(TEXT) <> ''
              QUALIFY row_number() OVER (PARTITION BY url ORDER BY f, r) = 1)
            QUALIFY hash IS NULL OR row_number() OVER (PARTITION BY hash ORDER BY f, r) = 1)
          ORDER BY f, r)
    TO '{out}' ''').fetchone()[0]
    print(n)
""")


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + sys of the child) and stdout of one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd[:6])} ...\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def _urls(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    return [u for f in files for u in pq.read_table(f, columns=["url"]).column("url").to_pylist()]


def _pairs(name: str, bare_cmd: list[str], ours_cmd: list[str], repeats: int, bare_out: Path, ours_out: Path,
           rows: int) -> dict[str, float]:
    bare, ours = [], []
    for k in range(repeats):
        bare.append(_run(bare_cmd)[:2])
        ours.append(_run(ours_cmd)[:2])
        print(f"  {name} pair {k + 1}: bare {bare[-1][0]:.2f}s wall {bare[-1][1]:.2f}s cpu | curate "
              f"{ours[-1][0]:.2f}s wall {ours[-1][1]:.2f}s cpu | ratio wall {ours[-1][0] / bare[-1][0]:.2f}x "
              f"cpu {ours[-1][1] / bare[-1][1]:.2f}x", flush=True)
    a, b = _urls(bare_out), _urls(ours_out)
    if a != b:
        sys.exit(f"{name}: bare and curate disagree on the rows written ({len(a):,} vs {len(b):,})")
    wall_r = [o[0] / b_[0] for o, b_ in zip(ours, bare)]
    cpu_r = [o[1] / b_[1] for o, b_ in zip(ours, bare)]
    best_cpu = min(c for _, c in ours)
    return {"rows_out": len(b), "wall_ratio": statistics.median(wall_r), "cpu_ratio": statistics.median(cpu_r),
            "bare_cpu": statistics.median(c for _, c in bare), "bare_wall": statistics.median(w for w, _ in bare),
            "curate_cpu": statistics.median(c for _, c in ours), "curate_wall": statistics.median(w for w, _ in ours),
            "rows_per_cpu_s": rows / best_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8_000_000, help="rows of synthetic metadata")
    ap.add_argument("--files", type=int, default=8, help="parquet files to split them into")
    ap.add_argument("--repeats", type=int, default=3, help="paired runs per comparison")
    ap.add_argument("--workdir", type=str, default=None, help="keep the data here (default: a temp dir)")
    ap.add_argument("--dedup", action="store_true", help="also time URL + hash dedup (curate's default)")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from meissonic_cli.shapes.source import synthetic_table

    work = Path(args.workdir or tempfile.mkdtemp(prefix="curate_speed_"))
    inp = work / "input"
    inp.mkdir(parents=True, exist_ok=True)
    files = sorted(glob.glob(str(inp / "*.parquet")))
    if len(files) != args.files or sum(pq.ParquetFile(f).metadata.num_rows for f in files) != args.rows:
        shutil.rmtree(inp)
        inp.mkdir()
        t0 = time.perf_counter()
        table = synthetic_table(args.rows, seed=0, scene_pool=4096)
        per = -(-args.rows // args.files)
        for k in range(args.files):
            pq.write_table(table.slice(k * per, per), inp / f"part-{k:05d}.parquet", row_group_size=122_880)
        del table
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.1f}s -> {inp}")
        files = sorted(glob.glob(str(inp / "*.parquet")))
    size_mb = sum(Path(f).stat().st_size for f in files) / 1e6
    print(f"input: {len(files)} file(s), {args.rows:,} rows, {size_mb:.0f} MB; {os.cpu_count()} CPUs; "
          f"load before: {os.getloadavg()[0]:.2f}", flush=True)

    curate = [sys.executable, "-m", "meissonic_cli", "curate", str(inp), "--preset", "stage1", "--overwrite",
              "--shard-rows", str(args.rows)]
    results = {}
    bare_out, ours_out = work / "bare.parquet", work / "ours"
    results["stage-1, no dedup"] = _pairs(
        "no dedup", [sys.executable, "-c", BARE, *files, str(bare_out)],
        curate + ["--no-dedup-url", "--no-dedup-hash", "-o", str(ours_out)], args.repeats, bare_out, ours_out,
        args.rows)
    if args.dedup:
        results["stage-1 + url/hash dedup"] = _pairs(
            "dedup", [sys.executable, "-c", BARE_DEDUP, *files, str(bare_out)],
            curate + ["-o", str(ours_out)], args.repeats, bare_out, ours_out, args.rows)
    print(f"\nload after: {os.getloadavg()[0]:.2f} (1-min average)")
    print(f"{'comparison':<26} {'rows out':>10} {'bare cpu':>9} {'curate cpu':>10} {'cpu ratio':>9} "
          f"{'bare wall':>9} {'curate wall':>11} {'wall ratio':>10} {'rows/s/core':>12} {'2.3B/32 cores':>13}")
    for name, r in results.items():
        projected = 2.3e9 / (r["rows_per_cpu_s"] * 32)
        print(f"{name:<26} {r['rows_out']:>10,} {r['bare_cpu']:>8.2f}s {r['curate_cpu']:>9.2f}s "
              f"{r['cpu_ratio']:>8.2f}x {r['bare_wall']:>8.2f}s {r['curate_wall']:>10.2f}s {r['wall_ratio']:>9.2f}x "
              f"{r['rows_per_cpu_s']:>12,.0f} {projected / 60:>10.1f} min")
    print("(ratios: median of the paired runs; rows/s/core from curate's best CPU time; medians of times)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
