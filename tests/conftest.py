"""Shared pytest setup: the repository root on sys.path, and the shared test data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    """The real T5 vocabulary (tokenizer.json) shipped in ../shared/data for tests."""
    path = SHARED_DATA / "t5_tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"test data missing: {path}/tokenizer.json (clone the repo beside ../shared)")
    return path
