"""Nodes that load ELLA's two models: the connector and the T5 encoder."""

from __future__ import annotations

import comfy.model_management as mm

from .ella_handle import EllaHandle
from .folders import ella_files, ella_path, t5_choices, t5_path, t5_root
from .t5_handle import DEVICE_CHOICES, DTYPE_CHOICES, T5Handle, load_progress

CATEGORY = "conditioning/ELLA"


class LoadEllaModel:
    """Load Model -> ELLA_CONNECTOR."""

    DESCRIPTION = ("Loads ELLA's timestep-aware connector (ella-sd1.5-tsc-t5xl.safetensors) from models/ella. "
                   "Connect it to 'Apply ELLA'.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ELLA_CONNECTOR",)
    RETURN_NAMES = ("ella",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"ella_name": (ella_files(), {
            "tooltip": "Connector file in models/ella (ella-sd1.5-tsc-t5xl.safetensors, 134 MB)."})}}

    def load(self, ella_name: str) -> tuple[EllaHandle]:
        return (EllaHandle(ella_path(ella_name), mm.unet_dtype()),)


class LoadT5Encoder:
    """Load T5 -> ELLA_T5."""

    DESCRIPTION = ("Loads the FLAN-T5-XL text encoder ELLA reads prompts with: a folder (Hugging Face layout, "
                   "HF cache, or the authors' models--google--flan-t5-xl--text_encoder) or one encoder-only "
                   ".safetensors file from models/text_encoders, models/clip or models/ella_encoder.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ELLA_T5",)
    RETURN_NAMES = ("t5",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "t5_name": (sorted(t5_choices()), {"tooltip": "T5 folder or encoder file."}),
            "dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": (
                "auto: fp16 on a GPU (what ELLA was trained with), fp32 on CPU. bf16 or fp32 on a GPU "
                "change images noticeably. fp8_e4m3fn / fp8_e5m2: the linear layers' weights stored in 8 bits "
                "(about half of fp16's memory), computed as auto does; features move from fp16's, so check your images. "
                "int8 (device cpu; needs torchao): linear layers in int8 with int8 kernels, about 30% of fp32's "
                "memory and about 0.3x its encode time, features much closer to fp32's than fp8's.")}),
        }, "optional": {  # optional: workflows saved before it existed load and run as before (auto)
            "device": (list(DEVICE_CHOICES), {"default": "auto", "tooltip": (
                "auto: ComfyUI moves T5 to the GPU to encode and off it when the UNet needs room. cpu: T5 "
                "never goes to the GPU (slower encodes, once per new prompt); the card holds only the UNet.")}),
        }}

    def load(self, t5_name: str, dtype: str, device: str = "auto") -> tuple[T5Handle]:
        path = t5_path(t5_name)
        return (T5Handle(path, dtype, roots=[t5_root(t5_name, path)], device_choice=device,
                         progress=load_progress()),)
