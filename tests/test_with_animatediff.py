"""ELLA with AnimateDiff-Evolved: runs tests/isolated/animatediff_checks.py in a process of its own, since the
pack patches ComfyUI when imported and when sampling (nothing of it may leak into the other tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_host import comfyui_root

ROOT = comfyui_root()
TESTS = Path(__file__).resolve().parent
PACKS = Path(os.environ.get("ELLA_PACKS", TESTS.parents[1] / "shared" / "packs"))


def run_isolated(name: str) -> None:
    """Run tests/isolated/<name>_checks.py in a fresh Python; fail with its output if any check fails."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           str(TESTS / "isolated" / f"{name}_checks.py")], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "ELLA_PACKS": str(PACKS)})
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]


@pytest.mark.skipif(ROOT is None or not (ROOT / "comfy" / "patcher_extension.py").is_file(),
                    reason="AnimateDiff-Evolved (2026) needs ComfyUI's keyed wrappers; the 2024-03 host has none")
@pytest.mark.skipif(not (PACKS / "ComfyUI-AnimateDiff-Evolved.tar.gz").is_file(), reason="no ../shared/packs")
def test_ella_with_animatediff_evolved():
    run_isolated("animatediff")
