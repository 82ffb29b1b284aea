"""The ELLA payload carried inside a CONDITIONING entry's `model_conds`.

ComfyUI copies, repeats and batches `model_conds` values next to `c_crossattn`, so every row of a
batched model call knows which prompt it belongs to, through Combine, areas, timestep ranges and
batch sizes alike.
"""

from __future__ import annotations

import itertools

import comfy.conds
import torch

from ..ella import EllaError

KEY = "ella_prompt"
STAND_IN = 64  # tokens ELLA Text Encode puts in an ELLA-only entry's tensor until the hook replaces them


_KEYS = itertools.count()


class EllaPrompt:
    """T5 features of one prompt plus how its context is assembled. The entry's tensor is `stand_in` tokens
    that ELLA's replace (ELLA only: STAND_IN zeros; ELLA + CLIP: none) followed by tokens that follow ELLA's
    (CLIP's, and whatever Conditioning Concat appended). `key` names the features for the connector's rows:
    given when the prompt is encoded, shared by its variants."""

    def __init__(self, features: torch.Tensor, mask: torch.Tensor, stand_in: int = STAND_IN,
                 key: int | None = None) -> None:
        self.key = next(_KEYS) if key is None else key
        self.features = features  # [1, L, D] on the intermediate device
        self.mask = mask  # [1, L] bool (attended or not) or float token weights (0 = not attended)
        self.stand_in = stand_in
        self.unmasked = bool((mask == 1).all())
        self._placed: tuple[torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def with_clip(self) -> EllaPrompt:
        """The same prompt (same key, so the same rows) in ELLA + CLIP mode: every token of the entry's
        tensor (CLIP's) follows ELLA's."""
        return EllaPrompt(self.features, self.mask, 0, self.key)

    @property
    def length(self) -> int:
        return self.features.shape[1]

    def placed(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and mask on `device` in `dtype`, copied once and then reused at every step."""
        if self._placed is None or self._placed[:2] != (device, dtype):
            self._placed = (device, dtype, self.features.to(device, dtype), self.mask.to(device))
        return self._placed[2], self._placed[3]


NOT_PATCHED = "ELLA conditioning reached a model without ELLA: connect the MODEL through 'Apply ELLA' before the sampler."


class EllaCond(comfy.conds.CONDRegular):
    """`model_conds` value holding one EllaPrompt per batch row (a tuple)."""

    def __init__(self, cond: tuple[EllaPrompt, ...]) -> None:
        self.cond = cond

    def process_cond(self, batch_size: int, **kwargs: object) -> EllaCond:
        """Repeated to the batch size (areas and batch sizes call this before the hook reads the entry)."""
        return EllaCond((self.cond * -(-batch_size // len(self.cond)))[:batch_size])

    def can_concat(self, other: object) -> bool:
        return True  # `size` answers first: an entry reaching the batching still has it only when unpatched

    def size(self) -> list[int]:
        """ComfyUI sizes each entry as it batches them, after Apply ELLA's hook has replaced ELLA's entries:
        one still here means the model was not patched."""
        raise EllaError(NOT_PATCHED)
