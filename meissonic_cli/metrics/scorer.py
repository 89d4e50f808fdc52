"""`meissonic eval`'s scoring loop: one metric network at a time over the items, filling per-image rows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from meissonic_cli.metrics.report import open_rgb

if TYPE_CHECKING:
    from meissonic_cli.metrics.evaluate import EvalConfig, EvalItem, PluginSuite


def pixel_l1(image: Any, source: Any) -> float:
    """Mean absolute pixel difference in [0, 1]; the source is resized to the image's size first."""
    import numpy as np
    from PIL import Image

    if source.size != image.size:
        source = source.resize(image.size, Image.BICUBIC)
    a = np.asarray(image, dtype=np.float32) / 255.0
    b = np.asarray(source, dtype=np.float32) / 255.0
    return float(np.abs(a - b).mean())


class Scorer:
    """Runs the suites over the items, one metric network at a time, filling `rows`.

    `extra` collects what is not per image (FID, plug-in results, counts such as truncated prompts).
    """

    def __init__(self, cfg: "EvalConfig", items: Sequence["EvalItem"], weights: dict[str, Path], models: dict[str, str],
                 device: Any, progress: Any):
        self.cfg, self.items, self.weights, self.models = cfg, items, weights, models
        self.device, self.progress = device, progress
        self.rows: list[dict[str, Any]] = [{"file": it.path.name, "prompt": it.prompt, "category": it.category,
                                            **({"source": str(it.source)} if it.source else {})} for it in items]
        self.extra: dict[str, Any] = {}

    def _loop(self, label: str, fn: Callable[[Sequence["EvalItem"], list[dict[str, Any]]], None]) -> None:
        task = self.progress.add_task(label, total=len(self.items))
        for start in range(0, len(self.items), self.cfg.batch_size):
            batch = self.items[start:start + self.cfg.batch_size]
            fn(batch, self.rows[start:start + len(batch)])
            self.progress.advance(task, len(batch))

    def _task(self, label: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(label, total=total)
        return lambda n: self.progress.advance(task, n)

    @staticmethod
    def _free(*objects: Any) -> None:
        import torch

        del objects
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clip(self) -> None:
        from meissonic_cli.metrics.clip import clip_direction, cosine_rows, load_clip

        model = load_clip(self.models["clip_model"], self.weights["clip"], self.device, "open_clip")
        self.extra["clip_truncated"] = model.truncated(
            [p for it in self.items for p in (it.prompt, it.source_prompt) if p])

        def run(batch: Sequence["EvalItem"], rows: list[dict[str, Any]]) -> None:
            images = [open_rgb(it.path) for it in batch]
            img = model.image_features(images)
            txt = model.text_features([it.prompt or "" for it in batch])
            for row, cos in zip(rows, cosine_rows(img, txt)):
                row["clip_t"] = 100.0 * cos  # torchmetrics' per-sample score; the set's mean is clamped at 0
            edited = [k for k, it in enumerate(batch) if it.source is not None]
            if not edited:
                return
            sources = [open_rgb(batch[k].source) for k in edited]
            src = model.image_features(sources)
            for j, k in enumerate(edited):
                rows[k]["clip_i"] = cosine_rows(img[k:k + 1], src[j:j + 1])[0]
                rows[k]["l1"] = pixel_l1(images[k], sources[j])
            directed = [j for j, k in enumerate(edited) if batch[k].source_prompt]
            if directed:
                ks = [edited[j] for j in directed]
                src_txt = model.text_features([batch[k].source_prompt or "" for k in ks])
                values = clip_direction(img[ks], src[directed], txt[ks], src_txt)
                for k, value in zip(ks, values):
                    rows[k]["clip_dir"] = value

        self._loop("CLIP", run)
        self._free(model)

    def hps(self) -> None:
        from meissonic_cli.metrics.clip import cosine_rows
        from meissonic_cli.metrics.hps import load_hps

        version = self.cfg.hps_version
        model = load_hps(self.models["hps_model"], self.weights["hps"], version, self.device)
        self.extra["hps_truncated"] = model.truncated([it.prompt for it in self.items if it.prompt])

        def run(batch: Sequence["EvalItem"], rows: list[dict[str, Any]]) -> None:
            img = model.image_features([open_rgb(it.path) for it in batch])
            txt = model.text_features([it.prompt or "" for it in batch])
            for row, cos in zip(rows, cosine_rows(img, txt)):
                row["hps"] = 100.0 * cos

        self._loop(f"HPS v{version}", run)
        self._free(model)

    def dino(self) -> None:
        from meissonic_cli.metrics.clip import cosine_rows
        from meissonic_cli.metrics.dino import load_dino

        model = load_dino(self.models["dino_model"], self.weights["dino"], self.device)

        def run(batch: Sequence["EvalItem"], rows: list[dict[str, Any]]) -> None:
            a = model.features([open_rgb(it.path) for it in batch])
            b = model.features([open_rgb(it.source) for it in batch])  # type: ignore[arg-type]
            for row, cos in zip(rows, cosine_rows(a, b)):
                row["dino"] = cos

        self._loop("DINO", run)
        self._free(model)

    def fid(self, out: Path) -> None:
        from meissonic_cli.metrics.fid_suite import score_fid

        self.extra["fid"] = score_fid([it.path for it in self.items], Path(str(self.cfg.reference)),
                                      self.weights["inception"], mode=self.cfg.fid_mode, batch_size=self.cfg.batch_size,
                                      device=self.device, out=out, add_task=self._task)

    def plugin(self, suite: "PluginSuite") -> None:
        """A suite registered with `register_suite` (e.g. `shapes`, by `meissonic_cli.shapes.bench`)."""
        state = suite.start(self.items)

        def run(batch: Sequence["EvalItem"], rows: list[dict[str, Any]]) -> None:
            for it, row in zip(batch, rows):
                row.update(suite.score(state, it, open_rgb(it.path)))

        self._loop(suite.name, run)
        self.extra[suite.name] = suite.finish(state)


__all__ = ["Scorer", "pixel_l1"]
