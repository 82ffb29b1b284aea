"""T5 under ComfyUI's memory management (or kept on the CPU), with a small cache so unchanged prompts are
not re-encoded."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import torch

from .. import ella
from ..ella.t5 import resolve_dtype
from ..ella.t5_int8 import stored_parts
from .host import HOST
from .payload import EllaPrompt

CACHE_SIZE = 64
# auto: fp16 on CUDA (what ELLA was trained with), else fp32; fp8_*: linear weights stored in fp8, computed in auto's
# dtype; int8: linear weights in int8 with int8 kernels (torchao), CPU only
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "int8")
_STORAGE_CHOICES = ("fp8_e4m3fn", "fp8_e5m2", "int8")
DEVICE_CHOICES = ("auto", "cpu")  # auto: ComfyUI's text encoder device, under its memory management
_TIED = "t5.encoder.embed_tokens.weight"


class _Holder(torch.nn.Module):
    """What ComfyUI manages: ComfyUI sets `module.device`, a read-only property on transformers models.
    Its state dict lists the embedding once (T5's input embedding is tied to it) and an int8 weight as the
    tensors that hold it (values and scales), so that ComfyUI's memory accounting, which sums the state dict,
    counts each weight once, at its stored size."""

    def __init__(self, t5: torch.nn.Module) -> None:
        super().__init__()
        self.t5 = t5

    def state_dict(self, *args: object, **kwargs: object) -> dict:
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.endswith(_TIED)]:
            del state[key]
        for key in [k for k, v in state.items() if hasattr(type(v), "__tensor_flatten__")]:
            state.update(stored_parts(key, state.pop(key)))
        return state


def load_progress() -> Callable[[int, int], None]:
    """A progress callback for ella.load_t5 that drives the host's progress bar (the node's, in the page)
    and stops the load when the user cancels."""
    bar: list[comfy.utils.ProgressBar] = []

    def update(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)

    return update


class T5Handle:
    """The ELLA_T5 value: a T5 encoder that ComfyUI loads to its text encoder device to encode, or that
    stays on the CPU (device_choice "cpu"; the features still go where sampling reads them)."""

    def __init__(self, path: Path, dtype_choice: str = "auto", roots: list[Path] | None = None,
                 device_choice: str = "auto", progress: Callable[[int, int], None] | None = None) -> None:
        if device_choice not in DEVICE_CHOICES:
            raise ella.EllaError(f"Unknown T5 device {device_choice!r}; expected one of {', '.join(DEVICE_CHOICES)}.")
        self.managed = device_choice == "auto"
        load_device = mm.text_encoder_device() if self.managed else torch.device("cpu")
        offload_device = mm.text_encoder_offload_device() if self.managed else torch.device("cpu")
        if dtype_choice == "int8" and load_device.type != "cpu":
            raise ella.EllaError(f"T5 dtype int8 runs on the CPU only, and device auto would encode on {load_device}: "
                                 "set Load T5 Encoder (ELLA)'s device to cpu for int8, or pick fp8_e4m3fn or fp16 "
                                 "to encode on the GPU.")
        storage = dtype_choice if dtype_choice in _STORAGE_CHOICES else None
        dtype = resolve_dtype(None if dtype_choice == "auto" or storage else dtype_choice, load_device)
        self.encoder = ella.load_t5(path, device=offload_device, dtype=dtype, storage_dtype=storage, roots=roots,
                                    progress=progress)
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
        if self.managed:  # "cpu": never handed to the memory manager, so never moved
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
