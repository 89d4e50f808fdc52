"""How fast is `meissonic curate`, as a whole process, against a bare DuckDB query and pandas?

Generates LAION-schema parquet (laion2b-en-aesthetic columns, the synthetic source's dirt: NULLs,
NaNs, duplicate URLs and hashes) and times three processes doing the same work, the paper's
stage-1 filter (aesthetic >= 4.5, watermark < 0.5, shorter side >= 256, URL and caption present)
plus URL and hash dedup, writing parquet:

  (a) bare DuckDB: `python -c` importing duckdb and running one COPY statement;
  (b) `python -m meissonic_cli curate ... --preset stage1` (per-filter counts, histograms, stats JSON,
      shards, atomic output, all included);
  (c) pandas: read_parquet, boolean masks, drop_duplicates, to_parquet.

All three must agree on the number of rows kept. Each is run --repeats times; the best time counts.

    python benchmarks/curate_speed.py --rows 4000000
"""

from __future__ import annotations

import argparse
import glob
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

BARE_DUCKDB = textwrap.dedent("""
    import sys, duckdb
    files, out = sys.argv[1:-1], sys.argv[-1]
    con = duckdb.connect()
    src = "read_parquet([" + ", ".join(repr(f) for f in files) + "], filename = true, file_row_number = true)"
    n = con.execute(f'''
    COPY (
      SELECT url, caption, width, height, similarity, hash, punsafe, pwatermark, aesthetic FROM (
        SELECT * FROM (
          SELECT URL AS url, TEXT AS caption, WIDTH AS width, HEIGHT AS height, similarity, hash,
                 punsafe, pwatermark, aesthetic, filename AS f, file_row_number AS r
          FROM {src}
          WHERE URL IS NOT NULL AND URL <> '' AND TEXT IS NOT NULL AND trim(TEXT) <> ''
            AND NOT isnan(aesthetic) AND aesthetic >= 4.5
            AND NOT isnan(pwatermark) AND pwatermark < 0.5
            AND NOT isnan(WIDTH) AND NOT isnan(HEIGHT) AND least(WIDTH, HEIGHT) >= 256
          QUALIFY row_number() OVER (PARTITION BY URL ORDER BY f, r) = 1)
        QUALIFY hash IS NULL OR row_number() OVER (PARTITION BY hash ORDER BY f, r) = 1)
      ORDER BY f, r
    ) TO '{out}' (FORMAT parquet, COMPRESSION zstd)''').fetchone()[0]
    print(n)
""")

PANDAS = textwrap.dedent("""
    import sys
    import pandas as pd
    files, out = sys.argv[1:-1], sys.argv[-1]
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    caption = df["TEXT"]
    keep = (df["URL"].notna() & (df["URL"] != "") & caption.notna() & (caption.str.strip() != "")
            & (df["aesthetic"] >= 4.5) & (df["pwatermark"] < 0.5)
            & (df[["WIDTH", "HEIGHT"]].min(axis=1, skipna=False) >= 256))
    df = df[keep]
    df = df[~df["URL"].duplicated()]
    df = df[df["hash"].isna() | ~df["hash"].duplicated()]
    df = df.rename(columns={"URL": "url", "TEXT": "caption", "WIDTH": "width", "HEIGHT": "height"})
    df.to_parquet(out, index=False)
    print(len(df))
""")


def _time(cmd: list[str], repeats: int) -> tuple[float, float, str]:
    """Best wall-clock seconds, best CPU seconds (user + sys) and stdout of `repeats` runs of `cmd`.

    CPU time is reported too because this machine is shared: wall time moves with other load.
    """
    best_wall, best_cpu, out = float("inf"), float("inf"), ""
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(f"command failed: {' '.join(cmd[:4])} ...\n{proc.stderr[-2000:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best_wall, best_cpu, out = min(best_wall, elapsed), min(best_cpu, cpu), proc.stdout
    return best_wall, best_cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4_000_000, help="rows of synthetic metadata")
    ap.add_argument("--files", type=int, default=4, help="parquet files to split them into")
    ap.add_argument("--repeats", type=int, default=3, help="runs per contender; the best counts")
    ap.add_argument("--workdir", type=str, default=None, help="keep the data here (default: a temp dir)")
    ap.add_argument("--skip-pandas", action="store_true", help="skip the pandas reference")
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
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.1f}s -> {inp}")
        files = sorted(glob.glob(str(inp / "*.parquet")))
    size_mb = sum(Path(f).stat().st_size for f in files) / 1e6
    print(f"input: {len(files)} file(s), {args.rows:,} rows, {size_mb:.0f} MB")

    results: dict[str, tuple[float, float, int]] = {}
    wall, cpu, out = _time([sys.executable, "-c", BARE_DUCKDB, *files, str(work / "bare.parquet")], args.repeats)
    results["bare duckdb"] = (wall, cpu, int(out.split()[-1]))
    ours_out = work / "ours"
    wall, cpu, _ = _time([sys.executable, "-m", "meissonic_cli", "curate", str(inp), "--preset", "stage1",
                          "-o", str(ours_out), "--overwrite"], args.repeats)
    results["meissonic curate"] = (wall, cpu, pq.ParquetDataset(ours_out).read().num_rows)
    if not args.skip_pandas:
        wall, cpu, out = _time([sys.executable, "-c", PANDAS, *files, str(work / "pandas.parquet")],
                               max(1, args.repeats - 1))
        results["pandas"] = (wall, cpu, int(out.split()[-1]))

    base_wall, base_cpu, _ = results["bare duckdb"]
    print(f"\n{'contender':<18} {'wall s':>7} {'rows/s':>11} {'wall ratio':>10} {'cpu s':>7} {'cpu ratio':>9} {'rows out':>9}")
    for name, (wall, cpu, n) in results.items():
        print(f"{name:<18} {wall:7.2f} {args.rows / wall:11,.0f} {wall / base_wall:9.2f}x {cpu:7.2f} "
              f"{cpu / base_cpu:8.2f}x {n:9,}")
    counts = {n for _, _, n in results.values()}
    counts = {n for _, _, n in results.values()}
    if len(counts) != 1:
        sys.exit(f"contenders disagree on rows kept: { {k: v[2] for k, v in results.items()} }")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
