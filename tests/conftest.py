"""Shared test set-up: no network, small thread counts, isolated caches."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub / img2dataset / albumentations.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads yield instead of spinning: on a 2-core machine spinning threads make torch
# several times slower whenever anything else runs. Must be set before torch is first imported,
# which happens at collection, before `meissonic demo` could set it itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Model fixtures, registered here so test modules take them as parameters without importing them.
from fixtures_models import one_thread, tiny_model_dir  # noqa: E402, F401

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own HF/torch cache dirs, so nothing reads or writes the user's caches."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    yield


@pytest.fixture(autouse=True)
def _restore_pil_pixel_limit():
    """PIL's decompression-bomb limit is process-wide state that `safety.configure_pil` sets from
    MEISSONIC_MAX_IMAGE_PIXELS; a test that lowers the limit must not leave it lowered for the next."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """Directory of official reference vectors (MEISSONIC_CONFORMANCE_DIR, default ../shared/conformance)."""
    path = Path(os.environ.get("MEISSONIC_CONFORMANCE_DIR", REPO_ROOT.parent / "shared" / "conformance"))
    if not (path / "cases.json").is_file():
        pytest.fail(f"conformance vectors not found at {path}; set MEISSONIC_CONFORMANCE_DIR")
    return path
