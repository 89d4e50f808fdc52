"""`download`: curated parquet -> webdataset image shards, through img2dataset.

img2dataset does the reading, fetching, resizing and writing (`img2dataset.download`); this
module prepares its input and reports on its output:

- finds the URL / caption / metadata columns whatever the parquet calls them (as `curate` does) and
  stages them under `<output>/_meissonic/input/` with canonical names, so the metadata kept in each
  sample's json is `aesthetic`, `pwatermark`, `punsafe`, `similarity`, `hash` and the source's
  claimed size as `source_width` / `source_height` (img2dataset's own `width` / `height` are the
  size written, `original_width` / `original_height` the size downloaded);
- resumes: img2dataset's incremental mode skips every shard whose `NNNNN_stats.json` exists, and
  `<output>/_meissonic/download.json` records the input and image options so a rerun with other
  ones is refused instead of mixing two datasets in one folder;
- sums the per-shard stats into one summary (successes, failures by reason) saved as
  `<output>/_meissonic/download_summary.json` (outside the folder root: img2dataset reads every
  `*.json` there as a shard's stats);
- runs img2dataset's `pyspark` and `ray` distributors out of the box: Java is checked first, a
  `local[--processes]` Spark session (workers on this interpreter, not PATH's `python3`) or a local
  Ray instance is started and stopped around the download unless one is already active, and
  `--spark-master` / `--ray-address` point at a cluster. The shards hold the same samples, byte for
  byte, whichever distributor wrote them (only the order inside a shard follows completion).

Output (webdataset, as img2dataset writes it): `<output>/NNNNN.tar` with `KEY.jpg` (or png/webp),
`KEY.txt` (caption) and `KEY.json` (metadata and download status) per sample, plus
`NNNNN.parquet` (one metadata row per input row, failures included) and `NNNNN_stats.json`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from meissonic_cli.atomic import atomic_write, replace_directory, write_json
from meissonic_cli.config import Problems, field, flag_of, read_json_object
from meissonic_cli.data.curate import ROLE_CANDIDATES, detect_columns, resolve_inputs
from meissonic_cli.data.inputs import check_output_apart, check_output_parent, staging_folder, url_scheme_mask
from meissonic_cli.data.workers import end_with_parent
from meissonic_cli.errors import ConfigError, InputError, MeissonicError, OutputExistsError
from meissonic_cli.safety import DEFAULT_URL_SCHEMES, MAX_RESOLUTION, parse_schemes

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
# --encode-quality per format: (lowest, highest, default). img2dataset hands the value to OpenCV, whose
# ranges these are: jpg/webp quality, png zlib compression level. The png default is OpenCV's own
# (fastest) level: 9 takes ~10x the CPU of 1 for ~10% fewer bytes, and the images are lossless anyway.
ENCODE_QUALITY: dict[str, tuple[int, int, int]] = {"jpg": (0, 100, 95), "png": (0, 9, 1), "webp": (1, 100, 95)}
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# Metadata roles saved into each sample's json, and the name they get there.
SAVED_NAMES: dict[str, str] = {
    "aesthetic": "aesthetic", "watermark": "pwatermark", "unsafe": "punsafe", "similarity": "similarity",
    "hash": "hash", "width": "source_width", "height": "source_height",
}
STATE_DIR = "_meissonic"

# Ranges of the numbers that size a download (checked before any work, as every config number is).
MAX_PROCESSES = 1024  # download processes, or Spark/Ray parallelism (a cluster's worth)
MAX_THREADS = 1024  # download threads per process (img2dataset's default is 32-256)
MAX_SHARD_SIZE = 10_000_000  # samples per output shard (img2dataset's default is 10,000)
MAX_TIMEOUT = 3600  # seconds one image request may take
MAX_RETRIES = 100  # retries per failed image


@dataclass
class DownloadConfig:
    """Everything `meissonic download` does; field help is the CLI help."""

    inputs: list[str] = field(
        default_factory=list,
        help="Curated parquet files, directories or globs (e.g. the output of `meissonic curate`)."
    )
    output: str = field("", help="Output directory for the webdataset shards.", flag="--out", short="-o",
                        aliases=("--output",))
    image_size: int = field(512, bounds=(1, MAX_RESOLUTION), help="Target image size in pixels (meaning depends on --resize-mode).")
    resize_mode: str = field(
        "keep_ratio",
        help="How to resize: no, border (pad to a square), keep_ratio (shorter side = size), keep_ratio_largest "
             "(longer side = size), center_crop."
    )
    resize_only_if_bigger: bool = field(
        True,
        help="Only shrink images; never upscale small ones (tokenize crops and records the original size).",
        flag="--resize-only-if-bigger/--upscale",
    )
    min_image_size: int = field(0, bounds=(0, MAX_RESOLUTION), help="Skip images whose shorter side is below this many pixels.")
    max_aspect_ratio: float | None = field(None, help="Skip images whose longer side / shorter side exceeds this.")
    encode_format: str = field("jpg", help="Image format in the shards: jpg, png or webp.")
    encode_quality: int | None = field(
        None,
        help="jpg quality 0-100, webp quality 1-100 (default 95), or png compression level 0-9 (default 1)."
    )
    processes: int = field(1, bounds=(1, MAX_PROCESSES), help="Download processes (multiprocessing) or Spark/Ray parallelism.")
    threads: int = field(32, bounds=(1, MAX_THREADS), help="Download threads per process.")
    shard_size: int = field(10_000, bounds=(1, MAX_SHARD_SIZE), help="Samples per output shard.")
    distributor: str = field(
        "multiprocessing",
        help="multiprocessing (one machine), pyspark (pip install 'meissonic[spark]', needs Java) or ray (pip "
             "install 'meissonic[ray]'). pyspark and ray run locally with --processes workers unless given "
             "--spark-master / --ray-address; the shards are the same whichever runs them."
    )
    spark_master: str | None = field(
        None,
        help="Spark master for --distributor pyspark: spark://HOST:7077, yarn, k8s://..., local[N] (default: "
             "local[--processes]). Unused when a Spark session is already active."
    )
    ray_address: str | None = field(
        None,
        help="Ray cluster for --distributor ray: HOST:6379, ray://HOST:10001 or auto (default: $RAY_ADDRESS, else a "
             "local Ray instance with --processes CPUs). Unused when Ray is already initialised."
    )
    timeout: int = field(10, bounds=(1, MAX_TIMEOUT), help="Seconds before one image request gives up.")
    retries: int = field(0, bounds=(0, MAX_RETRIES), help="Retries per failed image.")
    url_col: str | None = field(None, help="Column holding the image URL (default: detected, e.g. url or URL).")
    caption_col: str | None = field(None, help="Column holding the caption (default: detected, e.g. caption or TEXT).")
    overwrite: bool = field(False, help="Delete an existing output directory and start over (default: resume it).")
    allow_schemes: list[str] = field(
        default_factory=list,
        help="Also download URLs of these schemes (repeatable or comma-separated, e.g. file or ftp). By default only "
             "http and https URLs are fetched; rows with other schemes are counted and skipped."
    )

    def url_schemes(self) -> tuple[str, ...]:
        """The URL schemes img2dataset may fetch: http, https and --allow-schemes."""
        return tuple(dict.fromkeys(DEFAULT_URL_SCHEMES + parse_schemes(self.allow_schemes)))

    def validate(self) -> None:
        p = Problems(self)
        f = lambda name: flag_of(DownloadConfig, name)  # noqa: E731
        p.check(bool(self.inputs), "give at least one input parquet file, directory or glob")
        p.check(bool(self.output), f"{f('output')} is required")
        p.check(self.image_size >= 1, f"{f('image_size')} must be >= 1, got {self.image_size}")
        p.check(self.resize_mode in RESIZE_MODES,
                f"{f('resize_mode')} must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        p.check(self.encode_format in ENCODE_FORMATS,
                f"{f('encode_format')} must be one of {', '.join(ENCODE_FORMATS)}, got {self.encode_format!r}")
        p.check(self.distributor in DISTRIBUTORS,
                f"{f('distributor')} must be one of {', '.join(DISTRIBUTORS)}, got {self.distributor!r}")
        p.check(self.min_image_size >= 0, f"{f('min_image_size')} must be >= 0, got {self.min_image_size}")
        p.check(self.max_aspect_ratio is None or self.max_aspect_ratio >= 1,
                f"{f('max_aspect_ratio')} must be >= 1, got {self.max_aspect_ratio}")
        for name in ("processes", "threads", "shard_size", "timeout"):
            p.check(getattr(self, name) >= 1, f"{f(name)} must be >= 1, got {getattr(self, name)}")
        p.check(self.retries >= 0, f"{f('retries')} must be >= 0, got {self.retries}")
        if self.encode_format in ENCODE_QUALITY and self.encode_quality is not None:
            low, high, default = ENCODE_QUALITY[self.encode_format]
            what = "compression level" if self.encode_format == "png" else "quality"
            p.check(low <= self.encode_quality <= high,
                    f"{f('encode_quality')} is the {self.encode_format} {what}, {low}-{high} (leave it out for "
                    f"{default}); got {self.encode_quality}")
        p.raise_if_any()

    def quality(self) -> int:
        """The `--encode-quality` img2dataset gets: the one given, else the format's default."""
        return self.encode_quality if self.encode_quality is not None else ENCODE_QUALITY[self.encode_format][2]

    def fingerprint_options(self) -> dict[str, Any]:
        """The options that shape the shards: a resume must use the same ones."""
        options = {k: getattr(self, k) for k in ("image_size", "resize_mode", "resize_only_if_bigger",
                                                 "min_image_size", "max_aspect_ratio", "encode_format", "shard_size")}
        # The resolved value, so leaving the flag out resumes a run that gave the default explicitly.
        options["encode_quality"] = self.quality()
        if self.url_schemes() != DEFAULT_URL_SCHEMES:  # only then: older manifests resume unchanged
            options["url_schemes"] = list(self.url_schemes())
        return options


@dataclass
class DownloadResult:
    """The summed img2dataset stats of every completed shard (`summary["complete"]`: all shards done)."""

    output: Path
    summary: dict[str, Any]


def _inspect_inputs(files: list[Path], cfg: DownloadConfig) -> dict[str, str]:
    """Find the URL / caption / metadata columns of every input (one schema for all) before writing anything."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, str] | None = None
    for path in files:
        try:
            present = list(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"cannot read {path} as parquet ({err}); expected curated parquet metadata") from None
        cols = detect_columns(present, {"url": cfg.url_col, "caption": cfg.caption_col})
        for role in ("url", "caption"):
            if role not in cols:
                raise InputError(f"{path} has no {role} column (looked for {', '.join(ROLE_CANDIDATES[role])}); "
                                 f"columns present: {', '.join(present)}; pass --{role}-col NAME")
        if columns is None:
            columns = cols
        elif cols != columns:
            raise InputError(f"{path} has columns {', '.join(present)}, unlike {files[0]}; "
                             "give inputs with one schema (curate them together first)")
    assert columns is not None
    return columns


def _stage_inputs(files: list[Path], cols: dict[str, str], stage: Path,
                  schemes: tuple[str, ...] = DEFAULT_URL_SCHEMES,
                  refused: dict[str, int] | None = None) -> tuple[int, int, list[int]]:
    """Write each input as `stage/part-NNNNN.parquet` with canonical column names; drop rows without a URL
    and rows whose URL scheme is not in `schemes` (counted by scheme into `refused`)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = dropped = 0
    per_file: list[int] = []
    stage.mkdir(parents=True, exist_ok=True)
    names = {cols["url"]: "url", cols["caption"]: "caption"}
    names.update({cols[r]: SAVED_NAMES[r] for r in SAVED_NAMES if r in cols})
    for k, path in enumerate(files):
        try:
            table = pq.read_table(path, columns=list(names))
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"cannot read {path} as parquet ({err}); expected curated parquet metadata") from None
        table = table.rename_columns([names[c] for c in table.column_names])
        url = table.column("url").cast(pa.string())
        ok = pc.and_(pc.is_valid(url), pc.not_equal(pc.utf8_length(pc.fill_null(url, "")), 0))
        scheme_ok, counts = url_scheme_mask(url, schemes)
        for name, n in counts.items():
            if refused is not None:
                refused[name] = refused.get(name, 0) + n
        table = table.filter(pc.or_(scheme_ok, pc.invert(ok)))
        ok = pc.and_(pc.is_valid(table.column("url")), pc.not_equal(pc.utf8_length(pc.fill_null(
            table.column("url").cast(pa.string()), "")), 0))
        kept = table.filter(ok)
        # NaN would reach each sample's json as the non-standard token NaN: store null instead.
        for i, name in enumerate(kept.column_names):
            col = kept.column(i)
            if pa.types.is_floating(col.type):
                kept = kept.set_column(i, name, pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col))
        dropped += table.num_rows - kept.num_rows
        rows += kept.num_rows
        per_file.append(kept.num_rows)
        atomic_write(stage / f"part-{k:05d}.parquet", lambda tmp, t=kept: pq.write_table(t, tmp))
    return rows, dropped, per_file


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _fingerprint(files: list[Path], cfg: DownloadConfig) -> dict[str, Any]:
    return {"inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files],
            "options": cfg.fingerprint_options()}


def summarize(output: str | os.PathLike) -> dict[str, Any]:
    """Sum img2dataset's `*_stats.json` files of `output` into one summary."""
    out = Path(output)
    totals = {"shards": 0, "count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    reasons: dict[str, int] = {}
    duration = 0.0
    for path in sorted(glob.glob(str(out / "*_stats.json"))):
        stats = json.loads(Path(path).read_text())
        totals["shards"] += 1
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
        duration += float(stats.get("duration", 0.0))
        for reason, n in (stats.get("status_dict") or {}).items():
            if reason != "success":
                reasons[reason] = reasons.get(reason, 0) + int(n)
    totals["success_rate"] = totals["successes"] / totals["count"] if totals["count"] else 0.0
    totals["failures_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    totals["tars"] = sorted(Path(p).name for p in glob.glob(str(out / "*.tar")))
    totals["shard_seconds"] = round(duration, 3)
    return totals


def _check_distributor(name: str) -> None:
    import importlib.util

    if name != "multiprocessing" and importlib.util.find_spec(name) is None:
        extra = "spark" if name == "pyspark" else "ray"
        raise ConfigError(f"--distributor {name} needs the {name} package: pip install 'meissonic[{extra}]' (or "
                          f"pip install {name}); use --distributor multiprocessing on one machine")
    if name == "pyspark":
        _check_java()


# Oldest Java each pyspark major version runs on (Spark 4 dropped Java 8 and 11).
_JAVA_FOR_SPARK = {3: 8, 4: 17}


def java_version(java: str) -> int | None:
    """The major version `java -version` reports (8 for "1.8.0_392", 17 for "17.0.15"), None if unreadable."""
    import re
    import subprocess

    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _check_java() -> None:
    """Spark runs on the JVM: refuse before any work when no (new enough) `java` is there, saying what to install."""
    import shutil
    from importlib.metadata import PackageNotFoundError, version

    try:
        spark_version = version("pyspark")
    except PackageNotFoundError:
        spark_version = "?"
    major = int(spark_version.split(".")[0]) if spark_version[:1].isdigit() else 4
    needed = _JAVA_FOR_SPARK.get(major, 17)
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    install = (f"install Java {needed} or newer (Debian/Ubuntu: apt-get install openjdk-{max(needed, 17)}-jre-headless; "
               f"macOS: brew install openjdk@{max(needed, 17)}; conda: conda install -c conda-forge openjdk={max(needed, 17)})")
    if not java or not Path(java).is_file():
        where = f"JAVA_HOME={home} holds no bin/java" if home else "no `java` on PATH"
        raise ConfigError(f"--distributor pyspark runs on Java and found {where}: {install}, or use --distributor "
                          "multiprocessing")
    found = java_version(java)
    if found is None or found < needed:
        seen = f"Java {found}" if found else f"no version from `{java} -version`"
        raise ConfigError(f"--distributor pyspark (pyspark {spark_version}) needs Java {needed} or newer and found "
                          f"{seen} ({java}): {install}, and point JAVA_HOME at it")


def _check_reachable(address: str | None, what: str) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) nothing listens on: `ray.init` would retry for minutes."""
    import re
    import socket

    m = re.fullmatch(r"(?:[a-z]+://)?\[?([^\]/]+?)\]?:(\d+)/?", (address or "").strip())
    if not m:
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"{what} {address}: nothing answers there ({err.strerror or err}); start the cluster "
                          "(`ray start --head` on the head node) or fix the address") from None


def _first_line(err: BaseException) -> str:
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return line[:300]


@contextlib.contextmanager
def _distributed(cfg: DownloadConfig) -> Iterator[None]:
    """Start the Spark session or Ray instance img2dataset's distributor runs on, unless one is already active,
    and stop it afterwards (one that was already active is left as it was)."""
    if cfg.distributor == "pyspark":
        # Spark starts its Python workers with `python3` from PATH unless told otherwise, which may be
        # an interpreter without img2dataset (`No module named 'img2dataset'`): use this one. On a
        # cluster, set PYSPARK_PYTHON to the interpreter path on the workers.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        from pyspark import SparkContext
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        owned = spark is None
        launched = SparkContext._gateway is None  # this call starts the JVM
        if owned:
            master = cfg.spark_master or f"local[{cfg.processes}]"
            try:
                spark = (SparkSession.builder.appName("meissonic-download").master(master)
                         .config("spark.ui.showConsoleProgress", "false")
                         .getOrCreate())
            except Exception as err:  # py4j / pyspark raise their own types
                raise ConfigError(f"--distributor pyspark could not start Spark on {master} ({_first_line(err)}); "
                                  "check --spark-master and JAVA_HOME") from None
            spark.sparkContext.setLogLevel("ERROR")
        try:
            yield
        finally:
            if owned:
                spark.stop()
            if launched and SparkContext._gateway is not None:
                # The JVM ends with this download (end_with_parent): forget it, so a later call in
                # this process starts a new one instead of talking to a dead gateway.
                SparkContext._gateway.shutdown()
                SparkContext._gateway = SparkContext._jvm = None
    elif cfg.distributor == "ray":
        import ray

        owned = not ray.is_initialized()
        if owned:
            kw: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
            _check_reachable(address, "--ray-address / RAY_ADDRESS")
            try:
                if address:
                    ray.init(address=address, **kw)
                else:  # never join some other cluster on this machine by surprise
                    ray.init(address="local", num_cpus=cfg.processes, include_dashboard=False, **kw)
            except Exception as err:  # ConnectionError, RuntimeError, ray's own types
                where = f"the cluster at {address}" if address else "a local Ray instance"
                raise ConfigError(f"--distributor ray could not connect to {where} ({_first_line(err)}); check "
                                  "--ray-address / RAY_ADDRESS (start a cluster with `ray start --head`)") from None
        try:
            yield
        finally:
            if owned:
                ray.shutdown()
    else:
        yield


def download(cfg: DownloadConfig) -> DownloadResult:
    """Download the images of `cfg.inputs` into webdataset shards in `cfg.output` (resuming by default)."""
    cfg.validate()
    _check_distributor(cfg.distributor)
    files = resolve_inputs(cfg.inputs)
    out = Path(cfg.output)
    state = out / STATE_DIR
    manifest = state / "download.json"
    fingerprint = _fingerprint(files, cfg)
    columns = _inspect_inputs(files, cfg)
    saved = [SAVED_NAMES[r] for r in SAVED_NAMES if r in columns]

    check_output_parent(out, "--out")
    check_output_apart(out, cfg.inputs, files)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        if not manifest.is_file():
            raise OutputExistsError(f"{out} is not empty and holds no `meissonic download` state; choose another "
                                    "--out, or pass --overwrite to delete it and start over")
        previous = read_json_object(manifest, error=InputError, hint="move the folder away, or pass --overwrite to "
                                                                      "delete it and start over")
        if previous.get("fingerprint") != fingerprint:
            raise ConfigError(f"{out} was started with other inputs or image options; rerun with the same ones to "
                              "resume, or pass --overwrite to delete it and start over")

    # Stage (read and check) every input row beside the output first; only then replace an old output
    # (--overwrite) or add the staged input to the folder being resumed.
    stage = state / "input"
    refused: dict[str, int] = {}
    with staging_folder(out) as staging:
        rows, dropped, per_file = _stage_inputs(files, columns, staging / STATE_DIR / "input", cfg.url_schemes(),
                                                refused)
        if rows == 0 and refused:
            raise InputError(f"no row of the input has an allowed URL scheme ({', '.join(cfg.url_schemes())}); "
                             f"refused: {_counts_text(refused)}. Pass --allow-schemes NAME to fetch others on purpose")
        if cfg.overwrite and out.exists():
            replace_directory(staging, out)
        else:
            state.mkdir(parents=True, exist_ok=True)
            replace_directory(staging / STATE_DIR / "input", stage)
    expected_shards = sum(math.ceil(n / cfg.shard_size) for n in per_file)
    write_json(manifest, {"fingerprint": fingerprint, "columns": columns, "saved_columns": saved,
                           "rows": rows, "rows_without_url": dropped, "rows_refused_scheme": sum(refused.values()),
                           "refused_schemes": refused})

    # img2dataset imports wandb and albumentations: keep both off the network.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    import img2dataset

    start = time.perf_counter()
    # img2dataset installs a SIGINT handler that exits with status 0; put ours back afterwards and
    # turn its exit into an error, so an interrupted download never looks like a finished one.
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        # its pool workers (and a local Spark JVM or Ray instance) die with us, even on kill -9
        with end_with_parent(), _distributed(cfg):
            img2dataset.download(
                url_list=str(stage),
                output_folder=str(out),
                input_format="parquet",
                output_format="webdataset",
                url_col="url",
                caption_col="caption",
                save_additional_columns=saved or None,
                image_size=cfg.image_size,
                resize_mode=cfg.resize_mode,
                resize_only_if_bigger=cfg.resize_only_if_bigger,
                min_image_size=cfg.min_image_size,
                max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else math.inf,
                encode_format=cfg.encode_format,
                encode_quality=cfg.quality(),
                processes_count=cfg.processes,
                thread_count=cfg.threads,
                number_sample_per_shard=cfg.shard_size,
                distributor=cfg.distributor,
                timeout=cfg.timeout,
                retries=cfg.retries,
                incremental_mode="incremental",
                enable_wandb=False,
            )
    except SystemExit:
        raise MeissonicError(f"download interrupted; completed shards in {out} are kept, rerun the same "
                             "command to resume") from None
    except (OSError, ValueError) as err:
        raise InputError(f"img2dataset failed: {err}") from None
    except Exception as err:
        # Spark (py4j) and Ray wrap a worker's failure in their own exception types.
        if type(err).__module__.split(".")[0] not in ("py4j", "pyspark", "ray"):
            raise
        raise MeissonicError(f"--distributor {cfg.distributor} failed: {_first_line(err)}; completed shards in "
                             f"{out} are kept, rerun the same command to resume") from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    summary = summarize(out)
    summary.update({"rows": rows, "rows_without_url": dropped, "rows_refused_scheme": sum(refused.values()),
                    "refused_schemes": refused, "saved_columns": saved,
                    "expected_shards": expected_shards, "complete": summary["shards"] >= expected_shards,
                    "seconds": round(time.perf_counter() - start, 3)})
    write_json(state / "download_summary.json", summary)
    return DownloadResult(output=out, summary=summary)


def summary_table(summary: dict[str, Any]) -> "Any":
    """A rich table of a download summary."""
    from rich.table import Table

    table = Table(title="download", title_justify="left")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("rows in input", f"{summary.get('rows', summary['count']):,}")
    if summary.get("rows_refused_scheme"):
        table.add_row("[yellow]refused: URL scheme[/yellow] (" + _counts_text(summary.get("refused_schemes") or {})
                      + "; --allow-schemes)", f"{summary['rows_refused_scheme']:,}")
    table.add_row("shards complete", f"{summary['shards']:,}")
    table.add_row("samples tried", f"{summary['count']:,}")
    table.add_row("[green]downloaded[/green]", f"{summary['successes']:,} ({summary['success_rate']:.1%})")
    table.add_row("failed to download", f"{summary['failed_to_download']:,}")
    table.add_row("failed to resize / filtered", f"{summary['failed_to_resize']:,}")
    for reason, n in list(summary["failures_by_reason"].items())[:8]:
        table.add_row(f"  {reason[:70]}", f"{n:,}")
    return table
