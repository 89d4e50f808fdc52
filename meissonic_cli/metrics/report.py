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
    "clip_t": "CLIP-T (CLIPScore)",
    "clip_i": "CLIP-I",
    "clip_dir": "CLIP-dir",
    "l1": "L1",
    "hps": "HPS v2 (100 cos)",
    "dino": "DINO",
}
# Metrics whose set score is max(mean, 0) (torchmetrics' CLIPScore clamps the mean, not each image).
CLAMPED_MEAN = ("clip_t",)
# The CLIP that MagicBrush / EMU-Edit tables report CLIP-T and CLIP-I with.
EDIT_TABLE_CLIP = ("ViT-B-32", "ViT-B-32-quickgelu")
# HPS v2 benchmark prompt categories (paper Table 2: Animation, Concept-art, Painting, Photo).
HPS_CATEGORIES = ("anime", "concept-art", "paintings", "photo")


def open_rgb(path: Path) -> Any:
    """The image at `path` as RGB (upright, 8-bit by its real range: `meissonic_cli.imaging`), or an
    InputError naming the file."""
    from meissonic_cli.imaging import load_rgb8

    return load_rgb8(path, str(path))


def summarize_metrics(rows: Sequence[dict[str, Any]], labels: Optional[dict[str, str]] = None) -> dict[str, dict[str, Any]]:
    """Per metric: mean, std, n over the images that have it, and the mean per category.

    For `CLAMPED_MEAN` metrics the mean (overall and per category) is max(mean, 0), as torchmetrics'
    `CLIPScore.compute`; std is that of the rows. `labels` overrides `METRIC_LABELS` entries.
    """
    labels = {**METRIC_LABELS, **(labels or {})}
    out: dict[str, dict[str, Any]] = {}
    for key in METRIC_LABELS:
        values = [(r[key], r.get("category")) for r in rows if r.get(key) is not None]
        if not values:
            continue
        xs = [v for v, _ in values]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        floor = (lambda m: max(m, 0.0)) if key in CLAMPED_MEAN else (lambda m: m)
        by_category: dict[str, float] = {}
        for cat in sorted({c for _, c in values if c}, key=_category_order):
            cx = [v for v, c in values if c == cat]
            by_category[cat] = floor(sum(cx) / len(cx))
        out[key] = {"label": labels[key], "mean": floor(mean), "std": std, "n": len(xs), "by_category": by_category}
    return out


def conventions(cfg: Any, models: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What each number in this report equals and how it is scaled (README "Metric conventions")."""
    out: dict[str, dict[str, Any]] = {}
    if "clip" in cfg.suites:
        out["clip_t"] = {"equals": "torchmetrics CLIPScore", "scale": "100 x cos(image, prompt) per image",
                         "aggregate": "max(mean, 0)", "model": models.get("clip_model"), "context": "77 tokens, longer cut",
                         "edit_tables_model": "ViT-B-32 (MagicBrush, EMU-Edit)"}
    if "hps" in cfg.suites:
        out["hps"] = {"equals": f"hpsv2 v{cfg.hps_version} (benchmark score)", "scale": "100 x cos(image, prompt)",
                      "aggregate": "mean", "model": models.get("hps_model"),
                      "preprocess": "longest side to 224 (bicubic), zero-padded to square"}
    if "dino" in cfg.suites:
        out["dino"] = {"equals": "DINO CLS cosine (EMU-Edit / MagicBrush)", "scale": "cos in [-1, 1]",
                       "model": models.get("dino_model"), "preprocess": "short side 256 bicubic, centre crop 224"}
    return out


def run_warnings(report: dict[str, Any], models: dict[str, str]) -> list[str]:
    """One line per thing that makes a number here not comparable with a published one."""
    lines = list(report.get("fid", {}).get("warnings", []))
    if "clip_t" in report.get("metrics", {}) and models.get("clip_model") not in EDIT_TABLE_CLIP:
        lines.append(f"CLIP-T/CLIP-I use {models.get('clip_model')}; MagicBrush and EMU-Edit tables use ViT-B-32 "
                     f"(--clip-model ViT-B-32 with its checkpoint to compare with them)")
    for suite, count in report.get("truncated_prompts", {}).items():
        if count:
            lines.append(f"{count} prompt(s) longer than 77 tokens were cut for {suite.upper()} (as CLIP always does)")
    return lines


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
        table.add_row(f"FID ({fid['mode']})", _fmt(fid["value"], 3), "", str(fid["images"]), *([""] * len(categories)))
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
    for line in report.get("warnings", []):
        lines.append(f"- **Warning:** {line}")
    metrics = report.get("metrics", {})
    if metrics:
        lines += ["", "## Scores", "", "| metric | mean | std | n |", "|---|---:|---:|---:|"]
        lines += [f"| {m['label']} | {_fmt(m['mean'])} | {_fmt(m['std'])} | {m['n']} |" for m in metrics.values()]
        conv = report.get("conventions", {})
        if conv:
            lines += ["", "| metric | equals | scale | set score | model |", "|---|---|---|---|---|"]
            lines += [f"| {metrics[k]['label'] if k in metrics else k} | {c['equals']} | {c['scale']} | "
                      f"{c.get('aggregate', 'mean')} | {c.get('model')} |" for k, c in conv.items()]
        categories = sorted({c for m in metrics.values() for c in m["by_category"]}, key=_category_order)
        if categories:
            lines += ["", "## By category", "",
                      "| metric | " + " | ".join(categories) + " |", "|---|" + "---:|" * len(categories)]
            lines += [f"| {m['label']} | " + " | ".join(_fmt(m["by_category"].get(c)) for c in categories) + " |"
                      for m in metrics.values()]
    if "fid" in report:
        fid = report["fid"]
        ref = f"{fid['reference_images']} images in " if fid["reference_images"] else ""
        lines += ["", "## FID", "", f"FID = {_fmt(fid['value'], 3)} ({fid['images']} images against {ref}`{fid['reference']}`)",
                  "", f"- convention: {fid['convention']}; resize: {fid['resize']}",
                  f"- Inception weights: `{fid['inception']['weights']}` ({fid['inception']['digest']})"]
        for side, names in fid["excluded"].items():
            if names:
                lines.append(f"- not scored in the {side} folder: {', '.join(names[:20])}"
                             + (f" (+{len(names) - 20} more)" if len(names) > 20 else ""))
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


__all__ = ["CLAMPED_MEAN", "GRID_TILE", "HPS_CATEGORIES", "METRIC_LABELS", "conventions", "run_warnings", "open_rgb", "report_table", "summarize_metrics", "write_grid"]
