"""Model fixtures shared by test modules: `conftest.py` imports them, so every test module can use
them by name as parameters (import only the helper `copy_model_dir`).

`tiny_model_dir` builds a tiny released-layout model folder (random weights, all five parts) once
per test session; tests must not modify it (copy it with `copy_model_dir` first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meissonic_cli.model.scaffold import build_tiny_model_folder

    return build_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def copy_model_dir(src: Path, dst: Path) -> Path:
    """A private copy of a model folder, for tests that break it."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models are overhead-bound, and on a busy two-core machine
    two threads make each small op wait for the other core (measured 10-50x slower)."""
    # Imported here: conftest imports this module, and most test modules never need torch.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
