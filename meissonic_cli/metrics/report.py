"""`meissonic eval`'s reports: per-metric summaries, the console table, report.md and the grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from meissonic_cli.atomic import atomic_write

if TYPE_CHECKING:
    from rich.table import Table

    from meissonic_cli.metrics.evaluate import EvalItem

GRID_TILE = 256
# Per-image metrics in the order tables show them, with their labels.
METRIC_LABELS: dict[str, str] = {
    "clip_t": "CLIP-T (100 cos)",
    "clip_i": "CLIP-I",
    "clip_dir": "CLIP-dir",
    "l1": "L1",
    "hps": "HPS v2 (100 cos)",
    "dino": "DINO",
}
# HPS v2 benchmark prompt categories (paper Table 2: Animation, Concept-art, Painting, Photo).
HPS_CATEGORIES = ("anime", "concept-art", "paintings", "photo")


def open_rgb(path: Path) -> Any:
    """The image at `path` as RGB (upright, 8-bit by its real range: `meissonic_cli.imaging`), or an
    InputError naming the file."""
    from meissonic_cli.imaging import load_rgb8

    return load_rgb8(path, str(path))


def summarize_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric: mean, std, n over the images that have it, and the mean per category."""
    out: dict[str, dict[str, Any]] = {}
    for key in METRIC_LABELS:
        values = [(r[key], r.get("category")) for r in rows if r.get(key) is not None]
        if not values:
            continue
        xs = [v for v, _ in values]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        by_category: dict[str, float] = {}
        for cat in sorted({c for _, c in values if c}, key=_category_order):
            cx = [v for v, c in values if c == cat]
            by_category[cat] = sum(cx) / len(cx)
        out[key] = {"label": METRIC_LABELS[key], "mean": mean, "std": std, "n": len(xs), "by_category": by_category}
    return out


def _category_order(cat: str) -> tuple[int, str]:
    return (HPS_CATEGORIES.index(cat) if cat in HPS_CATEGORIES else len(HPS_CATEGORIES), cat)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report_table(report: dict[str, Any]) -> "Table":
    """The summary as a rich table: one row per metric, with per-category means as columns."""
    from rich.table import Table

    metrics = report.get("metrics", {})
    categories = sorted({c for m in metrics.values() for c in m["by_category"]}, key=_category_order)
    table = Table(title=f"meissonic eval: {report['count']} images ({', '.join(report['suites'])})")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("std", justify="right")
    table.add_column("n", justify="right")
    for cat in categories:
        table.add_column(cat, justify="right")
    for m in metrics.values():
        table.add_row(m["label"], _fmt(m["mean"]), _fmt(m["std"]), str(m["n"]),
                      *(_fmt(m["by_category"].get(c)) for c in categories))
    if "fid" in report:
        fid = report["fid"]
        table.add_row("FID", _fmt(fid["value"], 3), "", str(fid["images"]), *([""] * len(categories)))
    if "shapes" in report:
        s = report["shapes"]
        # n is left blank: each attribute is judged only on the prompts that state it (see the shapes table).
        for attr in ("color", "shape", "position", "count", "overall"):
            table.add_row(f"shapes {attr}", _fmt(s.get(attr), 3), "", "", *([""] * len(categories)))
    return table


def _markdown(report: dict[str, Any], grid_name: Optional[str]) -> str:
    lines = ["# meissonic eval", "",
             f"- images: `{report['images']}` ({report['count']})",
             f"- suites: {', '.join(report['suites'])}"]
    for key, value in report["settings"].get("weights", {}).items():
        lines.append(f"- {key} weights: `{value}`")
    metrics = report.get("metrics", {})
    if metrics:
        lines += ["", "## Scores", "", "| metric | mean | std | n |", "|---|---:|---:|---:|"]
        lines += [f"| {m['label']} | {_fmt(m['mean'])} | {_fmt(m['std'])} | {m['n']} |" for m in metrics.values()]
        categories = sorted({c for m in metrics.values() for c in m["by_category"]}, key=_category_order)
        if categories:
            lines += ["", "## By category", "",
                      "| metric | " + " | ".join(categories) + " |", "|---|" + "---:|" * len(categories)]
            lines += [f"| {m['label']} | " + " | ".join(_fmt(m["by_category"].get(c)) for c in categories) + " |"
                      for m in metrics.values()]
    if "fid" in report:
        fid = report["fid"]
        ref = f"{fid['reference_images']} images in " if fid["reference_images"] else ""
        lines += ["", "## FID", "", f"FID = {_fmt(fid['value'], 3)} ({fid['images']} images against {ref}`{fid['reference']}`)"]
    if "shapes" in report:
        s = report["shapes"]
        attrs = ("color", "shape", "position", "count", "overall")
        lines += ["", "## Shapes benchmark", "", "| row | images | " + " | ".join(attrs) + " |",
                  "|---|---:|" + "---:|" * len(attrs)]
        for cat, row in s["by_category"].items():
            lines.append(f"| {cat} | {row['images']} | " + " | ".join(_fmt(row.get(a), 3) for a in attrs) + " |")
        lines.append(f"| **all** | {s['images']} | " + " | ".join(_fmt(s.get(a), 3) for a in attrs) + " |")
        chance = s.get("chance") or {}
        lines.append("| chance | | " + " | ".join(_fmt(chance.get(a), 3) for a in attrs) + " |")
    if grid_name:
        lines += ["", "## Samples", "", f"![grid]({grid_name})"]
    return "\n".join(lines) + "\n"


def _grid_caption(row: dict[str, Any]) -> str:
    scores = " ".join(f"{k}={row[k]:.3g}" for k in METRIC_LABELS if isinstance(row.get(k), float))
    return f"{row.get('prompt') or row['file']}" + (f" [{scores}]" if scores else "")


def write_grid(items: Sequence[EvalItem], rows: Sequence[dict[str, Any]], path: Path, limit: int) -> Optional[Path]:
    """A grid of the first `limit` images (padded to squares) with prompts and scores; None when limit is 0."""
    from PIL import ImageOps

    from meissonic_cli.sample.sample import make_grid

    if limit <= 0 or not items:
        return None
    tiles = [ImageOps.pad(open_rgb(it.path), (GRID_TILE, GRID_TILE), color="white") for it in items[:limit]]
    grid = make_grid(tiles, [_grid_caption(r) for r in rows[:limit]])
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    return path


__all__ = ["GRID_TILE", "HPS_CATEGORIES", "METRIC_LABELS", "open_rgb", "report_table", "summarize_metrics", "write_grid"]
