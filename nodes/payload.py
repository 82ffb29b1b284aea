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


_KEYS = itertools.count()


class EllaPrompt:
    """T5 features of one prompt plus how its context is assembled (ELLA only, or ELLA + CLIP). `key` names
    the features for the connector's rows: given when the prompt is encoded, shared by its ELLA + CLIP
    variants (`with_clip`)."""

    def __init__(self, features: torch.Tensor, mask: torch.Tensor, clip_tokens: int = 0, key: int | None = None) -> None:
        self.key = next(_KEYS) if key is None else key
        self.features = features  # [1, L, D] on the intermediate device
        self.mask = mask  # [1, L] bool (attended or not) or float token weights (0 = not attended)
        self.clip_tokens = clip_tokens  # 0: ELLA only; else CLIP tokens appended after ELLA's
        self.unmasked = bool((mask == 1).all())
        self._placed: tuple[torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def with_clip(self, clip_tokens: int) -> EllaPrompt:
        """The same prompt (same key, so the same rows) with `clip_tokens` CLIP tokens after ELLA's."""
        return EllaPrompt(self.features, self.mask, clip_tokens, self.key)

    @property
    def length(self) -> int:
        return self.features.shape[1]

    def placed(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and mask on `device` in `dtype`, copied once and then reused at every step."""
        if self._placed is None or self._placed[:2] != (device, dtype):
            self._placed = (device, dtype, self.features.to(device, dtype), self.mask.to(device))
        return self._placed[2], self._placed[3]


NOT_PATCHED = "ELLA conditioning reached a model without ELLA: connect the MODEL through 'Apply ELLA' before the sampler."


class EllaRows(tuple):
    """The batched payload: one EllaPrompt per row. ELLA's hook removes it before the model call; a model
    without the hook hands it to the UNet as an extra input, and the 2024-03 host first reads `.dtype`."""

    @property
    def dtype(self) -> torch.dtype:
        raise EllaError(NOT_PATCHED)


class EllaCond(comfy.conds.CONDRegular):
    """`model_conds` value holding one EllaPrompt per batch row (a tuple)."""

    def __init__(self, cond: tuple[EllaPrompt, ...]) -> None:
        self.cond = cond

    def process_cond(self, batch_size: int, device: object = None, **kwargs: object) -> EllaCond:
        """Repeated to the batch size (the 2024-03 host batches the payload for its model-call hook)."""
        return EllaCond((self.cond * -(-batch_size // len(self.cond)))[:batch_size])

    def size(self) -> list[int]:
        """Hosts that size each entry before batching are those where Apply ELLA's hook has already replaced
        ELLA entries: one still here means the model was not patched."""
        raise EllaError(NOT_PATCHED)

    def can_concat(self, other: object) -> bool:
        """Rows batch when their CLIP parts have one length (CLIP rows are padded by repetition)."""
        return isinstance(other, EllaCond) and {p.clip_tokens for p in self.cond + other.cond} == {
            self.cond[0].clip_tokens}

    def concat(self, others: list[EllaCond]) -> EllaRows:
        return EllaRows(self.cond + tuple(p for o in others for p in o.cond))
