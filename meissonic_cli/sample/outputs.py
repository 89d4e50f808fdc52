"""What `sample` and `edit` share about their output folder: which model made a finished image, and
creating the folder with a clear error.

Each sidecar records `model` (the resolved folder), `model_digest` (`model.fingerprint`) and `lora`
(each --lora adapter's path, sha256 and scale); a rerun skips a finished image only when the model
and the adapters (digests and scales, in order) match this run's, so a folder never counts another
model's images as its own. Sidecars older than the digest are compared by folder; those older than
`lora` had no adapters.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from meissonic_cli.errors import InputError, OutputExistsError
from meissonic_cli.safety import MAX_RESOLUTION, check_resolution, check_seed, finite, safe_output_name


def model_identity(pipeline: Any, model: str, allow_download: bool = False, lora: Sequence[str] = ()) -> dict[str, Any]:
    """{'model': resolved folder (or the label of a given pipeline), 'model_digest': digest or None, 'lora':
    [{path, sha256, scale}] of the adapters `lora` names (a given pipeline's own adapters)}."""
    from meissonic_cli.model.fingerprint import model_fingerprint
    from meissonic_cli.model.lora_files import lora_record

    if pipeline is not None and lora:
        raise InputError("--lora loads adapters onto the model this command loads; a given pipeline brings its own "
                         "(MeissonicPipeline.from_pretrained(..., lora=...))")
    records = [a.record for a in getattr(pipeline, "loras", None) or []] if pipeline is not None else \
        [lora_record(spec) for spec in lora]
    if pipeline is not None:
        path = getattr(pipeline, "model_path", None)
        label = str(path or model)
        root = Path(path) if path else None
    else:
        from meissonic_cli.sample.pipeline import resolve_model_folder

        root = resolve_model_folder(model, allow_download=allow_download)
        check_not_adapter_only(root)
        label = str(Path(root).resolve())
    digest = model_fingerprint(root) if root is not None and Path(root).is_dir() else None
    return {"model": label, "model_digest": digest, "lora": records}


def check_not_adapter_only(root: Path) -> None:
    """A clear error for a LoRA training checkpoint that holds the adapter alone (no transformer/), naming the
    command that samples it: the base model recorded in its adapter_config.json plus --lora."""
    config = Path(root) / "lora" / "adapter_config.json"
    if (Path(root) / "transformer").exists() or not config.is_file():
        return
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or "BASE"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        base = "BASE"
    raise InputError(f"{root} holds a LoRA adapter alone (a checkpoint trained without --save-merged), not a model: "
                     f"sample it on its base model with --model {base} --lora {Path(root) / 'lora'}")


PNG_DIGEST = "png_sha256"  # the sidecar's record of its PNG's bytes


def write_output(png: Path, sidecar: Path, image: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `image` as `png` (marked as ours, atomically), then `sidecar` last: `meta` plus the PNG's
    sha256, which `done_problem` checks before a rerun skips the image. Returns the sidecar's content."""
    import hashlib
    import io

    from meissonic_cli.atomic import write_bytes, write_json

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_mark(meta))
    data = buf.getvalue()
    write_bytes(png, data)
    meta = {**meta, PNG_DIGEST: hashlib.sha256(data).hexdigest()}
    write_json(sidecar, meta)
    return meta


def done_problem(png: Path, sidecar: Path, model: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Why a finished-looking output (PNG and sidecar both present) is not done, None when it is: the
    sidecar must be our JSON object naming this PNG, record the model's digest when this run's model
    has one, and the PNG must match the recorded sha256 (older sidecars: decode to the recorded size)."""
    import hashlib

    from meissonic_cli.readers import read_json

    try:
        done = read_json(sidecar, "sidecar")
    except InputError as err:
        return str(err)
    if not (isinstance(done, dict) and done.get("file") == png.name):
        return f"{sidecar.name} is not the sidecar of {png.name}"
    if model is not None and model.get("model_digest") and not done.get("model_digest"):
        return f"{sidecar.name} does not record which model made {png.name}"
    data = png.read_bytes()
    if done.get(PNG_DIGEST):
        if hashlib.sha256(data).hexdigest() != done[PNG_DIGEST]:
            return f"{png.name} does not match the digest its sidecar records (damaged after it was written)"
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
    except Exception as err:  # noqa: BLE001 (any decoder error means the file is damaged)
        return f"{png.name} does not decode ({type(err).__name__})"
    if [done.get("width"), done.get("height")] != list(size) and "width" in done:
        return f"{png.name} is {size[0]}x{size[1]}, its sidecar records {done.get('width')}x{done.get('height')}"
    return None


def is_done(png: Path, sidecar: Path, model: Optional[dict[str, Any]] = None,
            notify: Optional[Any] = None) -> bool:
    """Whether the output `png` + `sidecar` is finished and intact (`done_problem`); a damaged one is
    reported through `notify` (one line) and counts as not done, so the run redoes it."""
    if not (png.is_file() and sidecar.is_file()):
        return False
    problem = done_problem(png, sidecar, model)
    if problem and notify is not None and is_ours(sidecar) and _names(sidecar, png):
        notify(f"Warning: {problem}; redoing it")  # (files we did not write are refused, not redone)
    return problem is None


def _names(sidecar: Path, png: Path) -> bool:
    try:
        return json.loads(sidecar.read_text(encoding="utf-8")).get("file") == png.name
    except Exception:  # unreadable: it names nothing
        return False


def read_done_sidecar(path: Path) -> dict[str, Any]:
    """The JSON object of a finished output's sidecar, or an OutputExistsError saying it cannot be read."""
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        done = None
    if not isinstance(done, dict):
        raise OutputExistsError(f"{path} exists but is not a readable sidecar; move it away or use another --out")
    return done


def other_model(done: dict[str, Any], model: Optional[dict[str, Any]]) -> list[str]:
    """['model'] when the finished sidecar `done` was written by another model than `model`, ['lora'] when
    with other adapters (digest and scale, in order; no record = none), both, or []."""
    if model is None:
        return []
    differ = []
    if done.get("model_digest") and model.get("model_digest"):
        differ += ["model"] if done["model_digest"] != model["model_digest"] else []
    elif done.get("model") and model.get("model"):
        differ += ["model"] if str(done["model"]) != str(model["model"]) else []
    theirs = done.get("lora") or []
    theirs = [(r.get("sha256"), r.get("scale")) for r in theirs] if isinstance(theirs, list) and all(
        isinstance(r, dict) for r in theirs) else None
    if theirs != [(r["sha256"], r["scale"]) for r in model.get("lora") or []]:
        differ.append("lora")
    return differ


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """`out` can be a folder: neither it nor a parent is an existing file."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"{flag} {out}: {parent} is a file, not a folder; give another {flag}")
            return


def make_output_folder(out: Path, flag: str = "--out") -> None:
    """Create `out` (and its parents), or one clear error (read-only file system, a parent that is a file)."""
    check_output_folder(out, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create {flag} {out}: {err.strerror or err}") from None


MARK_KEY = "meissonic"


def png_mark(meta: dict[str, Any]) -> Any:
    """PNG text chunk that marks an image as written by `sample`/`edit` (with its sidecar's content)."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(MARK_KEY, json.dumps(meta, ensure_ascii=True, default=str))
    return info


def is_ours(path: Path) -> bool:
    """Whether `path` is an output this command wrote: a PNG with our mark, or a sidecar JSON object
    with the fields `sample`/`edit` write."""
    import json

    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            try:
                with Image.open(path) as im:
                    return MARK_KEY in getattr(im, "text", {})
            except Exception:  # a damaged PNG is ours when our sidecar beside it names it
                side = path.with_suffix(".json")
                data = json.loads(side.read_text(encoding="utf-8"))
                return isinstance(data, dict) and data.get("file") == path.name and "seed" in data
        data = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(data, dict) and "file" in data and "seed" in data
    except Exception:  # unreadable: not ours, whatever went wrong
        return False


def check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing `path` this command did not write (unless `overwrite`): an
    unfinished output of ours (image without sidecar after a kill) is redone, anything else is kept."""
    if path.exists() and not overwrite and not is_ours(path):
        raise OutputExistsError(f"{path} exists and was not written by this command; pass --overwrite to replace it "
                                "or use another --out")


def write_grid(path: Path, grid: Any, overwrite: bool) -> None:
    """Write the PIL image `grid` as `path`, refusing to change an existing file unless `overwrite`."""
    import io

    from meissonic_cli.atomic import write_bytes

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    data = buf.getvalue()
    if path.exists() and not overwrite:
        if path.read_bytes() == data:
            return
        raise OutputExistsError(f"{path} exists and differs from this run's grid; pass --overwrite to replace it or "
                                "use another --out")
    write_bytes(path, data)


def check_case_limits(case: Any, at: str = "") -> None:
    """What keeps a case's output inside --out and its numbers usable: a plain output name, finite
    strength/cfg, a seed the generators take, sizes under the limits (see `meissonic_cli.safety`)."""
    if case.name is not None:
        safe_output_name(case.name, f"{at}'name'" if at else "--name")
    from meissonic_cli.config import check_number
    from meissonic_cli.sample.sample import SampleConfig

    finite(case.strength, f"{at}strength" if at else "--strength")
    check_number(case.cfg, f"{at}cfg" if at else "--guidance-scale", SampleConfig, "cfg")
    check_number(case.steps, f"{at}steps" if at else "--steps", SampleConfig, "steps")
    check_seed(case.seed, f"{at}seed" if at else "--seed")
    for flag, size in (("--resolution", case.resolution), ("--target", case.target)):
        if size is not None:
            check_resolution(size[0], size[1], f"{at}{flag}")
    if case.extend is not None and max(case.extend) > MAX_RESOLUTION:
        raise InputError(f"{at}--extend values must be at most {MAX_RESOLUTION} pixels")
    if case.box is not None and max(abs(v) for v in case.box) > 10 * MAX_RESOLUTION:
        raise InputError(f"{at}--box {','.join(map(str, case.box))} lies far outside any image")


__all__ = ["done_problem", "is_done", "write_output", "check_case_limits", "check_output_folder", "check_replaceable", "is_ours", "png_mark", "write_grid", "make_output_folder", "model_identity", "other_model"]
