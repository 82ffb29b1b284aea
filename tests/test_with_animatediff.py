"""ELLA with AnimateDiff-Evolved: tests/isolated/animatediff_checks.py, in a process of its own."""

from __future__ import annotations

import pytest
from comfy_host import comfyui_root
from pack_runner import ADE, need, run_isolated

ROOT = comfyui_root()


@pytest.mark.skipif(ROOT is None or not (ROOT / "comfy" / "patcher_extension.py").is_file(),
                    reason="AnimateDiff-Evolved (2026) needs ComfyUI's keyed wrappers; the 2024-03 host has none")
def test_ella_with_animatediff_evolved():
    need(ADE)
    run_isolated("animatediff")
