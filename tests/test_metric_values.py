"""Metric values against references computed another way, on inputs where a wrong scale, a missing
normalisation or a misplaced clamp changes the number (an image compared with itself scores 1 under any
preprocessing, and a count of values says nothing about them).

- CLIP-T: torchmetrics' `CLIPScore` convention, 100 x cos(image, text) per image and the set's mean
  clamped at 0, with the image and text embedded here by open_clip's own model and transform on the same
  weights; the prompts are chosen so that some cosines are positive and some negative (where a per-image
  clamp and a clamp of the mean give different numbers).
- DINO: cosine of CLS features of two *different* images, with the DINO evaluation preprocessing written
  out here in PIL + numpy (short side to 256/224 of the crop, bicubic; centre crop; ImageNet mean/std).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import TINY_CLIP, TINY_DINO, _cfg, _image, _write, weights  # noqa: F401 (fixture)

from meissonic_cli.metrics.evaluate import run_eval

PROMPTS = ["a red square", "a blue circle", "two green triangles", "a photo of a cat", "an old map", "purple sky",
           "a yellow car on a road", "noise"]


@pytest.fixture(scope="module")
def scored(weights, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """Eight edits with different prompts, all of one source image except e0, scored by clip and dino."""
    root = tmp_path_factory.mktemp("values")
    src = root / "src.png"
    _image((120, 120, 40), seed=9).save(src)
    out = root / "edits"
    colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (90, 90, 90), (250, 250, 250), (10, 10, 10),
               (200, 200, 20), (20, 200, 200)]
    for i, (prompt, colour) in enumerate(zip(PROMPTS, colours)):
        _write(out, f"e{i}", _image(colour, seed=i), prompt=prompt, source=str(src))
    report = run_eval(_cfg(out, weights, ["clip", "dino"]), progress=False)
    return out, src, {r["file"]: r for r in report["per_image"]}, report["metrics"]


def _open_clip_reference(weights, out):  # noqa: F811
    import open_clip

    model = open_clip.model.CLIP(**TINY_CLIP).eval()
    model.load_state_dict(torch.load(weights["clip"], weights_only=True))
    pre = open_clip.image_transform(TINY_CLIP["vision_cfg"]["image_size"], is_train=False)
    cosines = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            with Image.open(out / f"e{i}.png") as im:
                img = model.encode_image(pre(im.convert("RGB"))[None], normalize=True)
            txt = model.encode_text(open_clip.tokenize([prompt]), normalize=True)
            cosines[f"e{i}.png"] = float((img * txt).sum())
    return cosines


def test_clip_t_is_100_times_the_cosine_and_the_set_mean_is_clamped_at_zero(scored, weights):  # noqa: F811
    out, _, rows, metrics = scored
    cosines = _open_clip_reference(weights, out)
    positive = [f for f, c in cosines.items() if c > 0.02]
    negative = [f for f, c in cosines.items() if c < -0.02]
    # The inputs must tell a wrong scale and a misplaced clamp apart, or the test would prove nothing.
    assert positive and negative, cosines
    for name, cos in cosines.items():
        assert rows[name]["clip_t"] == pytest.approx(100.0 * cos, abs=1e-3), name
    mean = 100.0 * sum(cosines.values()) / len(cosines)
    clamped_per_image = 100.0 * sum(max(c, 0.0) for c in cosines.values()) / len(cosines)
    assert abs(max(mean, 0.0) - clamped_per_image) > 0.1  # the two conventions differ on these inputs
    assert metrics["clip_t"]["mean"] == pytest.approx(max(mean, 0.0), abs=1e-3)


def _dino_pixels(path, size: int) -> torch.Tensor:
    """DINO's evaluation transform, written out: short side to round(size*256/224) (bicubic), centre crop, ImageNet norm."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        short = round(size * 256 / 224)
        w, h = im.size
        new = (short, max(1, int(short * h / w))) if w <= h else (max(1, int(short * w / h)), short)
        im = im.resize(new, Image.BICUBIC)
        left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    arr = (arr - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def test_dino_similarity_of_different_images_matches_features_computed_here(scored, weights):  # noqa: F811
    from timm.models.vision_transformer import VisionTransformer

    out, src, rows, _ = scored
    net = VisionTransformer(num_classes=0, **TINY_DINO).eval()
    net.load_state_dict(torch.load(weights["dino"], weights_only=True))
    size = TINY_DINO["img_size"]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(_dino_pixels(src, size)), dim=-1)
        values = {}
        for i in range(len(PROMPTS)):
            feat = torch.nn.functional.normalize(net(_dino_pixels(out / f"e{i}.png", size)), dim=-1)
            values[f"e{i}.png"] = float((feat * ref).sum())
    # Different images: well below 1, so the preprocessing shows in the number.
    assert max(values.values()) < 0.999, values
    for name, value in values.items():
        assert rows[name]["dino"] == pytest.approx(value, abs=1e-4), name
