"""Unpack a pack from ../shared/packs and import it as ComfyUI does (a package named after its folder)."""

from __future__ import annotations

import importlib.util
import os
import sys
import tarfile
from pathlib import Path

PACKS = Path(os.environ.get("ELLA_PACKS", Path(__file__).resolve().parents[3] / "shared" / "packs"))


def import_pack(name: str, custom_nodes: Path):
    """`name`.tar.gz unpacked into `custom_nodes` and imported; returns the module."""
    with tarfile.open(PACKS / f"{name}.tar.gz") as tar:
        tar.extractall(custom_nodes, filter="data")
    spec = importlib.util.spec_from_file_location(name, custom_nodes / name / "__init__.py",
                                                  submodule_search_locations=[str(custom_nodes / name)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
