"""`meissonic demo`: the whole chain on synthetic data learns caption -> scene (reduced budget here)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import OutputExistsError
from meissonic_cli.shapes import demo

REPO = Path(__file__).resolve().parents[1]
ACCURACY_KEYS = ("color", "shape", "position", "count", "overall")
STAGES = ("model", "synth", "curate", "download", "tokenize", "train", "sample", "eval")


@pytest.mark.slow
def test_small_demo_learns_colour(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--budget", "small"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for key in ACCURACY_KEYS:
        assert 0.0 <= report[key] <= 1.0
        assert key in report["chance"]
    assert tuple(report["stages"]) == STAGES
    assert all(seconds > 0 for seconds in report["stages"].values())
    assert report["vq_psnr"] >= 28.0
    assert report["data"]["tokenized"] > 0 and report["data"]["curated_rows"] < report["data"]["source_rows"]
    # Chance for colour is 1/6 on single-object prompts (less on pairs): a model that ignored its
    # captions would score about that. Measured at 600 steps: colour 0.73 once, 0.17 once; hence 900 steps.
    assert report["color"] >= report["chance"]["color"] + 0.25, report
    assert report["position"] >= report["chance"]["position"] + 0.25, report
    assert (out / "samples.png").is_file() and (out / "eval" / "report.json").is_file()
    assert "accuracy: color" in result.output and "samples.png" in result.output
    # A second run into the same folder refuses, and leaves the report in place.
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--budget", "small"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert json.loads((out / "report.json").read_text()) == report


def test_bad_budget_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "x"), "--budget", "huge"])
    assert result.exit_code == 1
    assert "--budget must be one of full, small" in result.output
    assert not (tmp_path / "x").exists()


def test_out_folder_rules(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds no demo"):
        demo._prepare_out(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"

    earlier = tmp_path / "earlier"
    (earlier / "tokens").mkdir(parents=True)
    (earlier / "report.json").write_text("{}")
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        demo._prepare_out(earlier, overwrite=False)
    assert (earlier / "report.json").exists()
    demo._prepare_out(earlier, overwrite=True)
    assert sorted(p.name for p in earlier.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name", sorted(demo.BUDGETS))
def test_budget_models_fit_together(name):
    from meissonic_cli.model.scaffold import check_compatible
    from meissonic_cli.model.vq.vqgan import tiny_vq_config

    transformer, text = demo.demo_model_configs(demo.BUDGETS[name])
    check_compatible(transformer, text, tiny_vq_config(codebook_size=demo.VQ_CODEBOOK))
    assert transformer.downsample is False and transformer.codebook_size >= demo.VQ_CODEBOOK
    # Every benchmark caption fits the demo's text context (SOT + tokens + EOT).
    from meissonic_cli.model.text_encoder import ClipTokenizer
    from meissonic_cli.shapes.world import benchmark_prompts

    ids = ClipTokenizer(text.context_length)([p.text for p in benchmark_prompts()])
    assert bool((ids == 49407).any(dim=1).all())


def test_recipe_matches_the_demo_full_budget():
    from meissonic_cli.train.config import load_train_config

    recipe = load_train_config(REPO / "pipelines" / "demo_train.yaml")
    built = demo.demo_train_config(demo.BUDGETS["full"], recipe.data, recipe.output, recipe.model)
    assert dataclasses.asdict(recipe) == dataclasses.asdict(built)


def test_demo_script_parses_and_uses_the_demo_settings():
    script = (REPO / "pipelines" / "demo.sh").read_text()
    subprocess.run(["bash", "-n", str(REPO / "pipelines" / "demo.sh")], check=True)
    for command in ("meissonic demo --model-only", "meissonic synth", "meissonic curate", "meissonic download",
                    "meissonic tokenize", "meissonic train --config", "meissonic sample", "meissonic eval --suite shapes"):
        assert command in script
    for prompt in demo.SHOWCASE_PROMPTS:
        assert f'"{prompt}"' in script
    full = demo.BUDGETS["full"]
    assert f"ROWS=${{ROWS:-{full.rows}}}" in script
    assert f"--sides {','.join(str(side) for side in demo.SOURCE_SIDES)} " in script
    assert (f"--steps {full.sample_steps} --guidance-scale {full.cfg:g} --temperature {full.temperature} "
            f"--token-temperature {full.token_temperature:g}") in script
