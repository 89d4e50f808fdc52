"""What a run reports: the progress line, train.log, metrics.jsonl and an optional tracker
(--report-to tensorboard|wandb) that gets the scalars and the validation grids.

Only rank 0 reports. Other ranks get a silent `RunLog` and the no-op tracker, so calling code never
checks the rank (nanochat's `print0` and `DummyWandb`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meissonic_cli.atomic import write_text
from meissonic_cli.errors import ConfigError
from meissonic_cli.progress import make_progress


# What a step and a run report (the trainer fills them, this module prints and logs them).
@dataclass
class StepStats:
    loss: float
    mask_rate: float
    grad_norm: float
    lr: float
    skipped: bool  # no weight update this step
    bad: bool  # counts towards --nan-patience
    token_stats: list[float] | None = None  # objective.masked_token_stats summed over micro-steps and ranks


@dataclass
class TrainResult:
    """What a finished `train` run reports."""

    output: Path
    start_step: int
    steps: int
    losses: dict[int, float]  # step -> loss (mean over ranks and micro-steps)
    last_checkpoint: Path | None
    skipped_steps: int
    reloads: int
    seconds: float
    tokens_per_second: float


class NullTracker:
    """The tracker when scalar logging is off: accepts everything, writes nothing."""

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def add_image(self, step: int, tag: str, path: Path, caption: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars under `train/<name>` in `<run>/tensorboard`; a resumed run purges the steps it redoes."""

    def __init__(self, folder: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder), purge_step=purge_step)

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in _finite(values).items():
            self._writer.add_scalar(f"train/{k}", v, step)

    def add_image(self, step: int, tag: str, path: Path, caption: str = "") -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self._writer.add_image(f"validation/{tag}", np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A wandb run: scalars under `train/`, images under `validation/`, both against `train/step`.

    wandb reads WANDB_MODE (offline, disabled, ...) and the other WANDB_* variables itself. Its files
    go under $WANDB_DIR when set, else into the run directory. `run_id` continues the same wandb
    run after a resume; using our own step as the x axis (not wandb's `_step`) lets a resumed run
    log again the steps it redoes.
    """

    def __init__(self, folder: Path, *, project: str, name: str, run_id: str, config: dict[str, Any]):
        import wandb

        root = Path(os.environ.get("WANDB_DIR") or folder)
        root.mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(root), config=config)
        except Exception as err:  # wandb raises its own types (no login, no network, bad settings)
            raise ConfigError(
                f"--report-to wandb could not start a run ({type(err).__name__}: {' '.join(str(err).split())[:240]}); "
                "log in with `wandb login`, or set WANDB_MODE=offline to write the run locally and `wandb sync` it later"
            ) from None
        self._run.define_metric("train/step", hidden=True)
        self._run.define_metric("train/*", step_metric="train/step")
        self._run.define_metric("validation/*", step_metric="train/step")

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log({"train/step": step, **{f"train/{k}": v for k, v in _finite(values).items()}})

    def add_image(self, step: int, tag: str, path: Path, caption: str = "") -> None:
        import wandb

        self._run.log({"train/step": step, f"validation/{tag}": wandb.Image(str(path), caption=caption or None)})

    def close(self) -> None:
        self._run.finish()


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


# What each --report-to needs installed, and the extra that brings it.
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "train")}


def print0(console: Any, text: str, *, enabled: bool) -> None:
    """Print `text` verbatim (no rich markup) when this is the reporting rank."""
    if enabled:
        console.print(text, markup=False, highlight=False)


class RunLog:
    """Rank 0's outputs: the progress line, train.log, metrics.jsonl and (optionally) a tracker.

    Other ranks get a silent instance, so calling code never checks the rank.
    """

    def __init__(self, out_dir: Path | None, *, enabled: bool, tensorboard: bool = False, report_to: str = "none",
                 wandb_project: str = "meissonic", curves: bool = False):
        self.enabled = enabled
        self.curves = curves
        self.out_dir = out_dir
        self.report_to = "tensorboard" if tensorboard and report_to == "none" else report_to
        self._deprecated_switch = tensorboard
        self.tensorboard = self.report_to == "tensorboard" and enabled
        self.wandb_project = wandb_project
        # The wandb run's id: new here, the checkpoint's on resume (the trainer sets it), saved in every checkpoint.
        self.run_id = secrets.token_hex(4) if self.report_to == "wandb" else ""
        self._metrics = None
        self.tracker: NullTracker | TensorBoardTracker | WandbTracker = NullTracker()
        self._progress = None
        self._task = None
        from rich.console import Console

        self.console = Console(stderr=True, quiet=not enabled)
        if self.report_to in _TRACKER_PACKAGES and enabled:
            package, extra = _TRACKER_PACKAGES[self.report_to]
            if importlib.util.find_spec(package) is None:
                flag = "--tensorboard" if tensorboard else f"--report-to {self.report_to}"
                raise ConfigError(f"{flag} needs the {package} package: pip install 'meissonic[{extra}]'")

    def open(self, keep_through_step: int, *, config: dict[str, Any] | None = None) -> None:
        """Start writing into the run directory; metrics after `keep_through_step` are dropped (a resumed run redoes them).

        `config` is what a wandb run records as its config.
        """
        if not self.enabled or self.out_dir is None:
            return
        if self._deprecated_switch:
            self.message("--tensorboard is deprecated: use --report-to tensorboard")
        # The tracker first: a wandb run that cannot start leaves no metrics.jsonl behind to block a rerun.
        if self.report_to == "tensorboard":
            self.tracker = TensorBoardTracker(self.out_dir / "tensorboard", purge_step=keep_through_step + 1)
        elif self.report_to == "wandb":
            self.tracker = WandbTracker(self.out_dir, project=self.wandb_project, name=self.out_dir.resolve().name,
                                        run_id=self.run_id, config=config or {})
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
            write_text(path, "".join(line + "\n" for line in kept))
        self._metrics = open(path, "a", encoding="utf-8")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        print0(self._progress.console if self._progress else self.console, text, enabled=True)
        if self.out_dir is not None:
            with open(self.out_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def record(self, values: dict[str, Any]) -> None:
        if self._metrics is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()

    def draw_curves(self) -> None:
        """curves.png beside metrics.jsonl (when enabled, on the reporting rank)."""
        if self.enabled and self.curves and self.out_dir is not None:
            from meissonic_cli.train.curves import write_run_curves

            write_run_curves(self.out_dir, say=self.message)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.tracker.add_scalars(step, values)

    def image(self, step: int, tag: str, path: Path, caption: str = "") -> None:
        self.tracker.add_image(step, tag, path, caption)

    def start_progress(self, start: int, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import TextColumn

        self._progress = make_progress(extra=[TextColumn("{task.fields[stats]}")], console=self.console)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=start, stats="")

    def progress(self, step: int, stats: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self.tracker.close()
        self.tracker = NullTracker()


def print_summary(console: Any, result: Any) -> None:
    """The one-screen table a finished run ends with (`result` is a TrainResult)."""
    from rich.table import Table

    table = Table(title="meissonic train", show_header=False)
    last = [v for k, v in sorted(result.losses.items())][-10:]
    table.add_row("steps", f"{result.start_step} -> {result.steps}")
    table.add_row("final loss (mean of last 10)", f"{sum(last) / len(last):.4f}" if last else "-")
    table.add_row("tokens/s", f"{result.tokens_per_second:,.0f}")
    table.add_row("skipped steps / reloads", f"{result.skipped_steps} / {result.reloads}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("last checkpoint", str(result.last_checkpoint or "-"))
    console.print(table)
