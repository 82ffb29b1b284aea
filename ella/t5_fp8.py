"""8-bit storage for T5's linear layers: weights kept in fp8, each layer computing in its input's dtype.

FLAN-T5-XL's linear layers hold 95% of its weights. `store_linears_in_fp8` turns every `nn.Linear` of a
(meta) T5 encoder into `CastLinear`, which casts its fp8 weight to the input's dtype at each call, and
its feed-forward blocks into versions without transformers' "cast the activations to wo's weight dtype"
step (which would round activations to fp8). Embeddings and layer norms stay in the compute dtype, so the
hidden states, and every layer's input, are in the compute dtype: an embedding lookup never reads fp8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

from .errors import EllaError

__all__ = ["STORAGE_NAMES", "CastLinear", "linear_weight_names", "resolve_storage", "store_linears_in_fp8"]

# user spelling -> torch attribute; looked up when asked, so a torch without fp8 gives a clear error
STORAGE_NAMES = {
    "fp8_e4m3fn": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn", "e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2",
    "int8": "int8",  # torchao's int8 weights and kernels, on the CPU (ella/t5_int8.py)
}


def resolve_storage(storage: torch.dtype | str | None) -> torch.dtype | None:
    """The 8-bit dtype asked for (a torch dtype or a name such as "fp8_e4m3fn" or "int8"); None: store as
    computed."""
    if storage is None:
        return None
    if not isinstance(storage, str):
        return storage if storage in (*_fp8_dtypes(), torch.int8) else _refuse(storage)
    name = STORAGE_NAMES.get(storage.lower().removeprefix("torch."))
    if name is None:
        return _refuse(storage)
    dtype = getattr(torch, name, None)
    if dtype is None:
        raise EllaError(f"T5 storage dtype {storage!r} needs torch.{name}, which torch {torch.__version__} lacks; "
                        "update torch (2.1 or newer) or load T5 as fp16, bf16 or fp32.")
    return dtype


def _fp8_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2")) if d is not None)


def _refuse(storage: object) -> torch.dtype:
    raise EllaError(f"Unsupported T5 storage dtype {storage!r}; use fp8_e4m3fn, fp8_e5m2 or int8 (or None to "
                    "store the weights in the compute dtype).")


class CastLinear(torch.nn.Linear):
    """A Linear whose weight is stored in another (8-bit) dtype and cast to the input's dtype at each call."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.weight.to(input.dtype), bias)


class _GatedFeedForward(T5DenseGatedActDense):
    """T5's gated feed-forward without the cast of its activations to wo's (fp8) weight dtype."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        return self.wo(self.dropout(hidden))


class _FeedForward(T5DenseActDense):
    """T5's plain feed-forward without the cast of its activations to wo's (fp8) weight dtype."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi(hidden_states))))


_SWAPS = {torch.nn.Linear: CastLinear, T5DenseGatedActDense: _GatedFeedForward, T5DenseActDense: _FeedForward}


def store_linears_in_fp8(model: torch.nn.Module) -> None:
    """Swap the classes of `model`'s linear layers and feed-forward blocks (done once, at build)."""
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    for block in model.encoder.block:
        ff = block.layer[-1].DenseReluDense
        if type(ff) not in _SWAPS.values():
            raise EllaError(f"fp8 storage does not know this transformers version's T5 feed-forward "
                            f"({type(ff).__name__}); load T5 as fp16, bf16 or fp32.")


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    """Names (as in the state dict) of the weights stored in fp8: those of the linear layers."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
