"""Shared pytest setup: the repository root on sys.path, and the test data that ships in tests/data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    """The real T5 vocabulary (tokenizer.json): tests/data/t5_tokenizer, or $ELLA_T5_TOKENIZER_DIR."""
    from t5_fixtures import REAL_TOKENIZER_DIR

    if not (REAL_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"test data missing: {REAL_TOKENIZER_DIR}/tokenizer.json")
    return REAL_TOKENIZER_DIR


@pytest.fixture(scope="module")
def state():
    """The tiny T5's weights (seed 0), as the T5 tests build their folders from."""
    from t5_fixtures import tiny_t5_state_dict

    return tiny_t5_state_dict(seed=0)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder (config, weights, tokenizer) of the tiny T5, once per test module."""
    from t5_fixtures import make_t5_folder

    return make_t5_folder(tmp_path_factory.mktemp("t5"), "hf")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny models (several threads spin-wait against each other on a loaded
    machine); use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
