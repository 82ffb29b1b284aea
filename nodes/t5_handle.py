"""T5 under ComfyUI's memory management, with a small cache so unchanged prompts are not re-encoded."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import torch

from .. import ella
from ..ella.t5 import resolve_dtype
from .host import HOST
from .payload import EllaPrompt

CACHE_SIZE = 64
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")  # auto: fp16 on CUDA (what ELLA was trained with), else fp32


class _Holder(torch.nn.Module):
    """What ComfyUI manages: current hosts set `module.device`, a read-only property on transformers models."""

    def __init__(self, t5: torch.nn.Module) -> None:
        super().__init__()
        self.t5 = t5


class T5Handle:
    """The ELLA_T5 value: a T5 encoder that ComfyUI loads to its text encoder device to encode."""

    def __init__(self, path: Path, dtype_choice: str = "auto", roots: list[Path] | None = None) -> None:
        load_device = mm.text_encoder_device()
        offload_device = mm.text_encoder_offload_device()
        dtype = resolve_dtype(None if dtype_choice == "auto" else dtype_choice, load_device)
        self.encoder = ella.load_t5(path, device=offload_device, dtype=dtype, roots=roots)
        self.patcher = comfy.model_patcher.ModelPatcher(
            _Holder(self.encoder.model), load_device=load_device, offload_device=offload_device)
        self.encodes = 0
        self._cache: OrderedDict[tuple[str, int | None], EllaPrompt] = OrderedDict()

    def prompt(self, text: str, max_length: int | None) -> EllaPrompt:
        """The EllaPrompt of `text` (flexible length when max_length is None; ComfyUI weighting markup read),
        from cache if seen."""
        key = (text, max_length)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        mm.throw_exception_if_processing_interrupted()
        mm.load_models_gpu([self.patcher], **HOST.full_load)
        encoded = self.encoder.encode([text], max_length=max_length, weighted=True,
                                      interrupt=mm.throw_exception_if_processing_interrupted)
        self.encodes += 1
        keep = mm.intermediate_device()
        prompt = EllaPrompt(encoded.features.to(keep), encoded.connector_mask.to(keep))
        self._cache[key] = prompt
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return prompt
