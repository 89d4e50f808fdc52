"""The bad-input table, round two (issue 20): one section per class of input that looked valid.

Same rules as `test_bad_input.py` (whose runner these rows use): exit 1, exactly one `Error:` line
that names the setting or file (`expect`), no traceback, nothing under the case's workspace changed,
and never the last-resort handler's line. `ok=True` rows are odd but valid input that must succeed.

Classes: 1 non-finite/absurd numbers, 2 size bombs, 4 validate before writing, 6 structured files of
the wrong shape, 7 seeds. Completion markers (3) are fault tests in `test_markers.py`; image modes
(5) are in `test_image_modes.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bad_input import (
    Case,
    bomb_png,
    cases_file,
    copy_model,
    edit_args,
    eval_images,
    image_shards,
    parquet,
    png,
    run_case,
    sample_args,
    write,
)
from typer.testing import CliRunner

from meissonic_cli.cli import app

HUGE_STEPS = "100000000000"
MAX_SEED = str(2**63 - 1)


def C(cls: int, id: str, build, **kw) -> Case:
    return Case(f"c{cls}-{id}", build, **kw)


# ----------------------------------------------------------------------------------------------
# Builders


def tokens(ws: Path) -> Path:
    """A one-shard token dataset the tiny architecture trains on (64 px, text dim 32)."""
    from test_train import make_token_dataset

    return make_token_dataset(ws / "data", shards=1, per_shard=4)


def train_args(ws: Path, *extra: str, data: Path | None = None) -> list[str]:
    data = tokens(ws) if data is None else data
    return ["train", "--arch", "tiny", "--data", str(data), "--out", str(ws / "run"), "--resolution", "64",
            "--batch-size", "2", "--max-steps", "1", "--checkpoint-every", "1", "--cond-dropout", "0",
            "--log-every", "1", "--device", "cpu", *extra]


def recipe(ws: Path, text: str | bytes, *extra: str) -> list[str]:
    return train_args(ws, "--config", str(write(ws / "recipe.yaml", text)), *extra)


def model_config(model: Path, ws: Path, **changes) -> Path:
    """A copy of the tiny model whose transformer/config.json has `changes`."""
    m2 = copy_model(model, ws / "m2")
    path = m2 / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return m2


def part_config(model: Path, ws: Path, part: str, **changes) -> Path:
    """A copy of the tiny model whose `part`/config.json (vqvae, text_encoder, ...) has `changes`."""
    m2 = copy_model(model, ws / "m2")
    path = m2 / part / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return m2


def vq_without(model: Path, ws: Path, prefix: str) -> Path:
    """A copy of the tiny model whose VQ weights lack every tensor under `prefix`."""
    from safetensors.torch import load_file, save_file

    m2 = copy_model(model, ws / "m2")
    path = m2 / "vqvae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith(prefix)}, str(path))
    return m2


def vq_extra(model: Path, ws: Path) -> Path:
    """A copy of the tiny model whose VQ weights hold one tensor the VQ does not have."""
    import torch
    from safetensors.torch import load_file, save_file

    m2 = copy_model(model, ws / "m2")
    path = m2 / "vqvae" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(str(path)), "bogus.weight": torch.zeros(2)}, str(path))
    return m2


def billion_laughs(key: str, depth: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, depth):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + f"\n{key}: *{chr(ord('a') + depth - 1)}\n"


def trained_run(ws: Path) -> Path:
    result = CliRunner().invoke(app, train_args(ws))
    assert result.exit_code == 0, result.output
    return ws / "run"


def tokenized(ws: Path, model: Path) -> list[str]:
    args = ["tokenize", str(image_shards(ws / "sh")), "-o", str(ws / "tok"), "--model", str(model),
            "--resolution", "64", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return args


def _relative_rerun(ws: Path, model: Path) -> list[str]:
    import os

    tokenized(ws, model)
    os.chdir(ws)  # restored by run_case
    return ["tokenize", "sh", "-o", str(ws / "tok"), "--model", str(model), "--resolution", "64", "--device", "cpu"]


def _huge_arch(ws: Path, model: Path) -> list[str]:
    arch = write(ws / "arch.json", json.dumps({**json.loads((model / "transformer" / "config.json").read_text()),
                                               "num_layers": 10**12}))
    args = train_args(ws)
    args[args.index("--arch") + 1] = str(arch)
    return args


# ----------------------------------------------------------------------------------------------
# The table

CASES: list[Case] = [
    # ---- 1. non-finite and absurd numbers (flags, YAML recipes, JSONL lines, config.json)
    C(1, "train-recipe-lr-1e999", lambda ws, m: recipe(ws, "lr: 1e999\n"), expect=r"\blr\b"),
    C(1, "train-recipe-lr-dot-inf", lambda ws, m: recipe(ws, "lr: .inf\n"), expect=r"\blr\b"),
    C(1, "train-recipe-weight-decay-inf", lambda ws, m: recipe(ws, "weight_decay: .inf\n"), expect="weight.decay"),
    C(1, "train-recipe-text-encoder-lr-1e999", lambda ws, m: recipe(ws, "text_encoder_lr: 1e999\n"),
      expect="text.encoder.lr"),
    C(1, "train-recipe-validation-cfg-nan", lambda ws, m: recipe(ws, "validation_cfg: .nan\n"), expect="validation.cfg"),
    C(1, "train-recipe-default-score-nan", lambda ws, m: recipe(ws, "default_score: .nan\n"), expect="default.score"),
    C(1, "train-recipe-lr-absurd", lambda ws, m: recipe(ws, "lr: 1.0e+30\n"), expect=r"\blr\b"),
    C(1, "train-flag-lr-1e999", lambda ws, m: train_args(ws, "--lr", "1e999"), expect=r"\blr\b"),
    C(1, "train-flag-adam-eps-subnormal", lambda ws, m: train_args(ws, "--adam-eps", "1e-320"), expect="adam.eps"),
    C(1, "train-flag-max-grad-norm-inf", lambda ws, m: train_args(ws, "--max-grad-norm", "inf"), expect="grad.norm"),
    C(1, "train-flag-lora-alpha-inf", lambda ws, m: train_args(ws, "--lora-alpha", "inf"), expect="lora.alpha"),
    C(1, "tokenize-score-nan", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "-o", str(ws / "tok"),
                                              "--model", str(m), "--resolution", "64", "--device", "cpu",
                                              "--score", "nan"], model=True, expect="score"),
    C(1, "tokenize-batch-size-huge", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "-o", str(ws / "tok"),
                                                    "--model", str(m), "--resolution", "64", "--device", "cpu",
                                                    "--batch-size", HUGE_STEPS], model=True, expect="batch.size"),
    C(1, "sample-cfg-1e308", lambda ws, m: sample_args(m, ws / "o", "--cfg", "1e308"), model=True,
      expect="guidance|cfg"),
    C(1, "sample-token-temperature-subnormal", lambda ws, m: sample_args(m, ws / "o", "--token-temperature", "1e-320"),
      model=True, expect="token.temperature"),
    C(1, "sample-steps-huge", lambda ws, m: sample_args(m, ws / "o", "--steps", HUGE_STEPS), model=True,
      expect="steps"),
    C(1, "sample-batch-size-huge", lambda ws, m: sample_args(m, ws / "o", "--batch-size", HUGE_STEPS), model=True,
      expect="batch.size"),
    C(1, "sample-jsonl-cfg-1e308", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.jsonl", '{"prompt": "a", "cfg": 1e308}\n')), "-o", str(ws / "o"), "--device", "cpu"], model=True,
        expect="cfg"),
    C(1, "sample-jsonl-steps-huge", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.jsonl", '{"prompt": "a", "steps": 100000000000}\n')), "-o", str(ws / "o"), "--device", "cpu"],
      model=True, expect="steps"),
    C(1, "edit-cfg-1e308", lambda ws, m: edit_args(m, ws, "--cfg", "1e308"), model=True, expect="guidance|cfg"),
    C(1, "edit-token-temperature-subnormal", lambda ws, m: edit_args(m, ws, "--token-temperature", "1e-320"),
      model=True, expect="token.temperature"),
    C(1, "edit-steps-huge", lambda ws, m: edit_args(m, ws, "--steps", HUGE_STEPS), model=True, expect="steps"),
    C(1, "edit-cases-cfg-1e308", lambda ws, m: ["edit", "-m", str(m), "--cases", str(cases_file(ws, [{"cfg": 1e308}])),
                                                "-o", str(ws / "edits"), "--device", "cpu"], model=True, expect="cfg"),
    C(1, "edit-cases-steps-huge", lambda ws, m: ["edit", "-m", str(m), "--cases",
                                                 str(cases_file(ws, [{"steps": 10**11}])), "-o", str(ws / "edits"),
                                                 "--device", "cpu"], model=True, expect="steps"),
    C(1, "eval-prompts-cfg-1e308", lambda ws, m: ["eval", "--suite", "shapes", "--prompts",
                                                  str(write(ws / "p.txt", "a red circle\n")), "-m", str(m), "--cfg",
                                                  "1e308", "-o", str(ws / "rep"), "--device", "cpu", "--steps", "1"],
      model=True, expect="guidance|cfg"),
    # --temperature: each of start/end in [0, 100] (a 1e40 start overflowed the scheduler after the model loaded)
    C(1, "sample-temperature-1e40", lambda ws, m: sample_args(m, ws / "o", "--temperature", "1e40"), expect="temperature"),
    C(1, "sample-temperature-negative", lambda ws, m: sample_args(m, ws / "o", "--temperature=-1e6"),
      expect="temperature"),
    C(1, "edit-temperature-pair-1e30", lambda ws, m: edit_args(m, ws, "--temperature", "1e30,1e30"), expect="temperature"),
    C(1, "eval-prompts-temperature-1e40", lambda ws, m: ["eval", "--suite", "shapes", "--prompts",
                                                         str(write(ws / "p.txt", "a red circle\n")), "-m", str(m),
                                                         "--temperature", "1e40", "-o", str(ws / "rep"), "--device",
                                                         "cpu", "--steps", "1"], expect="temperature"),
    C(1, "sample-temperature-100-ok", lambda ws, m: sample_args(m, ws / "o", "--temperature", "100,0"), model=True,
      ok=True),
    C(1, "sample-noise-reg-1e9", lambda ws, m: sample_args(m, ws / "o", "--noise-reg", "1e9"), expect="noise.reg"),
    C(1, "edit-dilate-1e9", lambda ws, m: edit_args(m, ws, "--dilate", "1000000000"), expect="dilate"),
    C(1, "edit-blend-1e9", lambda ws, m: edit_args(m, ws, "--blend", "1000000000"), expect="blend"),
    C(1, "edit-cases-dilate-1e9", lambda ws, m: ["edit", "-m", str(m), "--cases", str(cases_file(ws, [{"dilate": 10**9}])),
                                                 "-o", str(ws / "edits"), "--device", "cpu"], expect="dilate"),
    C(1, "curate-sample-fraction-subnormal", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o",
                                                            str(ws / "o"), "--sample-fraction", "1e-320"],
      expect="sample.fraction"),
    # ---- 2. size bombs
    C(2, "sample-over-a-million-images", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.txt", "".join(f"a red circle {i}\n" for i in range(101)))), "--images-per-prompt", "10000", "-o",
        str(ws / "o"), "--device", "cpu"], model=True, expect="1,000,000 images"),
    C(2, "train-recipe-billion-laughs", lambda ws, m: recipe(ws, billion_laughs("data")), expect="alias"),
    C(2, "train-recipe-deep-nesting", lambda ws, m: recipe(ws, "validation_prompts: " + "[" * 5000 + "]" * 5000 + "\n"),
      expect="recipe|yaml|nest"),
    C(2, "eval-weights-config-billion-laughs", lambda ws, m: ["eval", "--images", str(eval_images(ws)),
                                                              "--weights-config",
                                                              str(write(ws / "w.yaml", billion_laughs("clip")))],
      expect="alias"),
    C(2, "sample-jsonl-deep-nesting", lambda ws, m: ["sample", "-m", str(m), "--prompts", str(write(
        ws / "p.jsonl", '{"prompt": "a", "x": ' + "[" * 100000 + "]" * 100000 + "}\n")), "-o", str(ws / "o")],
      expect="p.jsonl"),
    C(2, "info-config-layers-1e12", lambda ws, m: ["info", "--model", str(model_config(m, ws, num_layers=10**12))],
      expect="parameters|layers"),
    C(2, "info-config-width-huge", lambda ws, m: ["info", "--model", str(model_config(
        m, ws, attention_head_dim=2**20, num_attention_heads=1, pooled_projection_dim=2**20,
        axes_dims_rope=[2**18, 2**18, 2**19]))], expect="parameters"),
    C(2, "sample-model-codebook-huge", lambda ws, m: sample_args(model_config(m, ws, codebook_size=2**40,
                                                                            vocab_size=2**40 + 1), ws / "o"),
      model=True, expect="parameters"),
    C(2, "sample-model-layers-1e12", lambda ws, m: sample_args(model_config(m, ws, num_layers=10**12), ws / "o"),
      model=True, expect="parameters|layers"),
    C(2, "train-arch-config-layers-1e12", lambda ws, m: _huge_arch(ws, m), expect="parameters|layers"),
    # edit's working size (the image's own size, --resolution, the outpaint canvas) has sample's 8192 side limit,
    # checked from the image header before the model loads: a header claiming 12000x12000 (no pixel data) is
    # refused for its size, not decoded
    C(2, "edit-image-side-over-8192-header-only", lambda ws, m: edit_args(m, ws, "-i", str(bomb_png(ws / "b.png", 12000))),
      expect="12000x12000.*8192.*--resolution"),
    C(2, "edit-image-20000x64-solid", lambda ws, m: edit_args(m, ws, "-i", str(png(ws / "w.png", (20000, 64)))),
      expect="20000x64.*8192"),
    C(2, "edit-outpaint-canvas-over-8192", lambda ws, m: ["edit", "-m", str(m), "-i", str(png(ws / "in.png")), "-p", "a",
                                                          "--mode", "outpaint", "--extend", "8192,0,8192,0", "-o",
                                                          str(ws / "edits"), "--steps", "1", "--device", "cpu"],
      expect="canvas.*16448x64.*8192"),
    C(2, "edit-cases-outpaint-canvas-over-8192", lambda ws, m: ["edit", "-m", str(m), "--cases", str(cases_file(ws, [
        {"mode": "outpaint", "box": None, "extend": [32, 0, 32, 0]}, {"mode": "outpaint", "box": None, "extend": [0, 0, 8192, 0]}])),
        "-o", str(ws / "edits"), "--device", "cpu", "--steps", "1"], expect="canvas.*8256x64"),
    C(2, "edit-cases-image-over-8192", lambda ws, m: ["edit", "-m", str(m), "--cases", str(cases_file(ws, [
        {"image": str(png(ws / "w.png", (64, 9000)))}])), "-o", str(ws / "edits"), "--device", "cpu"],
      expect="64x9000.*8192"),
    # ---- 4. validate before any write; the same input under another name is the same input
    C(4, "tokenize-rerun-refused-keeps-dataset-json", lambda ws, m: tokenized(ws, m) + ["--text-features", "pooled"],
      model=True),
    C(4, "tokenize-rerun-relative-input", _relative_rerun, model=True, ok=True),
    C(4, "tokenize-rerun-other-input-keeps-dataset-json", lambda ws, m: (tokenized(ws, m), [
        "tokenize", str(image_shards(ws / "sh2", keys=("000000007",))), "-o", str(ws / "tok"), "--model", str(m),
        "--resolution", "64", "--device", "cpu"])[-1], model=True, expect="input changed"),
    # An --out that is, holds or sits inside an input: --overwrite replaced the folder, deleting the input (and
    # anything else in it); nested, a rerun reads its own output. The snapshot check pins "nothing removed".
    C(4, "curate-out-is-the-input-folder", lambda ws, m: (parquet(ws / "in" / "m.parquet"), write(
        ws / "in" / "notes.txt", "precious\n"), ["curate", str(ws / "in" / "m.parquet"), "-o", str(ws / "in"),
                                                  "--overwrite"])[-1], expect="holds the input"),
    C(4, "curate-out-holds-the-input", lambda ws, m: (parquet(ws / "par" / "sub" / "m.parquet"), [
        "curate", str(ws / "par" / "sub" / "m.parquet"), "-o", str(ws / "par"), "--overwrite"])[-1],
      expect="holds the input"),
    C(4, "curate-out-inside-the-input-folder", lambda ws, m: (parquet(ws / "in" / "m.parquet"), [
        "curate", str(ws / "in"), "-o", str(ws / "in" / "curated")])[-1], expect="inside the input folder"),
    C(4, "download-out-is-the-input-folder", lambda ws, m: (parquet(ws / "in" / "m.parquet"), write(
        ws / "in" / "notes.txt", "precious\n"), ["download", str(ws / "in"), "-o", str(ws / "in"),
                                                  "--overwrite"])[-1], expect="input"),
    C(4, "tokenize-out-inside-the-input-folder", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "-o",
                                                                str(ws / "sh" / "tokens"), "--model", str(m)],
      expect="neither may hold the other"),
    # ---- 6. structured files of the wrong shape
    C(6, "train-dataset-json-list", lambda ws, m: (tokens(ws), write(ws / "data" / "dataset.json", "[1, 2]"),
                                                   train_args(ws, data=ws / "data"))[-1], expect="dataset.json"),
    C(6, "train-dataset-json-not-utf8", lambda ws, m: (tokens(ws), write(ws / "data" / "dataset.json", b"{\xff}"),
                                                       train_args(ws, data=ws / "data"))[-1], expect="dataset.json"),
    C(6, "train-dataset-json-grid-text", lambda ws, m: (tokens(ws), write(ws / "data" / "dataset.json", json.dumps({
        **json.loads((ws / "data" / "dataset.json").read_text()), "grid": "abc"})),
        train_args(ws, data=ws / "data"))[-1], expect="dataset.json"),
    C(6, "train-stats-json-string", lambda ws, m: (tokens(ws), write(ws / "data" / "tokens-00000.stats.json", '"hi"'),
                                                   train_args(ws, data=ws / "data"))[-1], expect="stats.json"),
    C(6, "train-stats-not-utf8", lambda ws, m: (tokens(ws), write(ws / "data" / "tokens-00000.stats.json", b"\xff\xfe"),
                                                train_args(ws, data=ws / "data"))[-1], expect="stats.json"),
    C(6, "train-recipe-int-key", lambda ws, m: recipe(ws, "1: 2\n"), expect="recipe"),
    C(6, "train-recipe-null-key", lambda ws, m: recipe(ws, "~: 1\n"), expect="recipe"),
    C(6, "train-recipe-list-key", lambda ws, m: recipe(ws, "? [a, b]\n: 1\n"), expect="recipe"),
    C(6, "train-resume-broken-config", lambda ws, m: (trained_run(ws), write(
        ws / "run" / "step-00000001" / "train_config.yaml", "a: [1,\n"),
        train_args(ws, "--resume", "auto", "--max-steps", "2", data=ws / "data"))[-1], expect="train_config.yaml"),
    # A checkpoint from before the manifest (checkpoint.json) is read as it is: the file's shape is checked.
    C(6, "train-resume-config-list", lambda ws, m: (trained_run(ws), write(
        ws / "run" / "step-00000001" / "train_config.yaml", "- 1\n- 2\n"),
        (ws / "run" / "step-00000001" / "checkpoint.json").unlink(),
        train_args(ws, "--resume", "auto", "--max-steps", "2", data=ws / "data"))[-1], expect="train_config.yaml"),
    C(6, "eval-sidecar-list", lambda ws, m: (eval_images(ws), write(ws / "imgs" / "00000-a-red-circle.json", "[1]"),
                                             ["eval", "--suite", "shapes", "--images", str(ws / "imgs"), "-o",
                                              str(ws / "rep"), "--device", "cpu"])[-1], expect="00000-a-red-circle.json"),
    C(6, "eval-sidecar-prompt-number", lambda ws, m: (eval_images(ws), write(
        ws / "imgs" / "00000-a-red-circle.json", json.dumps({"prompt": 5, "file": "00000-a-red-circle.png"})),
        ["eval", "--suite", "shapes", "--images", str(ws / "imgs"), "-o", str(ws / "rep"), "--device", "cpu"])[-1],
      expect="00000-a-red-circle.json"),
    C(6, "eval-weights-config-int-key", lambda ws, m: ["eval", "--images", str(eval_images(ws)), "--weights-config",
                                                       str(write(ws / "w.yaml", "1: 2\n"))], expect="w.yaml"),
    C(6, "sample-jsonl-line-list", lambda ws, m: ["sample", "-m", str(m), "--prompts",
                                                  str(write(ws / "p.jsonl", "[1, 2]\n")), "-o", str(ws / "o")],
      expect="p.jsonl"),
    C(6, "edit-cases-jsonl-line-string", lambda ws, m: ["edit", "-m", str(m), "--cases",
                                                        str(write(ws / "c.jsonl", '"hello"\n')), "-o",
                                                        str(ws / "edits")], expect="c.jsonl"),
    C(6, "info-config-list", lambda ws, m: (copy_model(m, ws / "m2"), write(ws / "m2" / "transformer" / "config.json",
                                                                            "[1]"),
                                            ["info", "--model", str(ws / "m2")])[-1], expect="config.json"),
    C(6, "info-config-layers-text", lambda ws, m: ["info", "--model", str(model_config(m, ws, num_layers="many"))],
      expect="config.json|num_layers"),
    C(6, "sample-vq-no-decoder-weights", lambda ws, m: sample_args(vq_without(m, ws, "decoder."), ws / "out"),
      model=True, expect=r"vqvae.*missing key.*decoder\."),
    C(6, "sample-vq-no-encoder-weights", lambda ws, m: sample_args(vq_without(m, ws, "encoder."), ws / "out"),
      model=True, expect=r"vqvae.*missing key.*encoder\."),
    C(6, "sample-vq-extra-weight", lambda ws, m: sample_args(vq_extra(m, ws), ws / "out"),
      model=True, expect=r"vqvae.*unexpected key.*bogus\.weight"),
    *[C(6, f"sample-vq-config-{key}-{value}", lambda ws, m, key=key, value=value: sample_args(
        part_config(m, ws, "vqvae", **{key: value}), ws / "out"), expect=rf"vqvae.config\.json: .*{key}")
      for key, value in (("norm_num_groups", 0), ("num_vq_embeddings", 0), ("block_out_channels", []),
                         ("layers_per_block", -1), ("num_vq_embeddings", 100000000), ("norm_num_groups", 3))],
    C(6, "sample-vq-config-huge-channels", lambda ws, m: sample_args(
        part_config(m, ws, "vqvae", block_out_channels=[32768] * 5), ws / "out"), expect=r"vqvae.config\.json.*parameters"),
    C(6, "info-vq-config-groups-zero", lambda ws, m: ["info", "-m", str(part_config(m, ws, "vqvae", norm_num_groups=0))],
      expect=r"vqvae.config\.json: norm_num_groups"),
    C(6, "info-rope-axis-negative", lambda ws, m: ["info", "-m", str(model_config(m, ws, axes_dims_rope=[-2, 2, 8]))],
      expect="axes_dims_rope"),
    *[C(6, f"sample-text-encoder-{key}-{value}", lambda ws, m, key=key, value=value: sample_args(
        part_config(m, ws, "text_encoder", **{key: value}), ws / "out"), expect=rf"text_encoder.config\.json: .*{key}")
      for key, value in (("num_attention_heads", 0), ("hidden_size", "abc"), ("layer_norm_eps", float("nan")),
                         ("num_hidden_layers", 1.5))],
    C(6, "sample-scheduler-config-list", lambda ws, m: (copy_model(m, ws / "m2"),
                                                        write(ws / "m2" / "scheduler" / "scheduler_config.json", "[1]"),
                                                        sample_args(ws / "m2", ws / "o"))[-1], model=True,
      expect="scheduler_config.json"),
    C(6, "tokenize-existing-dataset-json-list", lambda ws, m: (write(ws / "tok" / "dataset.json", "[1]"), [
        "tokenize", str(image_shards(ws / "sh")), "-o", str(ws / "tok"), "--model", str(m), "--resolution", "64",
        "--device", "cpu"])[-1], model=True, expect="dataset.json"),
    # ---- 7. one seed range everywhere
    C(7, "train-seed-max", lambda ws, m: train_args(ws, "--seed", MAX_SEED), ok=True),
    C(7, "train-recipe-seed-negative", lambda ws, m: recipe(ws, "seed: -1\n"), expect="seed"),
    C(7, "curate-seed-negative", lambda ws, m: ["curate", str(parquet(ws / "m.parquet")), "-o", str(ws / "o"),
                                                "--sample-fraction", "0.5", "--seed", "-1"], expect="seed"),
    C(7, "tokenize-seed-negative", lambda ws, m: ["tokenize", str(image_shards(ws / "sh")), "--model", str(m), "-o",
                                                  str(ws / "tok"), "--seed", "-1", "--random-crop"], expect="seed"),
    C(7, "demo-seed-negative", lambda ws, m: ["demo", "--out", str(ws / "d"), "--seed", "-1"], expect="seed"),
    C(7, "sample-seed-max-two-prompts", lambda ws, m: ["sample", "-m", str(m), "-p", "a red circle", "-p",
                                                       "a blue square", "-o", str(ws / "o"), "--steps", "1",
                                                       "--resolution", "64", "--device", "cpu", "--seed", MAX_SEED],
      model=True, ok=True),
]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if not c.model], ids=lambda c: c.id)
def test_bad_input_class(case: Case, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    ok, why = run_case(case, tmp_path, model, monkeypatch)
    assert ok, why


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", [c for c in CASES if c.model], ids=lambda c: c.id)
def test_bad_input_class_with_model(case: Case, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch,
                                    one_thread) -> None:
    ok, why = run_case(case, tmp_path, model, monkeypatch)
    assert ok, why


def test_derived_seeds_stay_in_range(tmp_path: Path, model: Path) -> None:
    """With the largest seed and two prompts, every image's recorded seed is in the one documented range."""
    from meissonic_cli.safety import MAX_SEED as LIMIT

    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["sample", "-m", str(model), "-p", "a red circle", "-p", "a blue square", "-o",
                                      str(out), "--steps", "1", "--resolution", "64", "--device", "cpu", "--seed",
                                      MAX_SEED])
    assert result.exit_code == 0, result.output
    seeds = [json.loads(p.read_text())["seed"] for p in sorted(out.glob("*.json"))]
    assert len(seeds) == 2 and len(set(seeds)) == 2
    assert all(0 <= s <= LIMIT for s in seeds), seeds


def test_table_covers_every_class() -> None:
    assert {c.id.split("-")[0] for c in CASES} == {"c1", "c2", "c4", "c6", "c7"}
    assert len({c.id for c in CASES}) == len(CASES)


def test_finished_dataset_reruns_without_writing(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch,
                                                 one_thread) -> None:
    """Class 4: a finished token dataset reruns on a read-only disk: nothing is written, not even dataset.json."""
    import os

    args = tokenized(tmp_path, model)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tok").iterdir()}

    def read_only(*a, **kw):
        raise OSError(30, "Read-only file system", str(a[0]) if a else "")

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(os, "rename", read_only)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tok").iterdir()} == stamps
