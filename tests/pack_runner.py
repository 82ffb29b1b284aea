"""Other packs in tests: pinned upstream trees (tests/upstream.py) unpacked into a folder of custom nodes, and
what runs in a fresh Python (other packs patch ComfyUI when imported or when sampling, so nothing of theirs may
leak into the other tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import upstream

TESTS = Path(__file__).resolve().parent
ADE, IPA, DIST = "ComfyUI-AnimateDiff-Evolved", "ComfyUI_IPAdapter_plus", "ComfyUI-Distributed"
# the shipped workflows that need other packs, and which (ella_distributed.json also runs on a master and a worker
# in tests/test_distributed.py)
WORKFLOW_PACKS = {"ella_animatediff.json": (ADE,), "ella_ipadapter.json": (IPA,), "ella_distributed.json": (DIST,)}


def need(*names: str) -> None:
    """Skip the test, with one line saying what is missing, unless every pack is in ../shared or fetchable."""
    missing = {}
    for name in names:
        try:
            upstream.archive(name)
        except upstream.Missing as error:
            missing[name] = str(error)
    if missing:
        first, *others = missing
        pytest.skip(missing[first] + (f" (also missing: {', '.join(others)})" if others else ""))


def unpack(name: str, custom_nodes: Path) -> Path:
    """The pack unpacked into `custom_nodes`, as a user installs it; returns its folder."""
    return upstream.unpack(name, custom_nodes)


def _python(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=TESTS.parent, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS / "isolated")])})


def run_isolated(name: str) -> None:
    """Run tests/isolated/<name>_checks.py; fail with its output if any check fails."""
    done = _python(["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                    str(TESTS / "isolated" / f"{name}_checks.py")])
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]


def write_pack_models(models: Path) -> None:
    """The other packs' random model files under their released names in `models` (tests/isolated/pack_models.py)."""
    done = _python([str(TESTS / "isolated" / "pack_models.py"), str(models)])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
