"""Tiny random-weight models a real ComfyUI server loads: an SD1.5 checkpoint (one-level UNet, full-size
CLIP-L text model and VAE, since ComfyUI builds those from fixed configs) and a matching ControlNet."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

VAE_CONFIG = {"z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4],
              "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
UNET_CONFIG = dict(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                   channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                   transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768, legacy=False,
                   use_linear_in_transformer=False)


def scaled_random(module: torch.nn.Module, prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Variance-preserving random weights: N(0, 1/fan_in) matrices, unit norm scales, zero biases."""
    out = {}
    for name, p in module.state_dict().items():
        if p.dim() > 1:
            fan_in = math.prod(p.shape[1:])
            value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        elif name.endswith("weight"):  # 1-D weights are norm scales in these architectures
            value = torch.ones(p.shape)
        else:
            value = torch.zeros(p.shape)
        out[prefix + name] = value.to(torch.float16)
    return out


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """An SD1.5 checkpoint ComfyUI's CheckpointLoaderSimple detects and loads whole."""
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ComfyUI's CLIP copies an identity projection in at construction
        clip = comfy.sd1_clip.SDClipModel()
    state = scaled_random(UNetModel(**UNET_CONFIG, operations=comfy.ops.disable_weight_init),
                          "model.diffusion_model.", gen)
    state |= scaled_random(clip, "cond_stage_model.", gen)
    state |= scaled_random(Encoder(double_z=True, **VAE_CONFIG), "first_stage_model.encoder.", gen)
    state |= scaled_random(Decoder(**VAE_CONFIG), "first_stage_model.decoder.", gen)
    state |= scaled_random(torch.nn.Conv2d(8, 8, 1), "first_stage_model.quant_conv.", gen)
    state |= scaled_random(torch.nn.Conv2d(4, 4, 1), "first_stage_model.post_quant_conv.", gen)
    save_file(state, str(path))
    return path


def save_tiny_controlnet(path: Path, seed: int = 1) -> Path:
    """A ControlNet for the tiny UNet, in the original (control_model.*) layout."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in UNET_CONFIG.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
    save_file(scaled_random(net, "control_model.", torch.Generator().manual_seed(seed)), str(path))
    return path
