"""Our CLIP tokenizer against the training-time tokenizer's ids (../shared/conformance/tokenizer_ids.json).

Every prompt of the reference file is checked (the file is read at test time, so new entries drop
in): the ids the official pipelines get from transformers' slow `CLIPTokenizer` with ftfy, called
with padding="max_length", truncation=True, max_length=77, on a tokenizer folder in the laion
CLIP-ViT-H-14 layout (pad "!" in special_tokens_map.json, "<|endoftext|>" in tokenizer_config.json).
That folder is rebuilt here from our scaffold's files, and its BPE files are checked against the
reference's sha256s first, so a mismatch points at the tokenizer, not the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from meissonic_cli.model.text_encoder import ClipTokenizer

_DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"


def _reference_path() -> Path:
    return Path(os.environ.get("MEISSONIC_CONFORMANCE_DIR", _DEFAULT_DIR)) / "tokenizer_ids.json"


def _entry_names() -> list[str]:
    path = _reference_path()
    if not path.is_file():
        return ["<tokenizer_ids.json missing>"]  # the reference fixture then fails naming the path
    return [p["name"] for p in json.loads(path.read_text(encoding="utf-8"))["prompts"]]


def pytest_generate_tests(metafunc):
    if "entry_name" in metafunc.fixturenames:
        metafunc.parametrize("entry_name", _entry_names())


@pytest.fixture(scope="module")
def reference() -> dict:
    path = _reference_path()
    if not path.is_file():
        pytest.fail(f"tokenizer reference not found at {path}; set MEISSONIC_CONFORMANCE_DIR")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def laion_folder(reference, tmp_path_factory) -> Path:
    """The reference's tokenizer folder: our scaffold's BPE files with the laion pad settings."""
    folder = tmp_path_factory.mktemp("tokenizer")
    ClipTokenizer().save_pretrained(folder)
    spec = reference["tokenizer_folder"]
    for name, digest in spec["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    (folder / "special_tokens_map.json").write_text(json.dumps(spec["special_tokens_map"]))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = spec["tokenizer_config_pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tokenizer(laion_folder) -> ClipTokenizer:
    return ClipTokenizer.from_pretrained(laion_folder)


def test_folder_settings_match_the_reference(reference, tokenizer):
    assert tokenizer.context_length == reference["max_length"]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        reference["bos_token_id"], reference["eos_token_id"], reference["pad_token_id"])
    added = {str(t.id): t.content for t in tokenizer.added.values()}
    assert added == reference["added_tokens"]


def test_prompt_ids_equal_the_training_time_tokenizer(reference, tokenizer, entry_name):
    entry = next(p for p in reference["prompts"] if p["name"] == entry_name)
    ids = tokenizer(entry["prompt"])
    assert ids.shape == (1, reference["max_length"])
    assert ids[0].tolist() == entry["ids"], (entry["category"], entry["prompt"])
    # The pieces too (bos/eos around at most 75 content pieces), which shows where a mismatch starts.
    pieces = tokenizer.tokens(entry["prompt"])[: reference["max_length"] - 2]
    assert ["<|startoftext|>", *pieces, "<|endoftext|>"] == entry["tokens"]
    assert int((ids[0] != tokenizer.pad_id).sum()) <= entry["n_tokens"]


def test_bundled_tokenizer_equals_the_folder(reference, tokenizer):
    """`ClipTokenizer()` (no folder: CLIP's BPE shipped with open_clip, laion layout) gives the same ids."""
    bundled = ClipTokenizer()
    prompts = [p["prompt"] for p in reference["prompts"]]
    assert bundled(prompts).tolist() == tokenizer(prompts).tolist()
