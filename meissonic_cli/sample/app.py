"""`meissonic app`: a Gradio page (and API) over one loaded model, for text to image and editing.

The model loads once, through `sample.load_pipeline` (the loading path of `meissonic sample`, so
every model setting of the sampler options reaches the app too). Each request then runs through the
library functions of the commands, `run_sample` and `run_edit`, with that pipeline: every image is
saved the way `sample` and `edit` save it (PNG + JSON sidecar) under `OUT/generate` and `OUT/edit`
(uploaded inputs and drawn masks in `OUT/edit/inputs`, which the edit sidecars point at), so
`meissonic eval --images OUT/generate` scores an app session. Requests are numbered on from what
the folders already hold: names never collide, and a restart continues the numbering.

Named endpoints `generate` and `edit` serve `gradio_client`; the queue runs one request at a time
(one model on one device) and holds the others; a bad input is a message in the page (`gr.Error`),
never a traceback. Gradio is the `[app]` extra, imported only when the app is built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from meissonic_cli.config import Problems, field
from meissonic_cli.errors import InputError, MeissonicError
from meissonic_cli.safety import MAX_SEED
from meissonic_cli.sample.sample import SampleConfig, load_pipeline, run_sample, slugify

GENERATE_DIR, EDIT_DIR, INPUTS_DIR = "generate", "edit", "inputs"
_NUMBERED = re.compile(r"^(\d{5,})-")
INSTALL_HINT = "the app needs Gradio: pip install 'meissonic[app]'"


@dataclass
class AppConfig:
    model: str = field("", help="Model folder in the released layout, or a Hugging Face repo id already in the local "
                                "cache (as for `sample`); loaded once when the app starts.", short="-m")
    out: str = field("app-outputs", help="Folder for every image the app makes: generate/ and edit/ hold PNG + JSON "
                                         "sidecars as `sample` and `edit` write them (score them with `meissonic eval "
                                         "--images OUT/generate`).", short="-o")
    host: str = field("127.0.0.1", help="Address to serve on: 127.0.0.1 is this machine only; 0.0.0.0 opens the app "
                                        "to the network.")
    port: int = field(7860, help="Port to serve on.")
    share: bool = field(False, help="Also open a public *.gradio.live link to the app (off unless asked).")
    max_images: int = field(4, help="Most images per prompt one request may ask for.")
    queue_size: int = field(16, help="Requests that may wait in the queue (one runs at a time).")
    sample: SampleConfig = field(default_factory=SampleConfig, help="Model settings and the sampler defaults the "
                                                                    "page starts with.")

    def validate(self) -> "AppConfig":
        p = Problems()
        p.check(bool(self.model), "--model is required (a released-layout model folder)")
        p.check(1 <= self.port <= 65535, f"--port must be between 1 and 65535, got {self.port}")
        p.check(1 <= self.max_images <= 64, f"--max-images must be between 1 and 64, got {self.max_images}")
        p.check(1 <= self.queue_size <= 10_000, f"--queue-size must be between 1 and 10000, got {self.queue_size}")
        p.check(bool(self.host.strip()), "--host must not be empty")
        self.sample.model = self.model
        try:
            self.sample.apply_preset()
        except InputError as err:
            p.check(False, str(err))
        self.sample.check_schedule(p)
        p.raise_if_any()
        return self


def _import_gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return gradio


def _whole(value: Any, what: str, low: int, high: int) -> int:
    """`value` (a number from the page or the API) as an int in [low, high], or InputError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise InputError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return number


def _text(value: Any) -> Optional[str]:
    """A text box's value, None when empty."""
    text = "" if value is None else str(value).strip()
    return text or None


def caption(meta: dict[str, Any]) -> str:
    """The gallery caption of an image: its settings, from its sidecar."""
    parts = [f"seed {meta.get('seed')}", f"{meta.get('steps')} steps", f"guidance {meta.get('cfg')}",
             str(meta.get("resolution"))]
    if meta.get("mode"):
        parts.insert(0, str(meta["mode"]))
    return " · ".join(parts)


class MeissonicApp:
    """The loaded model, the output folders and the two request handlers (`generate`, `edit`)."""

    def __init__(self, cfg: AppConfig, pipeline: Any = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser().resolve()
        from meissonic_cli.sample.outputs import check_output_folder, make_output_folder

        check_output_folder(self.out)
        self.pipeline = pipeline if pipeline is not None else load_pipeline(cfg.sample)
        for sub in (GENERATE_DIR, EDIT_DIR, f"{EDIT_DIR}/{INPUTS_DIR}"):  # only once the model has loaded
            make_output_folder(self.out / sub)
        size = cfg.sample.resolution or str(self.pipeline.default_resolution)
        self.default_resolution = size
        self._lock = threading.Lock()
        self._next = {kind: self._first_free(self.out / kind) for kind in (GENERATE_DIR, EDIT_DIR)}

    @staticmethod
    def _first_free(folder: Path) -> int:
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
        return max(numbers, default=-1) + 1

    def _reserve(self, kind: str, count: int) -> int:
        """The first of `count` fresh numbers for outputs in OUT/kind."""
        with self._lock:
            first = max(self._next[kind], self._first_free(self.out / kind))
            self._next[kind] = first + count
        return first

    @staticmethod
    def _seed(seed: Any, random_seed: Any, count: int) -> int:
        if random_seed:
            return random.randint(0, min(MAX_SEED - count, 2**31 - 1))
        return _whole(seed, "seed", 0, MAX_SEED - count + 1)

    def _progress(self, progress: Any) -> Optional[Callable[[int, int], None]]:
        if progress is None:
            return None
        return lambda step, total: progress((step, total), desc="steps", unit="steps")

    def generate(self, prompt: str, negative_prompt: str = "", steps: Any = 12, guidance: Any = 9.0, seed: Any = 0,
                 random_seed: bool = False, resolution: Any = "", images: Any = 1, order: str = "confidence",
                 schedule: Any = "", cache_refresh: Any = 0, progress: Any = None) -> tuple[list, list]:
        """Text to image: (gallery [(png, caption)], the sidecars) of the images written to OUT/generate."""
        if not _text(prompt):
            raise InputError("the prompt is empty; describe the image to make")
        count = _whole(images, "images per prompt", 1, self.cfg.max_images)
        cfg = dataclasses.replace(
            self.cfg.sample, prompt=[str(prompt)], prompts=None, prompts_format=None, negative_prompt=str(negative_prompt or ""),
            steps=_whole(steps, "steps", 1, 1000), cfg=_number(guidance, "guidance"),
            seed=self._seed(seed, random_seed, count), resolution=_text(resolution) or self.default_resolution,
            images_per_prompt=count, order=str(order or "confidence"), schedule=_text(schedule),
            cache_refresh=_whole(cache_refresh or 0, "cache refresh", 0, 1000), out=str(self.out / GENERATE_DIR),
            grid=False, overwrite=False, first_index=self._reserve(GENERATE_DIR, count))
        result = run_sample(cfg, progress=False, pipeline=self.pipeline, on_step=self._progress(progress))
        return self._gallery(result.written)

    def edit(self, image: Any, mask: Any = None, prompt: str = "", mode: str = "inpaint", box: Any = "",
             extend: Any = "", target: Any = "", strength: Any = 0.5, steps: Any = 12, guidance: Any = 9.0,
             seed: Any = 0, random_seed: bool = False, negative_prompt: str = "",
             progress: Any = None) -> tuple[list, list]:
        """Inpaint / outpaint / mask-free edit of an uploaded image: (gallery, sidecars) as `generate`.

        `image`: the editor's value ({"background", "layers", ...}: strokes drawn on the layers mark the
        area to repaint) or an image; `mask`: an uploaded mask file (white = repaint), which wins over strokes.
        """
        from meissonic_cli.sample.edit import MODES, EditConfig, run_edit

        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        background, layers = self._editor_images(image)
        if not _text(prompt):
            raise InputError("the prompt is empty; describe what the edited image should show")
        sample = dataclasses.replace(
            self.cfg.sample, steps=_whole(steps, "steps", 1, 1000), cfg=_number(guidance, "guidance"),
            seed=self._seed(seed, random_seed, 1), negative_prompt=str(negative_prompt or ""), order="confidence",
            schedule=None, noise_reg=0.0, differential=0.0, cache_refresh=0, prompt=[], prompts=None)
        strength = _number(strength, "strength")
        mask_image = self._mask(mask, layers, background.size) if mode == "inpaint" else None
        if mode == "inpaint" and mask_image is None and not _text(box):
            raise InputError("inpaint needs the area to repaint: draw on the image, upload a mask, or give a box")
        # Checked: now the inputs are kept beside the outputs (the sidecars point at them, for `eval`).
        number = self._reserve(EDIT_DIR, 1)
        name = f"{number:05d}-{mode}-{slugify(str(prompt))}"
        inputs = self.out / EDIT_DIR / INPUTS_DIR
        image_path, mask_path = inputs / f"{name}-image.png", inputs / f"{name}-mask.png"
        self._save_png(background.convert("RGB"), image_path)
        if mask_image is not None:
            self._save_png(mask_image, mask_path)
        cfg = EditConfig(model=self.cfg.model, image=str(image_path), prompt=str(prompt), mode=str(mode),
                         mask=str(mask_path) if mask_image is not None else None,
                         box=_text(box) if mask_image is None else None,
                         extend=_text(extend), target=_text(target), strength=strength,
                         out=str(self.out / EDIT_DIR), name=name, sample=sample)
        notes: list[str] = []
        result = run_edit(cfg, progress=False, pipeline=self.pipeline, notify=notes.append,
                          on_step=self._progress(progress))
        gallery, sidecars = self._gallery(result.written)
        for meta in sidecars:
            meta["notes"] = notes
        return gallery, sidecars

    @staticmethod
    def _editor_images(value: Any) -> tuple[Any, list]:
        """(background image, drawn layers) of an ImageEditor value, or of a plain image."""
        from PIL import Image

        if isinstance(value, dict):
            background, layers = value.get("background"), list(value.get("layers") or [])
        else:
            background, layers = value, []
        if isinstance(background, (str, Path)):
            from meissonic_cli.sample.edit import load_image

            background = load_image(Path(background))
        if not isinstance(background, Image.Image):
            raise InputError("upload an image to edit")
        return background, [layer for layer in layers if isinstance(layer, Image.Image)]

    @staticmethod
    def _mask(mask: Any, layers: list, size: tuple[int, int]) -> Any:
        """The mask (a grey PIL image, white = repaint): the uploaded one, else the strokes drawn (white
        where any layer is not transparent); None when neither marks anything."""
        import numpy as np
        from PIL import Image

        if _text(mask) if isinstance(mask, str) else mask is not None:
            from meissonic_cli.sample.edit import load_image

            picture = load_image(Path(mask)) if isinstance(mask, (str, Path)) else mask
            return picture.convert("L")
        drawn = np.zeros((size[1], size[0]), dtype=bool)
        for layer in layers:
            alpha = np.asarray(layer.convert("RGBA").resize(size, Image.NEAREST))[..., 3]
            drawn |= alpha > 0
        return Image.fromarray(np.where(drawn, 255, 0).astype(np.uint8), "L") if drawn.any() else None

    @staticmethod
    def _save_png(image: Any, path: Path) -> None:
        from meissonic_cli.atomic import atomic_write

        atomic_write(path, lambda p: image.save(p, format="PNG"))

    @staticmethod
    def _gallery(written: list[Path]) -> tuple[list, list]:
        sidecars = [json.loads(p.with_suffix(".json").read_text(encoding="utf-8")) for p in written]
        return [(str(p), caption(meta)) for p, meta in zip(written, sidecars)], sidecars


def _as_message(func: Callable[..., Any]) -> Callable[..., Any]:
    """A handler whose every failure reaches the page as one message (gr.Error), never a traceback, and
    whose `progress` parameter defaults to gr.Progress() (Gradio then passes its progress tracker)."""
    import inspect

    gr = _import_gradio()

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except gr.Error:
            raise
        except MeissonicError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # an unexpected failure: one line here and in the page
            message = f"{type(err).__name__}: {' '.join(str(err).split()) or 'unexpected error'}"
            print(f"Error: {message}", file=sys.stderr)
            raise gr.Error(message, print_exception=False) from None

    signature = inspect.signature(func)
    wrapper.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
        param.replace(default=gr.Progress()) if name == "progress" else param
        for name, param in signature.parameters.items()])
    return wrapper


def _checked(component: Any) -> Any:
    """`component` whose input errors are one line naming it: Gradio's own range checks (a slider given
    0 where 1 is the minimum) and an upload that is not an image. Gradio would otherwise answer with a
    message that does not say which input, or a multi-line processing error, and log a traceback."""
    gr = _import_gradio()
    preprocess, label = component.preprocess, component.label or "input"

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error as err:
            raise gr.Error(f"{label}: {err.message}", print_exception=False) from None
        except Exception as err:
            raise gr.Error(f"{label}: the upload is not an image that can be read ({type(err).__name__}); upload a "
                           f"PNG, JPEG or WebP file", print_exception=False) from None

    component.preprocess = checked
    return component


def _steps_and_seed(gr: Any, s: SampleConfig) -> tuple[Any, Any, Any, Any]:
    """The rows both tabs share: steps and guidance scale, then seed and the random-seed box."""
    with gr.Row():
        steps = gr.Slider(1, 100, value=s.steps, step=1, label="Steps")
        guidance = gr.Slider(0, 20, value=s.cfg, step=0.5, label="Guidance scale")
    with gr.Row():
        seed = gr.Number(value=s.seed, precision=0, label="Seed")
        random_seed = gr.Checkbox(value=False, label="Random seed")
    return steps, guidance, seed, random_seed


def build_app(app: MeissonicApp) -> Any:
    """The Gradio Blocks of the page: a Text to image tab and an Edit tab, with named API endpoints."""
    gr = _import_gradio()
    from meissonic_cli.sample.edit import MODES
    from meissonic_cli.sample.samplers import ORDERS, SCHEDULES

    s = app.cfg.sample
    with gr.Blocks(title="Meissonic") as blocks:
        gr.Markdown(f"### Meissonic · `{app.pipeline.model_path or app.cfg.model}`\nEvery image is saved with its "
                    f"sidecar under `{app.out}`.")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", value=s.negative_prompt)
                    steps, guidance, seed, random_seed = _steps_and_seed(gr, s)
                    with gr.Row():
                        resolution = gr.Textbox(value=app.default_resolution, label="Resolution (N or WxH)")
                        images = gr.Slider(1, app.cfg.max_images, value=1, step=1, label="Images per prompt")
                    with gr.Accordion("Sampler", open=False):
                        order = gr.Dropdown(list(ORDERS), value=s.order, label="Reveal order")
                        schedule = gr.Dropdown([""] + list(SCHEDULES), value=s.schedule or "",
                                               label="Masking schedule (empty: the model's)")
                        cache = gr.Slider(0, 16, value=s.cache_refresh, step=1, label="Feature cache: full pass every N "
                                                                                       "steps (0 = off)")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2, show_label=True)
                    settings = gr.JSON(label="Settings (sidecars)")
            inputs = [prompt, negative, steps, guidance, seed, random_seed, resolution, images, order, schedule, cache]
            run.click(_as_message(app.generate), [_checked(c) for c in inputs], [gallery, settings], api_name="generate")
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.ImageEditor(label="Image (paint over the area to repaint)", type="pil",
                                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                    mask = gr.Image(label="Or upload a mask (white = repaint)", type="filepath")
                    edit_prompt = gr.Textbox(label="Prompt (the whole edited image)", lines=2)
                    mode = gr.Radio(list(MODES), value="inpaint", label="Mode")
                    with gr.Row():
                        box = gr.Textbox(label="Inpaint box x0,y0,x1,y1 (instead of a mask)")
                        extend = gr.Textbox(label="Outpaint: extend left,top,right,bottom")
                        target = gr.Textbox(label="Outpaint: canvas WxH")
                    strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Strength (mask-free edit)")
                    edit_steps, edit_guidance, edit_seed, edit_random = _steps_and_seed(gr, s)
                    edit_negative = gr.Textbox(label="Negative prompt", value=s.negative_prompt)
                    run_edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                with gr.Column():
                    edit_gallery = gr.Gallery(label="Edited", elem_id="edit-gallery", columns=2)
                    edit_settings = gr.JSON(label="Settings (sidecars)")
            inputs = [source, mask, edit_prompt, mode, box, extend, target, strength, edit_steps, edit_guidance, edit_seed,
                      edit_random, edit_negative]
            run_edit_button.click(_as_message(app.edit), [_checked(c) for c in inputs], [edit_gallery, edit_settings],
                                  api_name="edit")
    blocks.queue(default_concurrency_limit=1, max_size=app.cfg.queue_size)
    return blocks


def launch(cfg: AppConfig, pipeline: Any = None, block: bool = True, quiet: bool = False) -> tuple[Any, MeissonicApp]:
    """Load the model, build the page and serve it on `cfg.host:cfg.port` (blocks unless `block=False`)."""
    _import_gradio()  # before the model loads: a missing extra is the first thing said
    app = MeissonicApp(cfg, pipeline)
    blocks = build_app(app)
    try:
        # Gradio's own start-up lines would advise `share=True` in `launch()`: say it in this tool's terms.
        blocks.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True, quiet=True,
                      allowed_paths=[str(app.out)], prevent_thread_lock=True, inbrowser=False)
    except OSError as err:
        raise InputError(f"cannot serve on {cfg.host}:{cfg.port} ({err}); pick another --port") from None
    if not quiet:
        public = f" and {blocks.share_url}" if getattr(blocks, "share_url", None) else ""
        print(f"Serving {app.pipeline.model_path or cfg.model} on {blocks.local_url}{public} (images in {app.out}); "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
    if block:
        blocks.block_thread()
    return blocks, app


__all__ = ["AppConfig", "MeissonicApp", "build_app", "caption", "launch"]
