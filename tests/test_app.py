"""`meissonic app` through its API with `gradio_client`: one server on 127.0.0.1 (a free port) per
module, over the tiny model; every image it makes is a PNG + sidecar under --out, as sample/edit write."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gradio_client = pytest.importorskip("gradio_client")  # the [app] extra; `dev` installs it, so CI runs these
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from meissonic_cli.sample.app import AppConfig, launch  # noqa: E402
from meissonic_cli.sample.sample import SampleConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: Path, out: Path, **sample: object) -> SimpleNamespace:
    """The app on 127.0.0.1 at a free port, not blocking; `.close()` stops it."""
    cfg = AppConfig(model=str(model), out=str(out), host="127.0.0.1", port=free_port(),
                    sample=SampleConfig(**{"device": "cpu", "steps": 2, "resolution": "32", **sample}))  # type: ignore[arg-type]
    blocks, state = launch(cfg, block=False, quiet=True)
    return SimpleNamespace(url=f"http://127.0.0.1:{cfg.port}/", out=Path(cfg.out).resolve(), blocks=blocks, state=state,
                           close=blocks.close)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    served = start_app(tiny_model_dir, tmp_path_factory.mktemp("app") / "out")
    served.client = Client(served.url, verbose=False)
    yield served
    served.close()
    torch.set_num_threads(threads)


def _sidecar(server, folder: str, meta: dict) -> dict:
    return json.loads((server.out / folder / meta["file"]).with_suffix(".json").read_text(encoding="utf-8"))


def _generate(client, prompt="a red circle", negative="", steps=2, guidance=9.0, seed=0, random_seed=False,
              resolution="32", images=1, order="confidence", schedule="", cache=0):
    return client.predict(prompt, negative, steps, guidance, seed, random_seed, resolution, images, order, schedule,
                          cache, api_name="/generate")


def _edit(client, image, mask=None, prompt="a blue square", mode="inpaint", box="", extend="", target="", strength=0.5,
          steps=2, guidance=9.0, seed=0, random_seed=False, negative="", layers=()):
    editor = {"background": handle_file(str(image)), "layers": [handle_file(str(p)) for p in layers], "composite": None}
    return client.predict(editor, handle_file(str(mask)) if mask else None, prompt, mode, box, extend, target, strength,
                          steps, guidance, seed, random_seed, negative, api_name="/edit")


def test_generate_writes_images_whose_sidecars_match_the_request(server) -> None:
    gallery, settings = _generate(server.client, "two blue squares", "blurry", steps=3, guidance=4.5, seed=11,
                                  resolution="32x32", images=2, order="halton", schedule="linear")
    assert len(gallery) == 2 and len(settings) == 2
    for k, (shown, meta) in enumerate(zip(gallery, settings)):
        saved = _sidecar(server, "generate", meta)
        assert saved == meta
        assert (saved["prompt"], saved["negative_prompt"], saved["steps"], saved["cfg"]) == ("two blue squares", "blurry",
                                                                                              3, 4.5)
        assert saved["seed"] == 11 + k and saved["resolution"] == "32x32" and "halton" in saved["sampler"]
        assert "linear" in saved["sampler"] and saved["model"] == str(server.state.pipeline.model_path)
        png = server.out / "generate" / saved["file"]
        assert np.array_equal(np.asarray(Image.open(shown["image"])), np.asarray(Image.open(png)))
        assert shown["caption"] == f"seed {11 + k} · 3 steps · guidance 4.5 · 32x32"
    # Same request with a random seed: new file names, the drawn seed recorded.
    _, again = _generate(server.client, "two blue squares", seed=11, random_seed=True)
    assert again[0]["file"] not in {m["file"] for m in settings} and _sidecar(server, "generate", again[0]) == again[0]


def test_edit_inpaint_with_a_mask_file_and_with_strokes(server, tmp_path: Path) -> None:
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    mask_pixels = np.zeros((32, 32), dtype=np.uint8)
    mask_pixels[:16, :16] = 255
    Image.fromarray(mask_pixels).save(mask)
    gallery, settings = _edit(server.client, image, mask, prompt="a cat", steps=3, seed=5)
    meta = _sidecar(server, "edit", settings[0])
    assert (meta["prompt"], meta["mode"], meta["steps"], meta["seed"]) == ("a cat", "inpaint", 3, 5)
    assert 0 < meta["masked_tokens"] < meta["total_tokens"]
    assert np.array_equal(np.asarray(Image.open(meta["mask"])), mask_pixels)
    assert np.array_equal(np.asarray(Image.open(meta["source"])), np.asarray(Image.open(image)))
    assert Path(meta["source"]).parent == server.out / "edit" / "inputs"
    assert np.array_equal(np.asarray(Image.open(gallery[0]["image"])), np.asarray(Image.open(server.out / "edit" / meta["file"])))

    # Strokes drawn in the editor (a layer, transparent where nothing is drawn) are the mask.
    stroke = np.zeros((32, 32, 4), dtype=np.uint8)
    stroke[16:, 16:] = (255, 255, 255, 255)
    Image.fromarray(stroke, "RGBA").save(tmp_path / "layer.png")
    _, drawn = _edit(server.client, image, prompt="a dog", layers=[tmp_path / "layer.png"])
    drawn_meta = _sidecar(server, "edit", drawn[0])
    assert np.array_equal(np.asarray(Image.open(drawn_meta["mask"])) > 0, stroke[..., 3] > 0)
    assert drawn_meta["masked_tokens"] == meta["masked_tokens"]  # the same area, the other corner

    _, out = _edit(server.client, image, prompt="wider", mode="outpaint", extend="16,0,0,0")
    outpainted = _sidecar(server, "edit", out[0])
    # 16 px asked, rounded up to whole tokens of the tiny model's even (2x2-compressed) grid: 32 px more.
    assert (outpainted["extend"], outpainted["width"], outpainted["height"]) == ([16, 0, 0, 0], 64, 32)
    _, free = _edit(server.client, image, prompt="redone", mode="edit", strength=1.0)
    assert _sidecar(server, "edit", free[0])["masked_tokens"] == _sidecar(server, "edit", free[0])["total_tokens"]


def test_two_concurrent_calls_both_succeed(server) -> None:
    jobs = [server.client.submit("concurrent one", "", 2, 9.0, 1, False, "32", 1, "confidence", "", 0, api_name="/generate"),
            server.client.submit("concurrent two", "", 2, 9.0, 2, False, "32", 1, "confidence", "", 0, api_name="/generate")]
    results = [job.result(timeout=300) for job in jobs]
    metas = [settings[0] for _, settings in results]
    assert [m["prompt"] for m in metas] == ["concurrent one", "concurrent two"]
    assert metas[0]["file"] != metas[1]["file"]
    assert all(_sidecar(server, "generate", m) == m for m in metas)


def test_bad_requests_return_a_message_and_the_server_stays_up(server, tmp_path: Path) -> None:
    with pytest.raises(AppError, match="Steps: Value 0 is less than minimum value 1"):
        _generate(server.client, steps=0)
    with pytest.raises(AppError, match="the prompt is empty"):
        _generate(server.client, prompt="   ")
    with pytest.raises(AppError, match="resolution"):
        _generate(server.client, resolution="33")
    fake = tmp_path / "not-an-image.png"
    fake.write_text("this is text, not a PNG")
    with pytest.raises(AppError, match="not an image that can be read") as err:
        _edit(server.client, fake, box="0,0,8,8")
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(image)
    with pytest.raises(AppError, match="inpaint needs the area to repaint"):
        _edit(server.client, image)
    with pytest.raises(AppError, match="Mode"):
        _edit(server.client, image, mode="../../escape", box="0,0,8,8")
    assert not list(server.out.parent.glob("**/*escape*"))
    _, settings = _generate(server.client, prompt="still serving")
    assert _sidecar(server, "generate", settings[0])["prompt"] == "still serving"


def test_command_refuses_bad_flags_in_one_line_before_loading(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from meissonic_cli.cli import app

    for args, message in [(["--port", "0"], "--port must be between 1 and 65535"),
                          (["--max-images", "0"], "--max-images must be between 1 and 64"),
                          (["--steps", "0"], "--steps must be >= 1")]:
        res = CliRunner().invoke(app, ["app", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), *args])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 1 and lines[-1].startswith("Error: ") and message in lines[-1], res.output
    res = CliRunner().invoke(app, ["app", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "model folder not found" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
