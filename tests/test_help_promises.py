"""Every promise `--help` makes about behaviour has a test named after it.

A promise is help text (a config field's, or a command's description) that says what the tool will do
on a rerun, across epochs or runs, or never does: "shuffled afresh every epoch", "reruns skip finished
cases", "reproducible with --seed", "never upscale". `test_every_promise_in_help_names_its_tests`
finds them by their words and fails for one that PROMISES does not map to existing tests, so a new
promise needs a test before it ships. The promises no other file tested are tested here.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMISE_WORDS = re.compile(r"afresh|every epoch|resum|rerun|skip|reproduc|same seed|never|deterministic|continues|"
                           r"reload|bit for bit|identical|always", re.I)

# "Class.field" (or "command <name>") -> tests that check the promise.
PROMISES: dict[str, list[str]] = {
    "SynthConfig.seed": ["tests/test_synthetic.py::test_generate_source_is_dirty_deterministic_and_truthful"],
    "CurateConfig.sample_fraction": ["tests/test_curate.py::test_sample_and_limit_are_reproducible"],
    "CurateConfig.limit": ["tests/test_curate.py::test_sample_and_limit_are_reproducible"],
    "CurateConfig.shard_rows": ["tests/test_boundaries.py::test_curate_shard_plan_never_passes_the_row_limit_with_two_files"],
    "CurateConfig.all_histograms": ["tests/test_curate.py::test_counts_match_independent_computation",
                                    "tests/test_curate_schemas.py::test_schema_flag_on_the_cli"],
    "DownloadConfig.resize_only_if_bigger": ["tests/test_help_promises.py::test_download_never_upscales_skips_small_and_elongated_images_and_overwrite_starts_over"],
    "DownloadConfig.min_image_size": ["tests/test_help_promises.py::test_download_never_upscales_skips_small_and_elongated_images_and_overwrite_starts_over"],
    "DownloadConfig.max_aspect_ratio": ["tests/test_help_promises.py::test_download_never_upscales_skips_small_and_elongated_images_and_overwrite_starts_over"],
    "DownloadConfig.overwrite": ["tests/test_help_promises.py::test_download_never_upscales_skips_small_and_elongated_images_and_overwrite_starts_over",
                                "tests/test_download.py::test_download_end_to_end_then_resume"],
    "DownloadConfig.allow_schemes": ["tests/test_hardening.py::test_download_with_only_file_urls_fails_and_keeps_old_output"],
    "EditConfig.out": ["tests/test_edit.py::test_cases_file_writes_sidecars_and_rerun_skips",
                       "tests/test_rerun_identity.py::test_edit_rerun_with_another_setting_does_not_keep_the_old_image"],
    "SampleConfig.out": ["tests/test_sample_cli.py::test_sample_writes_images_sidecars_grid_and_resumes",
                         "tests/test_rerun_identity.py::test_sample_rerun_with_another_setting_does_not_keep_the_old_image"],
    "SampleConfig.exact": ["tests/test_parity_sample.py::test_exact_is_reproducible_per_seed"],
    "SampleConfig.vq_decode": ["tests/test_vq_banded.py::test_whole_decode_is_diffusers_decode_bit_for_bit",
                               "tests/test_rerun_identity.py::test_sample_rerun_with_another_setting_does_not_keep_the_old_image"],
    "TrainConfig.shuffle": ["tests/test_help_promises.py::test_shuffle_is_afresh_every_epoch_and_deterministic_from_seed",
                            "tests/test_multinode.py::test_train_shuffles_afresh_every_epoch"],
    "TrainConfig.max_steps": ["tests/test_train.py::test_resume_reproduces_the_uninterrupted_run"],
    "TrainConfig.weight_decay": ["tests/test_behaviour_guards.py::test_weight_decay_only_on_matrices_and_the_text_encoder_lr",
                                 "tests/test_behaviour_guards.py::test_no_decay_for_parameters_named_embedding_and_frozen_ones_do_not_stop_the_walk"],
    "TrainConfig.checkpoint_every": ["tests/test_help_promises.py::test_checkpoint_every_n_steps_and_always_at_the_end"],
    "TrainConfig.nan_patience": ["tests/test_train.py::test_nan_guard_skips_bad_steps_then_reloads_the_last_checkpoint"],
    "TrainConfig.ema_warmup": ["tests/test_train_logging.py::test_ema_equals_diffusers_ema_model_after_n_steps",
                               "tests/test_train_logging.py::test_a_checkpoint_from_before_warm_up_resumes_with_constant_decay"],
    "TrainConfig.report_to": ["tests/test_train_logging.py::test_wandb_offline_run_is_written_and_resumed_under_the_same_id"],
    "command distill": ["tests/test_distill.py::test_resume_is_bit_identical_and_checkpoints_are_guidance_models",
                        "tests/test_distill.py::test_lora_distillation_adapts_the_guidance_embedding_too"],
    "command download": ["tests/test_download.py::test_download_end_to_end_then_resume"],
    "command tokenize": ["tests/test_tokenize.py::test_resume_skips_complete_and_redoes_partial",
                         "tests/test_multinode.py::test_tokenize_under_two_node_torchrun_splits_input_shards_by_global_rank"],
    "command sample": ["tests/test_sample_cli.py::test_sample_writes_images_sidecars_grid_and_resumes"],
    "command edit": ["tests/test_edit.py::test_cases_file_writes_sidecars_and_rerun_skips"],
}


def promises_in_help() -> dict[str, str]:
    """Every config field help and command description under meissonic_cli that makes a promise."""
    import meissonic_cli
    from meissonic_cli.cli import app

    found: dict[str, str] = {}
    for info in pkgutil.walk_packages(meissonic_cli.__path__, "meissonic_cli."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__:
                # A field a config inherits unchanged is its base's promise (DistillConfig <- TrainConfig).
                inherited = {(f.name, f.metadata.get("help")) for base in cls.__mro__[1:]
                             if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
                for f in dataclasses.fields(cls):
                    text = f.metadata.get("help", "")
                    if text and PROMISE_WORDS.search(text) and (f.name, text) not in inherited:
                        found[f"{cls.__name__}.{f.name}"] = text
    for command in app.registered_commands:
        text = command.callback.__doc__ or ""
        if PROMISE_WORDS.search(text):
            found[f"command {command.name}"] = " ".join(text.split())
    return found


def test_every_promise_in_help_names_its_tests():
    found = promises_in_help()
    missing = {k: v for k, v in found.items() if k not in PROMISES}
    assert not missing, f"help text that promises behaviour without a test in PROMISES: {missing}"
    stale = sorted(set(PROMISES) - set(found))
    assert not stale, f"PROMISES entries whose help text no longer promises: {stale}"
    for key, tests in PROMISES.items():
        for node in tests:
            path, _, name = node.partition("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), (key, node)


def test_shuffle_is_afresh_every_epoch_and_deterministic_from_seed(tmp_path):
    """TrainConfig.shuffle: "Shuffle shard order and samples within each shard, afresh every epoch
    (deterministic from --seed)"."""
    from test_train import make_token_dataset

    from meissonic_cli.data.shards import ShardStream, list_token_shards

    data = make_token_dataset(tmp_path / "data", shards=6, per_shard=5)
    shards = list_token_shards(data)

    def epochs(seed: int, n: int = 3) -> list[list[str]]:
        stream = ShardStream(shards, seed=seed, shuffle=True, epochs=n)
        keys = [s.key for s in stream]
        return [keys[e * 30:(e + 1) * 30] for e in range(n)]

    first = epochs(0)
    assert all(sorted(e) == sorted(first[0]) for e in first)  # every sample once per epoch
    shard_of = {f"s{k:05d}": k // 5 for k in range(30)}
    shard_orders = [list(dict.fromkeys(shard_of[k] for k in e)) for e in first]
    # Afresh every epoch: the shard order changes, and so does the order inside a shard.
    assert len({tuple(o) for o in shard_orders}) == 3, shard_orders
    within = [[k for k in e if shard_of[k] == 0] for e in first]
    assert len({tuple(w) for w in within}) > 1, within
    assert shard_orders[0] != list(range(6))  # shuffled at all
    # Deterministic from --seed: the same seed repeats the whole sequence, another seed does not.
    assert epochs(0) == first and epochs(1) != first


def test_checkpoint_every_n_steps_and_always_at_the_end(tmp_path):
    """TrainConfig.checkpoint_every: "Write a checkpoint step-NNNNNNNN/ every this many steps (and always at the end)"."""
    from test_train import cfg_for, make_token_dataset

    from meissonic_cli.train.trainer import train

    data = make_token_dataset(tmp_path / "data", shards=2, per_shard=4)
    train(cfg_for(tmp_path, data, max_steps=5, checkpoint_every=2, batch_size=2, log_every=5))
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("step-*"))
    assert steps == [2, 4, 5]


@pytest.mark.slow
def test_download_never_upscales_skips_small_and_elongated_images_and_overwrite_starts_over(tmp_path):
    """DownloadConfig: resize_only_if_bigger ("never upscale small ones"), min_image_size and max_aspect_ratio
    ("Skip images whose ..."), overwrite ("Delete an existing output directory and start over")."""
    import io
    import tarfile

    import pyarrow.parquet as pq
    from PIL import Image

    from meissonic_cli.data.download import DownloadConfig, download
    from meissonic_cli.shapes.source import ImageServer, generate_source

    def saved(out: Path) -> dict[str, tuple[int, int]]:
        sizes = {}
        for tar in sorted(out.glob("*.tar")):
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.loads(t.extractfile(m).read())
                        img = t.extractfile(m.name[:-5] + ".jpg").read()
                        sizes[meta["url"]] = Image.open(io.BytesIO(img)).size
        return sizes

    with ImageServer(tmp_path / "source") as server:
        source = generate_source(tmp_path / "source", rows=24, base_url=server.url, seed=5, sides=(48, 96))
        rows = [r for r in pq.read_table(source.parquet_files[0]).to_pylist() if "/missing/" not in r["URL"]]
        originals = {}
        for r in rows:
            with Image.open(tmp_path / "source" / "images" / r["URL"].rsplit("/", 1)[1]) as im:
                originals[r["URL"]] = im.size
        out = tmp_path / "shards"
        # A large target size with resize_only_if_bigger: every image keeps its own size (no upscaling).
        download(DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(out), image_size=512,
                                resize_only_if_bigger=True, resize_mode="keep_ratio", threads=2, processes=1, timeout=5))
        got = saved(out)
        assert got and all(size == originals[url] for url, size in got.items())
        old = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        # min_image_size and max_aspect_ratio skip exactly the images below / beyond them; --overwrite starts over.
        download(DownloadConfig(inputs=[str(source.parquet_files[0])], output=str(out), image_size=512,
                                resize_only_if_bigger=True, resize_mode="keep_ratio", min_image_size=60,
                                max_aspect_ratio=1.5, overwrite=True, threads=2, processes=1, timeout=5))
        got = saved(out)
        expected = {u for u, (w, h) in originals.items() if min(w, h) >= 60 and max(w, h) / min(w, h) <= 1.5}
        assert set(got) == expected and expected and len(expected) < len(originals)
        assert all(old[p.name] != p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in old)
