"""`meissonic eval`: metric plumbing with tiny random-weight networks loaded through the real loaders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import meissonic_cli.shapes.bench  # noqa: F401  (registers the shapes suite)
from meissonic_cli.cli import app
from meissonic_cli.errors import ConfigError, InputError, ModelFormatError
from meissonic_cli.metrics.clip import load_clip
from meissonic_cli.metrics.evaluate import EvalConfig, load_items, read_eval_prompts, run_eval
from meissonic_cli.metrics.fid import FIDInception, feature_stats, fid_from_features, frechet_distance
from meissonic_cli.shapes import world as shapes

runner = CliRunner()

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_DINO = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny CLIP / HPS / DINO checkpoints in the formats the real files use."""
    import open_clip
    from timm.models.vision_transformer import VisionTransformer

    root = tmp_path_factory.mktemp("weights")
    (root / "tiny_clip.json").write_text(json.dumps(TINY_CLIP))
    (root / "tiny_dino.json").write_text(json.dumps(TINY_DINO))
    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**TINY_CLIP).state_dict(), root / "open_clip_pytorch_model.bin")
    # HPS v2 ships {"state_dict": ...}; a DDP-saved copy adds "module.".
    hps = {f"module.{k}": v.half() for k, v in open_clip.model.CLIP(**TINY_CLIP).state_dict().items()}
    torch.save({"state_dict": hps}, root / "HPS_v2_compressed.pt")
    torch.save(VisionTransformer(num_classes=0, **TINY_DINO).state_dict(), root / "dino_tiny.pth")
    return {"clip_model": root / "tiny_clip.json", "clip": root / "open_clip_pytorch_model.bin",
            "hps": root / "HPS_v2_compressed.pt", "dino_model": root / "tiny_dino.json", "dino": root / "dino_tiny.pth"}


def _image(colour: tuple[int, int, int], size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _write(folder: Path, name: str, image: Image.Image, **meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png")
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder / f"{name}.png"


@pytest.fixture()
def edits(tmp_path) -> Path:
    """Edit outputs: two whose source is the same image, one with a different source."""
    src, out = tmp_path / "src", tmp_path / "edits"
    src.mkdir()
    a, b = _image((200, 30, 30), seed=1), _image((30, 30, 200), seed=2)
    a.save(src / "a.png")
    b.save(src / "b.png")
    _write(out, "e0", a, prompt="a red square", category="photo", source=str(src / "a.png"))
    _write(out, "e1", b, prompt="a blue square", category="anime", source="../src/b.png", source_prompt="a red square")
    _write(out, "e2", _image((30, 200, 30), seed=3), prompt="a green square", category="photo",
           source=str(src / "a.png"), source_prompt="a red square")
    return out


def _cfg(images: Path, weights: dict[str, Path], suites: list[str], **kw) -> EvalConfig:
    return EvalConfig(suites=suites, images=str(images), out=str(images.parent / "report"), device="cpu",
                      clip_model=str(weights["clip_model"]), clip_checkpoint=str(weights["clip"]),
                      hps_model=str(weights["clip_model"]), hps_checkpoint=str(weights["hps"]),
                      dino_model=str(weights["dino_model"]), dino_checkpoint=str(weights["dino"]), batch_size=2, **kw)


def test_clip_hps_dino_on_edits(edits, weights):
    report = run_eval(_cfg(edits, weights, ["clip", "hps", "dino"]), progress=False)
    rows = {r["file"]: r for r in report["per_image"]}
    # Identical image and source: CLIP-I and DINO are 1 and L1 is 0 for any weights.
    for name in ("e0.png", "e1.png"):
        assert rows[name]["clip_i"] == pytest.approx(1.0, abs=1e-5)
        assert rows[name]["dino"] == pytest.approx(1.0, abs=1e-5)
        assert rows[name]["l1"] == 0.0
    assert rows["e2.png"]["clip_i"] < 0.9999 and rows["e2.png"]["l1"] > 0.1
    # CLIP-dir only where the sidecar names the source caption; e1's image equals its source -> zero direction.
    assert "clip_dir" not in rows["e0.png"] and "clip_dir" in rows["e2.png"]

    # HPS v2 = 100 x cos(image, prompt), checked against open_clip's own model on the same weights.
    import open_clip

    ref = open_clip.model.CLIP(**TINY_CLIP).eval()
    state = torch.load(weights["hps"])["state_dict"]
    ref.load_state_dict({k[len("module."):]: v.float() for k, v in state.items()})
    pre = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        img = ref.encode_image(pre(Image.open(edits / "e2.png").convert("RGB"))[None], normalize=True)
        txt = ref.encode_text(open_clip.tokenize(["a green square"]), normalize=True)
    assert rows["e2.png"]["hps"] == pytest.approx(100 * float((img * txt).sum()), abs=1e-3)

    metrics = report["metrics"]
    assert metrics["clip_t"]["n"] == 3 and metrics["clip_i"]["n"] == 3 and metrics["dino"]["n"] == 3
    assert metrics["hps"]["by_category"]["photo"] == pytest.approx((rows["e0.png"]["hps"] + rows["e2.png"]["hps"]) / 2)
    assert list(metrics["hps"]["by_category"]) == ["anime", "photo"]  # HPS v2 category order

    out = edits.parent / "report"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"]["clip_i"]["mean"] == pytest.approx(metrics["clip_i"]["mean"])
    md = (out / "report.md").read_text()
    assert "| CLIP-I |" in md and "## By category" in md and "![grid](grid.png)" in md
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 2 * 256


@pytest.mark.slow  # four Inception forwards at 299x299 on CPU
def test_inception_loader_and_fid_of_a_folder_with_itself(tmp_path):
    # Random weights saved the way pt_inception is (a plain state dict without num_batches_tracked).
    torch.manual_seed(0)
    with torch.device("meta"):
        net = FIDInception()
    net = net.to_empty(device="cpu")
    state = {}
    for k, v in net.net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            state[k] = torch.ones_like(v)
        elif k.endswith("running_mean") or k.endswith("bias"):
            state[k] = torch.zeros_like(v)
        elif v.dim() > 1:
            state[k] = torch.randn_like(v) / v[0].numel() ** 0.5
        else:
            state[k] = torch.ones_like(v)
    torch.save(state, tmp_path / "pt_inception.pth")
    images = tmp_path / "gen"
    for i in range(2):
        _write(images, f"g{i}", _image((60 * i + 40, 100, 160), seed=i), prompt="x")
    ref = tmp_path / "ref"
    shutil.copytree(images, ref)
    cfg = EvalConfig(suites=["fid"], images=str(images), out=str(tmp_path / "r"), reference=str(ref), device="cpu",
                     inception_checkpoint=str(tmp_path / "pt_inception.pth"), grid=0)
    report = run_eval(cfg, progress=False)
    assert report["fid"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert report["fid"]["reference_images"] == 2 and report["grid"] is None
    # A wrong file is named as such.
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ModelFormatError, match="not a FID Inception"):
        run_eval(EvalConfig(suites=["fid"], images=str(images), out=str(tmp_path / "r-bad"), reference=str(ref),
                            device="cpu", inception_checkpoint=str(tmp_path / "bad.pth")), progress=False)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 12))
    b = rng.normal(size=(7, 12)) @ rng.normal(size=(12, 12)) + 0.5
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    covmean = linalg.sqrtm(s1 @ s2)
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)  # the low-rank path
    big = rng.normal(size=(40, 3))
    assert fid_from_features(big, big * 2 + 1) == pytest.approx(frechet_distance(*feature_stats(big), *feature_stats(big * 2 + 1)))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InputError, match="at least 2"):
        fid_from_features(a[:1], b)


def test_missing_weights_name_metric_file_and_source(edits, tmp_path):
    result = runner.invoke(app, ["eval", "--suite", "clip,hps,dino,fid", "--images", str(edits),
                                 "--reference", str(edits), "--inception-checkpoint", str(tmp_path / "nope.pth")])
    assert result.exit_code == 1
    message = result.output
    for needle in ("HPS_v2_compressed.pt", "huggingface.co/xswu/HPSv2", "--hps-checkpoint",
                   "open_clip_pytorch_model.bin", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                   "dino_deitsmall16_pretrain.pth", f"{tmp_path / 'nope.pth'} does not exist"):
        assert needle in message, needle
    assert not (edits.parent / "edits-eval").exists()  # nothing written

    offline = runner.invoke(app, ["eval", "--suite", "hps", "--images", str(edits), "--allow-download"],
                            env={"HF_HUB_OFFLINE": "1"})
    assert offline.exit_code == 1 and "HF_HUB_OFFLINE is set" in offline.output


def test_weights_config_relative_paths_and_flags_win(edits, weights, tmp_path):
    conf = weights["clip"].parent / "weights.yaml"
    conf.write_text(f"clip: {weights['clip'].name}\nclip_model: {weights['clip_model']}\nhps: missing.pt\n")
    report = run_eval(EvalConfig(suites=["clip"], images=str(edits), out=str(tmp_path / "r1"), device="cpu",
                                 weights_config=str(conf), grid=0), progress=False)
    assert report["settings"]["weights"]["clip"] == str(weights["clip"])
    with pytest.raises(ConfigError, match="missing.pt does not exist"):
        run_eval(EvalConfig(suites=["hps"], images=str(edits), out=str(tmp_path / "r2"), weights_config=str(conf)),
                 progress=False)
    # The flag wins over the file.
    report = run_eval(EvalConfig(suites=["hps"], images=str(edits), out=str(tmp_path / "r3"), device="cpu",
                                 weights_config=str(conf), hps_checkpoint=str(weights["hps"]),
                                 hps_model=str(weights["clip_model"]), grid=0), progress=False)
    assert report["metrics"]["hps"]["n"] == 3


def test_shapes_suite_on_ground_truth_and_wrong_prompts(tmp_path):
    prompts = [p for p in shapes.benchmark_prompts() if p.category in ("object", "position")][::6]
    good, bad = tmp_path / "good", tmp_path / "bad"
    for i, p in enumerate(prompts):
        _write(good, f"{i:03d}", shapes.render(p.scene, 64), prompt=p.text)
        # Shifted by one: each image is scored against another prompt's text (different colour or shape).
        _write(bad, f"{i:03d}", shapes.render(prompts[(i + 1) % len(prompts)].scene, 64), prompt=p.text)
    Image.new("RGB", (64, 64)).save(good / "grid.png")  # a sampler grid is not a sample
    result = runner.invoke(app, ["eval", "--suite", "shapes", "--images", str(good), "--out", str(tmp_path / "rg")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rg" / "report.json").read_text())
    assert report["count"] == len(prompts)
    assert report["shapes"]["overall"] == 1.0 and report["shapes"]["color"] == 1.0
    assert (tmp_path / "rg" / "shapes_bench.json").is_file()
    assert "Shapes benchmark" in (tmp_path / "rg" / "report.md").read_text()
    assert "shapes overall" in result.output

    wrong = run_eval(EvalConfig(suites=["shapes"], images=str(bad), out=str(tmp_path / "rb"), grid=0), progress=False)
    assert wrong["shapes"]["overall"] < 0.5


def test_prompts_mode_samples_then_scores_with_categories(tmp_path, weights):
    from meissonic_cli.model.scaffold import build_tiny_model_folder

    model = build_tiny_model_folder(tmp_path / "model")
    prompt_dir = tmp_path / "hps_prompts"
    prompt_dir.mkdir()
    (prompt_dir / "anime.json").write_text(json.dumps(["a cat", "a dog"]))
    (prompt_dir / "photo.json").write_text(json.dumps(["a car"]))
    args = ["eval", "--suite", "clip", "--prompts", str(prompt_dir), "--model", str(model), "--out", str(tmp_path / "ev"),
            "--clip-model", str(weights["clip_model"]), "--clip-checkpoint", str(weights["clip"]),
            "--steps", "2", "--cfg", "2", "--resolution", "64", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["count"] == 3 and set(report["metrics"]["clip_t"]["by_category"]) == {"anime", "photo"}
    sidecars = sorted((tmp_path / "ev" / "images").glob("*.json"))
    assert [json.loads(p.read_text())["category"] for p in sidecars] == ["anime", "anime", "photo"]
    # A rerun refuses to replace the report; with --overwrite it samples nothing new and re-scores the same images.
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "ev" / "images").glob("*.png"))]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    again = runner.invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "ev" / "images").glob("*.png"))] == mtimes
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["metrics"]["clip_t"]["mean"] == \
        pytest.approx(report["metrics"]["clip_t"]["mean"])
    # The same folder scores the same through --images (categories come from the sidecars).
    direct = run_eval(EvalConfig(suites=["clip"], images=str(tmp_path / "ev" / "images"), out=str(tmp_path / "ev2"),
                                 device="cpu", clip_model=str(weights["clip_model"]), clip_checkpoint=str(weights["clip"]),
                                 grid=0), progress=False)
    assert direct["metrics"]["clip_t"]["by_category"] == pytest.approx(report["metrics"]["clip_t"]["by_category"])


def test_bad_inputs_fail_with_one_clear_line(tmp_path, edits, weights):
    plain = tmp_path / "plain"
    _write(plain, "p0", _image((1, 2, 3)), prompt="a thing")
    cases = [
        (["eval", "--suite", "bogus", "--images", str(edits)], "--suite must list some of"),
        (["eval", "--images", str(edits), "--prompts", "x.txt", "--model", "m"], "not both"),
        (["eval", "--prompts", "x.txt", "--out", str(tmp_path / "o")], "--prompts needs --model"),
        (["eval", "--suite", "fid", "--images", str(edits)], "needs --reference"),
        (["eval", "--suite", "dino", "--images", str(plain), "--dino-checkpoint", str(weights["dino"])],
         "needs a 'source' image"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, args
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output
    (plain / "p1.png").write_bytes(b"not a png")
    (plain / "p1.json").write_text(json.dumps({"prompt": "x"}))
    result = runner.invoke(app, ["eval", "--images", str(plain), "--clip-model", str(weights["clip_model"]),
                                 "--clip-checkpoint", str(weights["clip"]), "--device", "cpu"])
    assert result.exit_code == 1 and "p1.png cannot be read as an image" in result.output
    # A checkpoint of the wrong architecture is named, not a shape traceback.
    with pytest.raises(ModelFormatError, match="tensor shapes do not match|tensor\\(s\\) missing"):
        load_clip("ViT-B-32", weights["clip"])


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "category": "anime"}\n"a dog"\n')
    (tmp_path / "p.json").write_text(json.dumps({"photo": ["a car"], "anime": [{"prompt": "a cat"}]}))
    assert [e.prompt for e in read_eval_prompts(str(tmp_path / "p.txt"))] == ["a cat", "a dog"]
    assert [(e.prompt, e.category) for e in read_eval_prompts(str(tmp_path / "p.jsonl"))] == [("a cat", "anime"), ("a dog", None)]
    assert [(e.prompt, e.category) for e in read_eval_prompts(str(tmp_path / "p.json"))] == [("a car", "photo"), ("a cat", "anime")]
    shapes_entries = read_eval_prompts("shapes")
    assert len(shapes_entries) == len(shapes.benchmark_prompts()) and shapes_entries[0].extra["expects"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": ""}\n')
    with pytest.raises(InputError, match="line 1"):
        read_eval_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="no images"):
        load_items(tmp_path)


def test_unreadable_sidecar_names_the_file_and_its_writers(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")  # the sampler grid: not a sample, even without a sidecar
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "a cat", "category": "photo"}))
    [item] = load_items(tmp_path)
    assert (item.path.name, item.prompt, item.category) == ("a.png", "a cat", "photo")
    for text, expected in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")):
        (tmp_path / "a.json").write_text(text)
        with pytest.raises(InputError, match=f"a.json: {expected}.*; sidecars are written by `sample`/`edit`$"):
            load_items(tmp_path)


def test_prompts_from_standard_input_and_pipes(tmp_path, weights):
    """`eval --prompts -` reads standard input once (txt, or --prompts-format jsonl|json), as `sample --prompts -`
    does; a named pipe (<(...)) is read as txt; empty input or a bad format is one Error: line, nothing written."""
    import threading

    from meissonic_cli.model.scaffold import build_tiny_model_folder

    model = build_tiny_model_folder(tmp_path / "model")
    common = ["--model", str(model), "--clip-model", str(weights["clip_model"]), "--clip-checkpoint", str(weights["clip"]),
              "--steps", "2", "--cfg", "2", "--resolution", "64", "--device", "cpu", "--grid-size", "0"]
    result = runner.invoke(app, ["eval", "--suite", "clip", "--prompts", "-", "--out", str(tmp_path / "txt"), *common],
                           input="# a comment\na cat\n\na dog\n")
    assert result.exit_code == 0, result.output
    sidecars = sorted((tmp_path / "txt" / "images").glob("*.json"))
    assert [json.loads(p.read_text())["prompt"] for p in sidecars] == ["a cat", "a dog"]
    assert json.loads((tmp_path / "txt" / "report.json").read_text())["count"] == 2

    rows = '{"prompt": "a cat", "category": "anime"}\n{"prompt": "a car", "category": "photo"}\n'
    result = runner.invoke(app, ["eval", "--suite", "clip", "--prompts", "-", "--prompts-format", "jsonl",
                                 "--out", str(tmp_path / "jsonl"), *common], input=rows)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "jsonl" / "report.json").read_text())
    assert set(report["metrics"]["clip_t"]["by_category"]) == {"anime", "photo"}

    for args, stdin, needle in [
        (["--prompts-format", "yaml"], "a cat\n", "--prompts-format must be one of txt, jsonl, json"),
        ([], "\n# only a comment\n", "no prompts"),
        (["--prompts-format", "json"], "[1, 2]", "expected a non-empty prompt string"),
    ]:
        out = tmp_path / f"bad-{len(stdin)}"
        bad = runner.invoke(app, ["eval", "--suite", "clip", "--prompts", "-", "--out", str(out), *args, *common],
                            input=stdin)
        assert bad.exit_code == 1, bad.output
        errors = [line for line in bad.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and needle in errors[0], bad.output
        assert "Traceback" not in bad.output and not (out / "images").exists()

    fifo = tmp_path / "prompts-pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a red circle\n"))
    writer.start()
    try:
        assert [e.prompt for e in read_eval_prompts(str(fifo))] == ["a red circle"]
    finally:
        writer.join(timeout=10)


def _one_error(result) -> str:
    """The single `Error:` line of a failed run (exit 1, no traceback)."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "internal error" not in errors[0], errors[0]
    return errors[0]


def test_bad_prompt_files_fail_before_sampling(tmp_path, tiny_model_dir):
    """Prompt files go through the bounded JSON reader; rows have only `prompt` and `category`, both text (so
    no NaN/Infinity reaches a sidecar); a prompt a suite cannot score fails before anything is sampled."""
    fast = ["--model", str(tiny_model_dir), "--steps", "2", "--resolution", "64", "--device", "cpu", "-s", "shapes"]
    cases = [  # (ending or None for stdin as json, content, needle)
        (None, "[" * 100_000 + "]" * 100_000, "(stdin): JSON nested too deep"),
        ("jsonl", '{"prompt": "a red circle", "n": ' + "9" * 5000 + "}\n", "line 1: not valid JSON"),
        ("jsonl", '{"prompt": "a red circle", "foo": NaN, "source": "/etc/hostname"}\n',
         "line 1: unknown key(s) foo, source; allowed: prompt, category"),
        ("json", '[{"prompt": "a red circle", "category": [1]}]', "item 1: 'category' must be text, got [1]"),
        ("json", '[{"prompt": "a red circle", "category": NaN}]', "'category' must be text, got nan"),
        ("jsonl", '{"prompt": Infinity}\n', "'prompt' must be text, got inf"),
        ("json", "[NaN]", "expected a non-empty prompt string"),
        ("json", '{"anime": {"nested": ["a red circle"]}}', "expected a list of prompts"),
        ("txt", "a red circle\nhello world\n", "00001-hello-world.png's prompt 'hello world' is not a shapes-world"),
    ]
    for i, (ending, text, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        if ending is None:
            result = runner.invoke(app, ["eval", "--prompts", "-", "--prompts-format", "json", "-o", str(out), *fast],
                                   input=text)
        else:
            (tmp_path / f"p{i}.{ending}").write_text(text)
            result = runner.invoke(app, ["eval", "--prompts", str(tmp_path / f"p{i}.{ending}"), "-o", str(out), *fast])
        assert needle in _one_error(result), (i, result.output)
        assert not out.exists(), i  # nothing sampled, nothing written


def test_prompt_rows_reach_sidecars_as_strict_json_and_outputs_are_the_declared_ones(tmp_path, tiny_model_dir):
    """A good prompt file's category reaches each sidecar (strict JSON, nothing else added); the files eval
    writes in --out are exactly `eval_outputs` (the list the overwrite check uses)."""
    from meissonic_cli.metrics.evaluate import eval_outputs

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "category": "mine"}\n"two blue squares"\n')
    out = tmp_path / "ev"
    cfg = EvalConfig(suites=["shapes"], prompts=str(prompts), model=str(tiny_model_dir), out=str(out), device="cpu")
    cfg.sample.steps, cfg.sample.resolution, cfg.sample.device = 2, 64, "cpu"
    report = run_eval(cfg, progress=False)
    assert report["count"] == 2

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a sidecar"))

    metas = [strict(p.read_text()) for p in sorted((out / "images").glob("*.json"))]
    assert [m.get("category") for m in metas] == ["mine", None]
    assert not any("source" in m or "foo" in m for m in metas)
    assert sorted(p.name for p in out.iterdir() if p.name != "images") == sorted(eval_outputs(cfg))
    assert set(eval_outputs(cfg)) == {"report.json", "report.md", "grid.png", "shapes_bench.json"}


def test_eval_refuses_to_overwrite_any_file_it_writes(tmp_path):
    images = tmp_path / "images"
    for i, p in enumerate(shapes.benchmark_prompts()[:2]):
        _write(images, f"{i}", shapes.render(p.scene, 64), prompt=p.text)
    out = tmp_path / "g2out"
    out.mkdir()
    precious = {"grid.png": "precious", "report.md": "precious", "shapes_bench.json": '{"x": 1}'}
    for name, text in precious.items():
        (out / name).write_text(text)
    args = ["eval", "--images", str(images), "-o", str(out), "-s", "shapes"]
    error = _one_error(runner.invoke(app, args))
    assert all(str(out / name) in error for name in precious) and "--overwrite" in error, error
    assert {name: (out / name).read_text() for name in precious} == precious and not (out / "report.json").exists()

    # --out the images folder itself: an unrelated grid.png there is not replaced either.
    (images / "grid.png").write_text("precious")
    error = _one_error(runner.invoke(app, ["eval", "--images", str(images), "-o", str(images), "-s", "shapes"]))
    assert str(images / "grid.png") in error and "--overwrite" in error
    assert (images / "grid.png").read_text() == "precious" and not (images / "report.json").exists()
    (images / "grid.png").unlink()

    # A folder where a report file goes is refused even with --overwrite.
    (out / "report.json").mkdir()
    error = _one_error(runner.invoke(app, [*args, "--overwrite"]))
    assert f"{out / 'report.json'} is a folder" in error
    assert {name: (out / name).read_text() for name in precious} == precious
    (out / "report.json").rmdir()

    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text().startswith("# meissonic eval")
    assert json.loads((out / "shapes_bench.json").read_text())["summary"]["images"] == 2
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG"
