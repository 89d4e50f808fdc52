"""Training curves: what metrics.jsonl reports beyond the loss, and `curves.png` drawn from it.

The masked-token loss depends on the masking rate (a sample with 90 % of its tokens masked has far
less context than one with 10 %), so a run's loss moves with the rates it happened to draw. Two
numbers that do not: the loss within mask-rate buckets, and the masked-token accuracy.

- Every row of metrics.jsonl has `acc_top1` / `acc_top5`: the share of masked tokens whose true
  code is the model's first / among its first five guesses, over that step's whole global batch.
- Every --log-every row adds, over the steps since the previous one (the logging window),
  `loss_mask_AA_BB` (the mean of per-sample losses of the samples whose mask rate is in
  [AA %, BB %); the last bucket includes 100 %) and `n_mask_AA_BB` (how many samples that was).
- `write_curves` draws loss (overall and per bucket), accuracy and learning rate against steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from meissonic_cli.atomic import atomic_write
from meissonic_cli.train.objective import MASK_RATE_BUCKETS, TOKEN_STATS_SIZE

CURVES_FILE = "curves.png"
MAX_POINTS = 2000  # per-step series are averaged into at most this many points


def token_accuracy(stats: list[float]) -> dict[str, float]:
    """acc_top1 / acc_top5 of one step from its `masked_token_stats` sums."""
    n = stats[0]
    return {"acc_top1": stats[1] / n if n else float("nan"), "acc_top5": stats[2] / n if n else float("nan")}


class MetricsWindow:
    """Sums over the logging window of the steps that updated the weights (non-finite ones are left out)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.sums = [0.0] * TOKEN_STATS_SIZE

    def add(self, loss: float, stats: list[float]) -> None:
        self.losses.append(loss)
        self.sums = [a + b for a, b in zip(self.sums, stats)]

    def step(self, loss: float, stats: list[float], *, bad: bool, close: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Account one step: returns what its metrics.jsonl row adds (accuracy; on a window's last step
        the buckets) and, when `close`, the window's summary (else {})."""
        if not bad:
            self.add(loss, stats)
        summary = self.pop() if close else {}
        return {**token_accuracy(stats), **bucket_fields(summary)}, summary

    def pop(self) -> dict[str, Any]:
        """The window's summary (keys as in metrics.jsonl, plus `loss` and `acc_*` window means); starts a new window."""
        s = self.sums
        out: dict[str, Any] = {"loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
                               **token_accuracy(s)}
        for i, name in enumerate(MASK_RATE_BUCKETS):
            total, count = s[3 + 2 * i], s[4 + 2 * i]
            out[f"loss_mask_{name}"] = total / count if count else float("nan")
            out[f"n_mask_{name}"] = int(count)
        self.reset()
        return out


def bucket_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The per-bucket part of a window summary (what a --log-every row of metrics.jsonl adds)."""
    return {k: v for k, v in summary.items() if k.startswith(("loss_mask_", "n_mask_"))}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl, one per step; a step written twice (redone after a reload) keeps its last row."""
    rows: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _thin(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Average consecutive points so at most MAX_POINTS remain (a long run's per-step series)."""
    if len(xs) <= MAX_POINTS:
        return xs, ys
    size = math.ceil(len(xs) / MAX_POINTS)
    out_x, out_y = [], []
    for i in range(0, len(xs), size):
        out_x.append(sum(xs[i:i + size]) / len(xs[i:i + size]))
        out_y.append(sum(ys[i:i + size]) / len(ys[i:i + size]))
    return out_x, out_y


def write_curves(metrics_path: Path, out_path: Path) -> Path:
    """Draw loss (overall and per mask-rate bucket), masked-token accuracy and learning rate against
    steps from `metrics_path` into the PNG `out_path` (written atomically)."""
    # The Agg canvas directly: no pyplot, so the process's global backend (a notebook's) is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.95, hspace=0.3, wspace=0.15)  # no layout pass: one draw
    ax = axes[0][0]
    ax.plot(*_thin(*_series(rows, "loss")), lw=0.8, label="loss (each step)")
    ax.set_title("loss over masked tokens")
    ax = axes[0][1]
    for name in MASK_RATE_BUCKETS:
        lo, hi = name.split("_")
        xs, ys = _series(rows, f"loss_mask_{name}")
        ax.plot(xs, ys, marker=".", lw=0.8, label=f"mask rate {int(lo) / 100:.2f}-{int(hi) / 100:.2f}")
    ax.set_title("loss by mask-rate bucket (per --log-every window)")
    ax = axes[1][0]
    for key in ("acc_top1", "acc_top5"):
        ax.plot(*_thin(*_series(rows, key)), lw=0.8, label=key.replace("acc_", "").replace("top", "top-"))
    ax.set_title("masked-token accuracy")
    ax = axes[1][1]
    ax.plot(*_thin(*_series(rows, "lr")), lw=0.8, label="lr")
    ax.set_title("learning rate")
    for ax in (a for row in axes for a in row):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png"))


_missing_matplotlib_said: set[str] = set()


def write_run_curves(run_dir: Path, say: Callable[[str], None]) -> None:
    """`curves.png` beside the run's metrics.jsonl; without matplotlib `say` gets one line per run
    and training goes on."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file() or str(run_dir) in _missing_matplotlib_said:
        return
    try:
        write_curves(metrics, Path(run_dir) / CURVES_FILE)
    except ImportError:
        _missing_matplotlib_said.add(str(run_dir))
        say(f"{CURVES_FILE} not drawn: matplotlib is not installed (pip install 'meissonic[train]')")
