"""Random-weight model files in the formats the other packs' loaders read, their key sets taken from the packs'
own model classes (so the pack must be imported: do it in a process of its own). As a script,
`python pack_models.py MODELS_DIR` writes an AnimateDiff v2 motion module and an IPAdapter Plus (for CLIP
ViT-L image features) under the released names, in MODELS_DIR/animatediff_models and MODELS_DIR/ipadapter."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from pack_runner import ADE, IPA
from safetensors.torch import save_file

MOTION_MODULE, IPADAPTER_PLUS = "mm_sd_v15_v2.ckpt", "ip-adapter-plus_sd15.safetensors"
# SD1.5's 16 cross-attentions in IPAdapter's order (input 1,2,4,5,7,8; output 3..11; middle): their widths
IPA_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    """safetensors, or a weights-only torch file for a .ckpt name (what ComfyUI reads by extension)."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def save_motion_module(path: Path) -> Path:
    """A random v2 motion module (SD1.5, mid block, 1 attention block per transformer: the fewest ADE's loader
    takes)."""
    mm = sys.modules[f"{ADE}.animatediff.motion_module_ad"]
    info = mm.AnimateDiffInfo("SD1.5", mm.AnimateDiffFormat.ANIMATEDIFF, mm.AnimateDiffVersion.V2, path.name)
    probe = {"down_blocks.3.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0."
             "pos_encoder.pe": torch.zeros(1, 32, 1280),
             "mid_block.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(1)}
    gen = torch.Generator().manual_seed(5)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in mm.AnimateDiffModel(probe, info).state_dict().items()}
    return save({k: (torch.randn(s, generator=gen) * 0.02).half() for k, s in shapes.items()}, path)


def save_ipadapter_plus(path: Path, image_width: int) -> Path:
    """A random IPAdapter Plus for SD1.5 (its Resampler: dim 768, 16 queries) reading image features
    `image_width` wide (CLIP vision's penultimate hidden states)."""
    resampler = sys.modules[f"{IPA}.image_proj_models"].Resampler
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16,
                                                   embedding_dim=image_width, output_dim=768,
                                                   ff_mult=4).state_dict().items()}
    gen = torch.Generator().manual_seed(11)
    state = {f"image_proj.{k}": torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    for i, width in enumerate(IPA_WIDTHS):
        for kind in ("k", "v"):
            state[f"ip_adapter.{2 * i + 1}.to_{kind}_ip.weight"] = torch.randn(width, 768, generator=gen) * 0.05
    return save({k: v.half() for k, v in state.items()}, path)


def main(models: Path) -> None:
    from comfy_host import boot, comfyui_root
    from packs import import_pack

    boot(comfyui_root())
    import folder_paths
    with tempfile.TemporaryDirectory() as scratch:
        folder_paths.models_dir = scratch  # the packs make their model folders there: the host stays clean
        for name in (ADE, IPA):
            import_pack(name, Path(scratch))
        for kind in ("animatediff_models", "ipadapter"):
            (models / kind).mkdir(parents=True, exist_ok=True)
        save_motion_module(models / "animatediff_models" / MOTION_MODULE)
        save_ipadapter_plus(models / "ipadapter" / IPADAPTER_PLUS, image_width=1024)  # CLIP ViT-L's width


if __name__ == "__main__":  # run by pack_runner.write_pack_models, with tests/ and tests/isolated/ on the path
    main(Path(sys.argv[1]))
