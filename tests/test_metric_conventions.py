"""Each `meissonic eval` metric against the package people cite for it, on the same images and weights.

Random weights in each package's own layout, so what is compared is the convention (preprocessing,
scale, aggregation, file selection), not the weights:
- HPS v2/v2.1 against `hpsv2` (its transform and CLIP model code; see `_hpsv2` for how it is imported);
- FID against pytorch-fid and clean-fid (the packages' own file listing, loading, resizing and
  statistics, with the same random Inception state dict in each);
- CLIP-T against torchmetrics' `CLIPScore` (its update/compute running our open_clip model);
- DINO full training checkpoints against timm loading the teacher backbone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meissonic_cli.errors import ConfigError, ModelFormatError
from meissonic_cli.metrics.evaluate import EvalConfig, run_eval

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_DINO = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random picture (width, height): structure at several scales, so resizing matters."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int16)
    return Image.fromarray(np.clip(base + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8))


def _write(folder: Path, name: str, image: Image.Image, **meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png")
    if meta:
        (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder / f"{name}.png"


# ----------------------------------------------------------------------------------------------
# HPS v2 / v2.1 against hpsv2


def _hpsv2() -> types.SimpleNamespace:
    """hpsv2's `open_clip` transform and model modules, imported without running hpsv2's package inits.

    hpsv2 1.2.0 pins pytest==7.2.0 and protobuf<4 (so it is installed with `pip install --no-deps`,
    see .ci/run), and its wheel lacks the BPE vocabulary its package init loads; the transform and
    model modules it scores with need neither. Text tokens come from open_clip's tokenizer, of which
    hpsv2's is a copy with the same vocabulary file.
    """
    spec = importlib.util.find_spec("hpsv2")
    if spec is None or spec.origin is None:
        pytest.fail("hpsv2 is not installed: pip install --no-deps hpsv2==1.2.0 (as .ci/run does)")
    root = Path(spec.origin).parent
    saved = {k: v for k, v in sys.modules.items() if k == "hpsv2" or k.startswith("hpsv2.")}
    try:
        for name, path in (("hpsv2", root), ("hpsv2.src", root / "src"), ("hpsv2.src.open_clip", root / "src" / "open_clip")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
        return types.SimpleNamespace(transform=importlib.import_module("hpsv2.src.open_clip.transform"),
                                     model=importlib.import_module("hpsv2.src.open_clip.model"))
    finally:
        for k in [k for k in sys.modules if k == "hpsv2" or k.startswith("hpsv2.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_hps_v21_equals_hpsv2_on_square_and_non_square_images(tmp_path):
    import open_clip

    hps = _hpsv2()
    torch.manual_seed(0)
    ref = hps.model.CLIP(**TINY_CLIP, output_dict=True).eval()
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": ref.state_dict()}, ckpt)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CLIP))
    # hpsv2's evaluation transform, built as its create_model_and_transforms(light_augmentation=True) does.
    preprocess = hps.transform.image_transform(ref.visual.image_size, is_train=False, resize_longest_max=True)
    sizes = [(48, 32), (32, 48), (100, 30), (64, 64), (32, 32), (45, 67)]  # (width, height)
    prompts = ["a red fox in snow", "a city at night", "two cats", "a bowl of fruit", "a lighthouse", "a boat"]
    folder = tmp_path / "images"
    for i, (size, prompt) in enumerate(zip(sizes, prompts)):
        _write(folder, f"{i:02d}", _noise(size, i), prompt=prompt)
    report = run_eval(EvalConfig(suites=["hps"], images=str(folder), out=str(tmp_path / "r"), device="cpu", grid=0,
                                 hps_model=str(tmp_path / "tiny.json"), hps_checkpoint=str(ckpt), hps_version="2.1",
                                 batch_size=4), progress=False)
    rows = {r["file"]: r["hps"] for r in report["per_image"]}
    spread = max(rows.values()) - min(rows.values())
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            # As hpsv2.img_score.score does: model(image, text) -> image_features @ text_features.T, diagonal.
            out = ref(preprocess(Image.open(folder / f"{i:02d}.png"))[None], open_clip.tokenize([prompt]))
            expected = 100 * float(torch.diagonal(out["image_features"] @ out["text_features"].T)[0])
            assert rows[f"{i:02d}.png"] == pytest.approx(expected, abs=1e-3), sizes[i]
    assert spread > 1.0  # the comparison can tell images apart
    assert report["metrics"]["hps"]["label"] == "HPS v2.1 (100 cos)"
    assert report["settings"]["hps_version"] == "2.1" and report["conventions"]["hps"]["equals"].startswith("hpsv2 v2.1")

    # The published file of one version under the other --hps-version is a mix-up, named before loading.
    with pytest.raises(ConfigError, match="published HPS v2.1 checkpoint but --hps-version is 2.0"):
        run_eval(EvalConfig(suites=["hps"], images=str(folder), out=str(tmp_path / "r2"), device="cpu",
                            hps_model=str(tmp_path / "tiny.json"), hps_checkpoint=str(ckpt)), progress=False)


# ----------------------------------------------------------------------------------------------
# CLIP-T against torchmetrics' CLIPScore


def test_clip_t_aggregate_equals_torchmetrics_clipscore(tmp_path):
    import open_clip
    import torchvision.transforms.functional as TF
    from torchmetrics.multimodal.clip_score import CLIPScore

    from meissonic_cli.metrics.clip import load_clip

    torch.manual_seed(4)  # a seed whose cosines have both signs (checked below)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CLIP))
    torch.save(open_clip.model.CLIP(**TINY_CLIP).state_dict(), tmp_path / "clip.bin")
    clip = load_clip(str(tmp_path / "tiny.json"), tmp_path / "clip.bin")
    long_prompt = " ".join(["a very long prompt about many small things"] * 12)
    prompts = ["a red fox", "a blue car", "green hills", "a white cat", "an old tree", long_prompt]
    folder = tmp_path / "images"
    for i, prompt in enumerate(prompts):
        _write(folder, f"{i}", _noise((40, 40), 10 + i), prompt=prompt)
    report = run_eval(EvalConfig(suites=["clip"], images=str(folder), out=str(tmp_path / "r"), device="cpu", grid=0,
                                 clip_model=str(tmp_path / "tiny.json"), clip_checkpoint=str(tmp_path / "clip.bin"),
                                 batch_size=4), progress=False)
    rows = [r["clip_t"] for r in report["per_image"]]

    class Processor:  # torchmetrics hands it the images as uint8 (C, H, W) tensors and the captions
        def __call__(self, images=None, text=None, **_):
            if images is not None:
                return {"pixel_values": torch.stack([clip.preprocess(TF.to_pil_image(im)) for im in images])}
            ids = clip.tokenizer(list(text))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class Model(torch.nn.Module):  # our open_clip network behind the transformers CLIPModel methods it calls
        config = types.SimpleNamespace()

        def get_image_features(self, pixel_values):
            return clip.model.encode_image(pixel_values)

        def get_text_features(self, input_ids, attention_mask):
            return clip.model.encode_text(input_ids)

    images = [torch.from_numpy(np.array(Image.open(folder / f"{i}.png"))).permute(2, 0, 1) for i in range(len(prompts))]
    metric = CLIPScore(model_name_or_path=lambda: (Model(), Processor()))
    metric.update(images, prompts)
    expected = float(metric.compute())
    assert report["metrics"]["clip_t"]["mean"] == pytest.approx(expected, abs=1e-4)
    # The inputs tell the conventions apart: clamping each image first would give another number.
    assert min(rows) < 0 < max(rows)
    assert abs(np.mean(np.maximum(rows, 0)) - expected) > 1e-2
    for image, prompt, row in zip(images, prompts, rows):
        single = CLIPScore(model_name_or_path=lambda: (Model(), Processor()))
        single.update([image], [prompt])
        assert max(row, 0.0) == pytest.approx(float(single.compute()), abs=1e-4)
    assert report["truncated_prompts"] == {"clip": 1}
    assert any("1 prompt(s) longer than 77 tokens" in w for w in report["warnings"])
    assert any("MagicBrush and EMU-Edit tables use ViT-B-32" in w for w in report["warnings"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "torchmetrics CLIPScore" in md and "max(mean, 0)" in md and "ViT-B-32" in md
    # The command prints the warnings under the table, one `Warning:` line each, on stderr.
    from typer.testing import CliRunner

    from meissonic_cli.cli import app

    result = CliRunner().invoke(app, ["eval", "--suite", "clip", "--images", str(folder), "-o", str(tmp_path / "cli"),
                                      "--clip-model", str(tmp_path / "tiny.json"), "--clip-checkpoint",
                                      str(tmp_path / "clip.bin"), "--device", "cpu", "--grid-size", "0"])
    assert result.exit_code == 0, result.output
    assert "Warning: 1 prompt(s) longer than 77 tokens were cut for CLIP" in result.stderr
    assert "Warning: CLIP-T/CLIP-I use" in result.stderr and "CLIP-T (CLIPScore)" in result.stdout


# ----------------------------------------------------------------------------------------------
# DINO: full training checkpoints


def _dino_training_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint as DINO's main_dino.py saves it; returns the teacher backbone's own state dict."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    teacher, student = VisionTransformer(num_classes=0, **TINY_DINO), VisionTransformer(num_classes=0, **TINY_DINO)
    head = {"head.mlp.0.weight": torch.randn(64, 32), "head.last_layer.weight_g": torch.ones(128, 1)}
    optimizer = torch.optim.AdamW(student.parameters())
    student(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.save({"student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                            **{f"module.{k}": v for k, v in head.items()}},
                "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
                "optimizer": optimizer.state_dict(), "epoch": 3,
                "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005,
                                           norm_last_layer=True, data_path="/data/imagenet", seed=0),
                "dino_loss": {"center": torch.zeros(1, 128)}}, path)
    return teacher.state_dict()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dino_full_training_checkpoint_loads_teacher_and_refuses_other_globals(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from meissonic_cli.metrics.dino import load_dino

    (tmp_path / "tiny.json").write_text(json.dumps(TINY_DINO))
    teacher = _dino_training_checkpoint(tmp_path / "checkpoint.pth")
    ours = load_dino(str(tmp_path / "tiny.json"), tmp_path / "checkpoint.pth")
    ref = VisionTransformer(num_classes=0, **TINY_DINO).eval()
    ref.load_state_dict(teacher)
    x = torch.stack([ours.preprocess(_noise((48, 40), s)) for s in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), ref(x), atol=1e-5, rtol=0)
        assert not torch.allclose(ref(x), VisionTransformer(num_classes=0, **TINY_DINO).eval()(x), atol=1e-3)

    marker = tmp_path / "ran"
    torch.save({"teacher": {"x": torch.zeros(1)}, "args": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ModelFormatError, match=r"asks for posix\.system.*refused"):
        load_dino(str(tmp_path / "tiny.json"), tmp_path / "evil.pth")
    assert not marker.exists()
    # Namespace is allowed for DINO checkpoints only; a CLIP checkpoint holding one stays refused.
    from meissonic_cli.metrics.clip import load_state_file

    with pytest.raises(ModelFormatError, match="argparse.Namespace"):
        load_state_file(tmp_path / "checkpoint.pth")
    # No teacher: the message names what the file holds and what to extract.
    torch.save({"net": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ModelFormatError, match=r"found keys net \(dict\), epoch \(int\).*torch.save\(ckpt\['net'\]"):
        load_dino(str(tmp_path / "tiny.json"), tmp_path / "other.pth")


# ----------------------------------------------------------------------------------------------
# FID against pytorch-fid and clean-fid


def _inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random FID Inception weights in pt_inception's layout (no num_batches_tracked); He-scaled so
    that features stay informative through the 94 layers."""
    from meissonic_cli.metrics.fid import FIDInception

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        net = FIDInception()
    state = {}
    for k, v in net.net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var") or (v.dim() == 1 and k.endswith("weight")):
            state[k] = torch.ones(v.shape)
        elif v.dim() == 1:
            state[k] = torch.zeros(v.shape)
        else:
            state[k] = torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel()) ** 0.5
    return state


@pytest.fixture(scope="module")
def fid_sets(tmp_path_factory) -> dict[str, Path]:
    """Two small image sets of mixed sizes and the random Inception weights as a pt_inception file."""
    root = tmp_path_factory.mktemp("fid")
    torch.save(_inception_state(), root / "pt_inception-2015-12-05-6726825d.pth")
    for i, size in enumerate([(64, 48), (48, 64), (40, 40), (72, 56)]):
        _write(root / "gen", f"g{i}", _noise(size, 100 + i), prompt=f"image {i}")
    for i, size in enumerate([(64, 48), (60, 60), (30, 45)]):
        _write(root / "real", f"r{i}", _noise(size, 200 + i).rotate(90 * i))
    return {"root": root, "weights": root / "pt_inception-2015-12-05-6726825d.pth", "gen": root / "gen",
            "real": root / "real"}


def _common_subspace(mu1, s1, mu2, s2, extra: int = 4):
    """The two Gaussians in an orthonormal basis of the space they live in (exact when N < 2048).

    FID is invariant under an orthogonal change of basis, and both covariances and the mean
    difference lie in a subspace of dimension < n1 + n2; there scipy's sqrtm (which pytorch-fid and
    clean-fid call) takes milliseconds instead of minutes at 2048 x 2048.
    """
    m = np.concatenate([s1, s2, (mu1 - mu2)[:, None]], axis=1)
    rank = int(np.linalg.matrix_rank(s1)) + int(np.linalg.matrix_rank(s2)) + 1
    q, _ = np.linalg.qr(m @ np.random.default_rng(0).normal(size=(m.shape[1], rank + extra)))
    for s in (s1, s2):
        assert np.abs(q @ (q.T @ s @ q) @ q.T - s).max() <= 1e-9 * np.abs(s).max()  # the basis holds them exactly
    return q.T @ mu1, q.T @ s1 @ q, q.T @ mu2, q.T @ s2 @ q


def _ours(fid_sets, tmp_path, mode: str, images: Path, reference: Path, **kw) -> dict:
    cfg = EvalConfig(suites=["fid"], images=str(images), reference=str(reference), out=str(tmp_path / f"r-{mode}"),
                     device="cpu", grid=0, inception_checkpoint=str(fid_sets["weights"]), fid_mode=mode, **kw)
    return run_eval(cfg, progress=False)["fid"]


@pytest.mark.slow  # 28 Inception forwards at 299x299 on CPU (~6 s CPU)
def test_fid_equals_pytorch_fid_and_clean_fid(fid_sets, tmp_path, monkeypatch):
    from cleanfid import fid as cleanfid
    from cleanfid.inception_torchscript import InceptionV3W
    from pytorch_fid import fid_score
    from pytorch_fid.inception import InceptionV3

    # pytorch-fid loads its weights from torch hub's cache: put the random ones there under their name.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / fid_sets["weights"].name).write_bytes(fid_sets["weights"].read_bytes())
    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    stats = [fid_score.compute_statistics_of_path(str(fid_sets[k]), net, 1, 2048, "cpu", num_workers=0)
             for k in ("gen", "real")]
    expected = fid_score.calculate_frechet_distance(*_common_subspace(*stats[0], *stats[1]))
    ours = _ours(fid_sets, tmp_path, "pytorch-fid", fid_sets["gen"], fid_sets["real"])
    assert ours["value"] == pytest.approx(expected, rel=1e-4)
    assert ours["value"] > 0.1 and ours["convention"].startswith("pytorch-fid")

    # clean-fid runs a TorchScript Inception (inception-2015-12-05.pt) through InceptionV3W, which
    # normalises and calls its `layers`: script the same network with the same random weights.
    class Base(torch.nn.Module):
        def __init__(self, layers: torch.nn.Module):
            super().__init__()
            self.layers = layers

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x)

    layers = torch.nn.Sequential(*net.blocks).eval()
    traced = torch.jit.trace(layers, torch.zeros(1, 3, 299, 299))
    torch.jit.save(torch.jit.script(Base(traced)), tmp_path / "inception-2015-12-05.pt")
    clean_net = InceptionV3W(str(tmp_path), download=False, resize_inside=False)
    feats = [cleanfid.get_folder_features(str(fid_sets[k]), clean_net, num_workers=0, batch_size=8,
                                          device=torch.device("cpu"), mode="clean", verbose=False) for k in ("gen", "real")]
    clean_stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in feats]  # as cleanfid.fid.fid_from_feats
    expected_clean = cleanfid.frechet_distance(*_common_subspace(*clean_stats[0], *clean_stats[1]))
    ours_clean = _ours(fid_sets, tmp_path, "clean", fid_sets["gen"], fid_sets["real"])
    assert ours_clean["value"] == pytest.approx(expected_clean, rel=1e-4)
    assert abs(ours_clean["value"] - ours["value"]) > 1e-3 * ours["value"]  # the two modes do differ


@pytest.mark.slow  # 14 Inception forwards at 299x299 on CPU (~3 s CPU)
def test_fid_file_rule_report_and_batch_size(fid_sets, tmp_path):
    from meissonic_cli.metrics.fid import inception_features, load_inception
    from meissonic_cli.metrics.fid_suite import REFERENCE_STATS

    # A folder with a sampler grid and report files in it, against itself: 0, and the extras listed.
    folder = tmp_path / "gen"
    folder.mkdir()
    for p in fid_sets["gen"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    _noise((300, 200), 7).save(folder / "grid.png")
    (folder / "report.json").write_text("{}")
    (folder / "report.md").write_text("# report\n")
    fid = _ours(fid_sets, tmp_path, "pytorch-fid", folder, folder)
    assert fid["value"] == pytest.approx(0.0, abs=1e-6)
    assert fid["images"] == fid["reference_images"] == 4
    assert fid["excluded"] == {"generated": ["grid.png", "report.json", "report.md"],
                               "reference": ["grid.png", "report.json", "report.md"]}
    assert fid["inception"]["digest"].startswith("sha256:") and fid["mode"] == "pytorch-fid"
    assert any("below 2,048 per side" in w for w in fid["warnings"])

    # Batch size 1 and 32: the same features, the same FID.
    model = load_inception(fid_sets["weights"])
    from meissonic_cli.metrics.report import open_rgb

    paths = sorted(fid_sets["gen"].glob("*.png"))[:2] + sorted(fid_sets["real"].glob("*.png"))[:2]
    one = inception_features(model, paths, batch_size=1, load=open_rgb)
    many = inception_features(model, paths, batch_size=32, load=open_rgb)
    assert np.abs(one - many).max() <= 1e-6 * np.abs(one).max()
    from meissonic_cli.metrics.fid import fid_from_features

    a, b = fid_from_features(one[:2], one[2:]), fid_from_features(many[:2], many[2:])
    assert a > 0.1 and a == pytest.approx(b, rel=1e-6)

    # The reference statistics written beside the report come back as a reference of known provenance;
    # a bare mu/sigma .npz works with a warning; another mode's statistics are refused.
    stats = tmp_path / "r-pytorch-fid" / REFERENCE_STATS
    two = tmp_path / "two"
    for p in sorted(fid_sets["real"].glob("*.png"))[:2]:
        _write(two, p.stem, Image.open(p))
    again = _ours(fid_sets, tmp_path / "again", "pytorch-fid", two, stats)
    assert again["reference_images"] == 4 and not any("does not say" in w for w in again["warnings"])
    with np.load(stats) as data:
        np.savez(tmp_path / "bare.npz", mu=data["mu"], sigma=data["sigma"])
    bare = _ours(fid_sets, tmp_path / "bare", "pytorch-fid", two, tmp_path / "bare.npz")
    assert bare["value"] == pytest.approx(again["value"]) and any("does not say how it was made" in w for w in bare["warnings"])
    from meissonic_cli.errors import InputError

    with pytest.raises(InputError, match="made with --fid-mode pytorch-fid; rerun with --fid-mode pytorch-fid"):
        _ours(fid_sets, tmp_path / "clean", "clean", two, stats)
