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
    (CLIP's, and whatever Conditioning Concat appended); `tokens` is that tensor's length. `key` names the
    features for the connector's rows: given when the prompt is encoded, shared by its variants."""

    def __init__(self, features: torch.Tensor, mask: torch.Tensor, stand_in: int = STAND_IN, key: int | None = None,
                 tokens: int | None = None) -> None:
        self.key = next(_KEYS) if key is None else key
        self.features = features  # [1, L, D] on the intermediate device
        self.mask = mask  # [1, L] bool (attended or not) or float token weights (0 = not attended)
        self.stand_in = stand_in
        self.tokens = stand_in if tokens is None else tokens
        self.unmasked = bool((mask == 1).all())
        self._placed: tuple[torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def with_clip(self, clip_tokens: int) -> EllaPrompt:
        """The same prompt (same key, so the same rows) in ELLA + CLIP mode: the entry's tensor is
        `clip_tokens` CLIP tokens, all following ELLA's."""
        return EllaPrompt(self.features, self.mask, 0, self.key, clip_tokens)

    def sized(self, tokens: int) -> EllaPrompt:
        """The same prompt in an entry whose tensor has `tokens` tokens (after Conditioning Concat)."""
        if tokens == self.tokens:
            return self
        out = EllaPrompt(self.features, self.mask, self.stand_in, self.key, tokens)
        out._placed = self._placed
        return out

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

    def sized(self, tokens: int) -> EllaCond:
        """The payload of an entry whose tensor has `tokens` tokens."""
        return EllaCond(tuple(p.sized(tokens) for p in self.cond))

    def can_concat(self, other: object) -> bool:
        """Rows batch when their tensors have one layout: ComfyUI pads tensors of other lengths by repetition,
        and then the tokens that follow ELLA's could not be told apart."""
        layouts = {(p.stand_in, p.tokens) for p in self.cond + other.cond} if isinstance(other, EllaCond) else ()
        return len(layouts) == 1

    def concat(self, others: list[EllaCond]) -> EllaRows:
        return EllaRows(self.cond + tuple(p for o in others for p in o.cond))
