"""ELLA with IPAdapter Plus: tests/isolated/ipadapter_checks.py, in a process of its own."""

from __future__ import annotations

import pytest
from comfy_host import comfyui_root
from pack_runner import IPA, need, run_isolated

ROOT = comfyui_root()


@pytest.mark.skipif(ROOT is None or not (ROOT / "node_helpers.py").is_file(),
                    reason="IPAdapter Plus (2025) imports node_helpers, which the 2024-03 host has not")
def test_ella_with_ipadapter_plus():
    need(IPA)
    run_isolated("ipadapter")
