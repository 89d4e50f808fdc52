"""Hub ids from the local Hugging Face cache (`model/hub.py`) and weight variants (`model/state_io.py`).

The cache is built in the layout huggingface_hub itself reads (`models--owner--name/blobs/<sha256>`,
`snapshots/<rev>/...` linking to the blobs, `refs/main`), checked by resolving it with huggingface_hub;
the variant file names are checked against what diffusers and transformers write with
`save_pretrained(variant="fp16")`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_models import copy_model_dir
from typer.testing import CliRunner

from meissonic_cli.cli import app
from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.hub import model_variant, resolve_model_folder
from meissonic_cli.model.state_io import pick_variant, read_safetensors, read_weights, variant_name, weight_files

REPO_ID = "tester/tiny-meissonic"
REVISION = "0123456789abcdef0123456789abcdef01234567"
TRANSFORMER = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def make_hf_cache(src: Path, hub_cache: Path, repo_id: str = REPO_ID) -> Path:
    """Put the folder `src` into `hub_cache` as `hf download` leaves a repo: content-addressed blobs, a
    snapshot of relative symlinks to them, and refs/main naming the snapshot. Returns the snapshot."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp HF_HOME whose hub cache holds the tiny model as REPO_ID; returns the snapshot folder."""
    import huggingface_hub.constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads HF_HOME once, at import; a process started with this HF_HOME sees the same path.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    snapshot = make_hf_cache(tiny_model_dir, home / "hub")
    # huggingface_hub itself finds the cached repo and its files, offline.
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    assert Path(snapshot_download(REPO_ID, local_files_only=True)) == snapshot
    cached = try_to_load_from_cache(REPO_ID, "transformer/config.json")
    assert isinstance(cached, str) and Path(cached) == snapshot / "transformer" / "config.json"
    return snapshot


def _error_lines(result) -> list[str]:
    return [line for line in (result.stderr or result.output).splitlines() if line.startswith("Error:")]


# ----------------------------------------------------------------------------------------------
# Resolving hub ids


def test_hub_id_resolves_from_the_cache_and_a_missing_one_names_the_command(hf_cache: Path) -> None:
    assert resolve_model_folder(REPO_ID) == hf_cache
    with pytest.raises(ModelFormatError) as err:
        resolve_model_folder("tester/not-there")
    assert "`hf download tester/not-there`" in str(err.value) and "--allow-download" in str(err.value)
    with pytest.raises(ModelFormatError, match="HF_HUB_OFFLINE is set"):
        resolve_model_folder("tester/not-there", allow_download=True)


def test_every_model_option_takes_a_cached_hub_id(hf_cache: Path, tmp_path: Path, one_thread) -> None:
    """sample, edit, eval, tokenize --model, train --init and info --model, each offline from the cache."""
    from PIL import Image

    runner = CliRunner()

    def run(*args: str) -> None:
        res = runner.invoke(app, list(args))
        assert res.exit_code == 0, res.output

    run("info", "--model", REPO_ID)
    run("sample", "--model", REPO_ID, "-p", "a red circle", "--steps", "2", "--resolution", "32", "--out",
        str(tmp_path / "samples"))
    (sidecar_path,) = (tmp_path / "samples").glob("*.json")
    sidecar = json.loads(sidecar_path.read_text())
    assert Path(sidecar["model"]) == hf_cache.resolve()

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    run("edit", "--model", REPO_ID, "--image", str(image), "--box", "0,0,16,16", "-p", "a blue square",
        "--steps", "2", "--resolution", "32", "--out", str(tmp_path / "edits"))
    assert len(list((tmp_path / "edits").glob("*.png"))) == 1

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    run("eval", "--prompts", str(prompts), "--model", REPO_ID, "--suite", "shapes", "--steps", "2",
        "--resolution", "32", "--out", str(tmp_path / "eval"))
    assert (tmp_path / "eval" / "report.json").is_file()

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 36), (40 * i, 90, 200)).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"photo {i}")
    run("tokenize", str(photos), "--out", str(tmp_path / "tokens"), "--model", REPO_ID, "--resolution", "32",
        "--device", "cpu")
    info = json.loads((tmp_path / "tokens" / "dataset.json").read_text())
    assert Path(info["models"]["vq"]) == hf_cache.resolve()

    run("train", "--data", str(tmp_path / "tokens"), "--out", str(tmp_path / "run"), "--init", REPO_ID,
        "--resolution", "32", "--batch-size", "2", "--max-steps", "1", "--checkpoint-every", "1", "--device", "cpu")
    assert list((tmp_path / "run").glob("step-*"))

    missing = runner.invoke(app, ["info", "--model", "tester/not-there"])
    assert missing.exit_code == 1
    (line,) = _error_lines(missing)
    assert "`hf download tester/not-there`" in line


@pytest.mark.slow
def test_the_cli_reads_hf_home_in_a_fresh_process(hf_cache: Path) -> None:
    """The real command line (huggingface_hub imported with HF_HOME set), not only the in-process constant."""
    env = {**os.environ, "HF_HOME": os.environ["HF_HOME"], "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "meissonic_cli", "info", "--model", REPO_ID], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert str(hf_cache / "transformer") in "".join(done.stdout.split())  # the title wraps at the table width


# ----------------------------------------------------------------------------------------------
# Variants: names as diffusers / transformers write them


def _diffusers_names(tmp_path: Path, **save: object) -> tuple[set[str], Path, object]:
    from meissonic_cli.model.vq.vqgan import VQTokenizer

    vq = VQTokenizer.tiny(seed=0)
    folder = tmp_path / "vq"
    vq.model.to(torch.float16).save_pretrained(str(folder), variant="fp16", **save)
    return {p.name for p in folder.iterdir()}, folder, vq


def test_variant_names_are_those_diffusers_writes(tmp_path: Path) -> None:
    names, folder, vq = _diffusers_names(tmp_path)
    assert variant_name(TRANSFORMER[0], "fp16") in names
    # A folder holding only the variant: picked, said in one line, read with the VQ's own tensors.
    state = read_weights(folder, *TRANSFORMER)
    expected = {k: v.to(torch.float16) for k, v in vq.model.state_dict().items()}
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)

    sharded, shard_folder, _ = _diffusers_names(tmp_path / "sharded", max_shard_size="20KB")
    index = variant_name(TRANSFORMER[1], "fp16")
    assert index in sharded and index == "diffusion_pytorch_model.safetensors.index.fp16.json"
    shards = sorted(n for n in sharded if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0].startswith("diffusion_pytorch_model.fp16-00001-of-")
    state = read_weights(shard_folder, *TRANSFORMER, variant="fp16")
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # The diffusers VQ loads from such a folder through load_vq, as the pipeline loads it.
    from meissonic_cli.model.vq import load_vq

    loaded = load_vq(shard_folder, variant="fp16")
    assert torch.equal(loaded.model.state_dict()["quantize.embedding.weight"].half(), expected["quantize.embedding.weight"])


def test_variant_names_are_those_transformers_writes(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from meissonic_cli.model.text_encoder import TextEncoder

    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, projection_dim=24, max_position_embeddings=77)
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(cfg).to(torch.float16)
    plain, fp16 = tmp_path / "plain", tmp_path / "fp16"
    model.save_pretrained(str(plain))
    model.save_pretrained(str(fp16), variant="fp16")
    assert (fp16 / variant_name("model.safetensors", "fp16")).is_file() and not (fp16 / "model.safetensors").exists()
    a = TextEncoder.from_pretrained(plain).encode(["a red fox"])
    b = TextEncoder.from_pretrained(fp16).encode(["a red fox"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _variant_only(src: Path, dst: Path, variant: str = "fp16") -> Path:
    """A copy of the tiny folder whose transformer/, text_encoder/ and vqvae/ hold only `variant` weights."""
    from safetensors.torch import save_file

    folder = copy_model_dir(src, dst)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[variant]
    for part, name in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                       ("vqvae", "diffusion_pytorch_model.safetensors")):
        plain = folder / part / name
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in read_safetensors(plain).items()}
        save_file(tensors, str(folder / part / variant_name(name, variant)), metadata={"format": "pt"})
        plain.unlink()
    return folder


def test_a_variant_only_folder_loads_and_says_so_once(tiny_model_dir: Path, tmp_path: Path, capsys, one_thread) -> None:
    from meissonic_cli.sample.pipeline import MeissonicPipeline

    folder = _variant_only(tiny_model_dir, tmp_path / "fp16only")
    capsys.readouterr()
    pipe = MeissonicPipeline.from_pretrained(folder, device="cpu", dtype="fp32")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Note:")]
    assert len(notes) == 1 and "fp16" in notes[0] and "transformer/" in notes[0]
    stored = read_safetensors(folder / "transformer" / "diffusion_pytorch_model.fp16.safetensors")
    assert all(torch.equal(pipe.transformer.state_dict()[k], v.float()) for k, v in stored.items())

    runner = CliRunner()
    res = runner.invoke(app, ["sample", "--model", str(folder), "-p", "a red circle", "--steps", "2",
                              "--resolution", "32", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert sum(line.startswith("Note:") for line in res.stderr.splitlines()) == 1
    res = runner.invoke(app, ["info", "--model", str(folder)])
    assert res.exit_code == 0 and "holds only fp16 weights" in res.stderr


def test_variant_choice_when_both_or_several_are_there(tiny_model_dir: Path, tmp_path: Path) -> None:
    both = copy_model_dir(tiny_model_dir, tmp_path / "both")
    tdir = both / "transformer"
    plain = read_safetensors(tdir / TRANSFORMER[0])
    half = {k: (v * 2).to(torch.float16) for k, v in plain.items()}  # different values: which file was read shows
    from safetensors.torch import save_file

    save_file(half, str(tdir / variant_name(TRANSFORMER[0], "fp16")))
    assert weight_files(tdir, *TRANSFORMER) == [tdir / TRANSFORMER[0]]  # default: the plain files, no note
    assert weight_files(tdir, *TRANSFORMER, variant="fp16") == [tdir / "diffusion_pytorch_model.fp16.safetensors"]
    # Asked for a variant a part lacks: that part reads its plain files; a folder without it at all is an error.
    assert model_variant(both, "fp16") == "fp16" and weight_files(both / "vqvae", *TRANSFORMER, "fp16")[0].name == TRANSFORMER[0]
    with pytest.raises(ModelFormatError, match="holds no bf16 weight files"):
        model_variant(both, "bf16")
    from meissonic_cli.model.transformer import MeissonicTransformer

    model = MeissonicTransformer.from_pretrained(both, variant="fp16")
    assert all(torch.equal(model.state_dict()[k], half[k]) for k in half)

    (tdir / TRANSFORMER[0]).unlink()
    save_file(half, str(tdir / variant_name(TRANSFORMER[0], "bf16")))
    with pytest.raises(ModelFormatError, match="choose one with --variant fp16"):
        pick_variant(tdir, *TRANSFORMER)
    res = CliRunner().invoke(app, ["info", "--model", str(both)])
    assert res.exit_code == 1 and len(_error_lines(res)) == 1
    res = CliRunner().invoke(app, ["info", "--model", str(both), "--variant", "bf16"])
    assert res.exit_code == 0, res.output


def test_a_cache_symlink_to_its_blobs_is_inside_the_model_but_others_are_not(tmp_path: Path) -> None:
    """Sharded weights in an HF cache snapshot link into the repo's blobs/: read; a link elsewhere is refused."""
    names, folder, _ = _diffusers_names(tmp_path / "src", max_shard_size="20KB")
    snapshot = make_hf_cache(folder, tmp_path / "hub")
    assert len(weight_files(snapshot, *TRANSFORMER, "fp16")) > 1
    outside = tmp_path / "elsewhere"
    shutil.copytree(folder, outside)
    shard = sorted(n for n in names if n.endswith(".safetensors"))[0]
    (outside / shard).unlink()
    (outside / shard).symlink_to(snapshot / shard)
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        weight_files(outside, *TRANSFORMER, "fp16")
