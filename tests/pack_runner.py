"""Run a check module of tests/isolated/ in a fresh Python: other packs patch ComfyUI when imported or when
sampling, so nothing of theirs may leak into the other tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKS = Path(os.environ.get("ELLA_PACKS", TESTS.parents[1] / "shared" / "packs"))


def run_isolated(name: str) -> None:
    """Run tests/isolated/<name>_checks.py; fail with its output if any check fails."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           str(TESTS / "isolated" / f"{name}_checks.py")], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "ELLA_PACKS": str(PACKS)})
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
