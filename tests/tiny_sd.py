"""The one place tests and the bench build SD1.5-architecture models with random weights: a tiny UNet
checkpoint, a whole tiny SD1.5 checkpoint (one-level UNet, full-size CLIP-L text model and VAE, since ComfyUI
builds those from fixed configs) and a matching ControlNet, and a ComfyUI model in memory (tiny or SD1.5's
full layout); and, for the library's diffusers pipelines, a tiny diffusers UNet and VAE. Imports ComfyUI and
diffusers only inside its functions (boot the host first)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

VAE_CONFIG = {"z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4],
              "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# SD1.5's own UNet layout (859.5 M parameters): attention in the first three of its four levels
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, context_dim=768,
                 use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, adm_in_channels=None)
# one level, one res block, one transformer: 25.8 M parameters, detected as SD15
UNET_CONFIG = dict(SD15_UNET, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1])


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


def save_tiny_unet(path: Path, context_dim: int = 768, linear: bool = False, seed: int = 0) -> Path:
    """The tiny UNet (N(0, 0.02^2) weights) alone as a checkpoint, which ComfyUI detects as SD15 (or as SD2
    with context_dim 1024 and linear transformers)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    heads = dict(num_heads=8, num_head_channels=-1) if context_dim == 768 else dict(num_heads=-1, num_head_channels=64)
    unet = UNetModel(**dict(UNET_CONFIG, context_dim=context_dim, use_linear_in_transformer=linear, **heads),
                     operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    state = {f"model.diffusion_model.{k}": torch.randn(v.shape, generator=gen) * 0.02
             for k, v in unet.state_dict().items()}
    if linear:  # ComfyUI reads SD2's prediction type off this key of the full-size UNet
        state["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"] = torch.zeros(320)
    save_file(state, str(path))
    return path


def random_sd15(tiny: bool, dtype: torch.dtype | None = None):
    """A ComfyUI SD1.5 model (ModelPatcher) of the tiny or the full layout with variance-preserving random
    weights, stored and computing in `dtype` if given, else in what ComfyUI picks for a real SD1.5 file here."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET_CONFIG if tiny else SD15_UNET))
    device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=860_000_000)
        config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, device))
    else:
        config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def save_tiny_checkpoint(path: Path, seed: int = 0, full_layout: bool = False) -> Path:
    """An SD1.5 checkpoint ComfyUI's CheckpointLoaderSimple detects and loads whole: the tiny UNet, or with
    `full_layout` SD1.5's own (2.1 GB in fp16; what packs that inject into every UNet level need)."""
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ComfyUI's CLIP copies an identity projection in at construction
        clip = comfy.sd1_clip.SDClipModel()
    with torch.device("meta"):  # shapes only
        unet = UNetModel(**(SD15_UNET if full_layout else UNET_CONFIG), operations=comfy.ops.disable_weight_init)
    state = scaled_random(unet, "model.diffusion_model.", gen)
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

    config = {k: v for k, v in UNET_CONFIG.items() if k not in ("out_channels", "adm_in_channels")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
    save_file(scaled_random(net, "control_model.", torch.Generator().manual_seed(seed)), str(path))
    return path


def save_clip_vision_vit_l(path: Path, seed: int = 2) -> Path:
    """A CLIP vision ViT-L/14 (304 M parameters, 0.6 GB in fp16): the smallest image encoder ComfyUI's
    clip_vision loader detects, in the layout it reads."""
    import json

    import comfy.clip_model
    import comfy.ops

    config = json.loads((Path(comfy.clip_model.__file__).parent / "clip_vision_config_vitl.json").read_text())
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
    save_file(scaled_random(model, "", torch.Generator().manual_seed(seed)), str(path))
    return path


def tiny_diffusers_sd(cross_attention_dim: int = 32):
    """A tiny diffusers SD-architecture UNet (two levels, 8x8 samples) and VAE (scale 2), seeded random weights,
    for the library's pipelines (no ComfyUI): (unet, vae)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    return unet, vae
