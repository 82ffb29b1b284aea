"""Import a pinned pack (tests/upstream.py) as ComfyUI does (a package named after its folder)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from pack_runner import unpack


def import_pack(name: str, custom_nodes: Path):
    """The pack unpacked into `custom_nodes` and imported; returns the module."""
    folder = unpack(name, custom_nodes)
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
