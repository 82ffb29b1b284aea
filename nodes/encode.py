"""ELLA Text Encode: prompt -> T5 features carried in a CONDITIONING for Apply ELLA's hook."""

from __future__ import annotations

import torch

from ..ella import EllaError
from .loaders import CATEGORY
from .payload import KEY, STAND_IN, EllaCond
from .t5_handle import T5Handle

CONTEXT_WIDTH = 768  # SD1.5's cross-attention width


class EllaTextEncode:
    """T5 + text (+ optional CLIP conditioning) -> CONDITIONING."""

    DESCRIPTION = ("Encodes a prompt with T5 for ELLA. Sample with a MODEL that went through 'Apply ELLA': at every "
                   "step the connector turns these features into the UNet's context for that step's timestep. "
                   "Connect a CLIP Text Encode to clip_conditioning to append CLIP's tokens after ELLA's (keeps "
                   "trigger words, embeddings and weights working on community checkpoints).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "t5": ("ELLA_T5", {"tooltip": "From 'Load T5 Encoder (ELLA)'."}),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt; long, dense prompts work."}),
                "token_length": (["flexible", "fixed"], {"default": "flexible", "tooltip": (
                    "flexible: the prompt's own length (the authors' advice for short prompts). fixed: padded or "
                    "cut to fixed_tokens, as in training.")}),
                "fixed_tokens": ("INT", {"default": 128, "min": 1, "max": 512, "tooltip": (
                    "Length in fixed mode (128 in training).")}),
            },
            "optional": {
                "clip_conditioning": ("CONDITIONING", {"tooltip": (
                    "Optional CLIP Text Encode output: its tokens follow ELLA's 64 (ELLA + CLIP mode).")}),
            },
        }

    def encode(self, t5: T5Handle, text: str, token_length: str, fixed_tokens: int,
               clip_conditioning: list | None = None) -> tuple[list]:
        prompt = t5.prompt(text, fixed_tokens if token_length == "fixed" else None)
        if clip_conditioning is None:
            placeholder = torch.zeros(1, STAND_IN, CONTEXT_WIDTH)  # replaced by ELLA's tokens at every step
            return ([[placeholder, {"model_conds": {KEY: EllaCond((prompt,))}}]],)
        if any(KEY in extras.get("model_conds", {}) for _, extras in clip_conditioning):
            raise EllaError("ELLA Text Encode: clip_conditioning must come from a CLIP Text Encode, "
                            "not from another ELLA Text Encode.")
        out = []
        for clip_tokens, extras in clip_conditioning:
            row = prompt.with_clip()
            out.append([clip_tokens, {**extras, "model_conds": {**extras.get("model_conds", {}), KEY: EllaCond((row,))}}])
        return (out,)
