"""int8 storage and int8 matrix kernels for T5's linear layers on the CPU, through torchao.

Each linear layer's weight is handed to torchao's dynamic int8 quantization (int8 weights with one scale per
output channel) as soon as it is read, so the load never holds more than one full-precision weight at a time.
At each call, `Int8Linear` quantizes the input per token with torchao and multiplies signed int8 by signed
int8 with `torch._int_mm`: the same integers and the same float scaling as torchao's own linear, without the
unsigned-input branch torchao 0.18 takes in eager mode on CPUs with AVX-512 VNNI and no AMX, which sums every
weight's columns again at each call (meant for its compiler to fold) and so costs more than the multiply.
Embeddings, layer norms and the position-bias table stay in the compute dtype (float32). torchao is needed
for this dtype only, and is imported when it is asked for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import torch

from .errors import EllaError

__all__ = ["TORCHAO", "Int8Linear", "Int8Quantizer", "check_int8_setup", "int8_linear", "stored_bytes", "stored_parts",
           "use_int8_linears"]

TORCHAO = "torchao==0.18.0"  # the release tested; `pip install` it into ComfyUI's Python
_INSTEAD = "or load T5 as fp32 (4.7 GB for FLAN-T5-XL) or fp8_e4m3fn (1.3 GB, slower) instead"


def check_int8_setup(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse what int8 does not do: another device than the CPU, another compute dtype than float32."""
    if device.type != "cpu":
        raise EllaError(f"T5 dtype int8 runs on the CPU only (its int8 matrix kernels are the CPU's), not on "
                        f"{device}: choose device cpu for int8, or load T5 as fp16 or fp8_e4m3fn for the GPU.")
    if dtype != torch.float32:
        raise EllaError(f"T5 dtype int8 computes in float32 (the dtype its scales and outputs are in), not in "
                        f"{dtype}; leave the compute dtype unset (or float32) with storage int8.")


def int8_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a torchao int8 `weight` (dynamic per-token input quantization, as its config says):
    torchao's input quantization, a signed int8 multiply into int32 (`torch._int_mm`), then the input's and
    the weight's scales applied in torchao's order, so the result equals torchao's linear bit for bit."""
    act = weight.act_quant_kwargs
    q = type(weight).from_hp(input, act.granularity, mapping_type=act.mapping_type, reduce_range=act.reduce_range)
    rows = q.qdata.reshape(-1, q.qdata.shape[-1])
    scaled = torch._int_mm(rows, weight.qdata.t()).to(torch.float32) * q.scale.reshape(-1, 1).to(torch.float32)
    out = (scaled.to(input.dtype) * weight.scale.flatten()).reshape(*input.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


class Int8Linear(torch.nn.Linear):
    """A Linear whose weight is a torchao int8 weight, multiplied with int8 kernels (`int8_linear`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return int8_linear(input, self.weight, self.bias)


def use_int8_linears(model: torch.nn.Module) -> None:
    """Swap the class of `model`'s Linear layers to Int8Linear (done once, at build, before the weights)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Int8Linear


class Int8Quantizer:
    """Turns linear weights, one at a time, into torchao int8 weights; built once per load, after checking
    that torchao imports and that this torch and CPU run its int8 matrix multiply."""

    def __init__(self) -> None:
        self._quantize, self.config = _torchao()
        self._check_kernels()

    def __call__(self, weight: torch.Tensor) -> torch.nn.Parameter:
        """`weight` ([out, in], floating) as a torchao int8 weight parameter, quantized exactly as
        `torchao.quantization.quantize_` quantizes a Linear holding it."""
        holder = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = torch.nn.Parameter(weight, requires_grad=False)
        self._quantize(holder, self.config)
        quantized = holder.weight
        del holder, weight
        _release_freed_memory()
        return quantized

    def _check_kernels(self) -> None:
        """Run one small int8 linear layer: a torch or CPU without int8 matrix kernels fails here, before
        gigabytes are read, with a message saying what to pick instead."""
        gen = torch.Generator().manual_seed(0)
        try:
            weight = self(torch.randn(32, 64, generator=gen))
            with torch.no_grad():
                out = int8_linear(torch.randn(4, 64, generator=gen), weight)
            if out.shape != (4, 32) or not torch.isfinite(out).all():
                raise RuntimeError(f"a test multiply gave {tuple(out.shape)} values, not 4x32 finite ones")
        except Exception as e:  # noqa: BLE001  (a torch, torchao or CPU that does not fit fails in many ways)
            raise EllaError(f"T5 dtype int8: this torch ({torch.__version__}) or CPU cannot run int8 matrix "
                            f"kernels ({type(e).__name__}: {str(e)[:200]}); {_INSTEAD}.") from None


def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library is glibc (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


_TRIM = _glibc_trim()


def _release_freed_memory() -> None:
    """Hand the pages of freed heap blocks back to the system. The float32 weight and torchao's float32
    temporaries, freed after each quantization, leave holes in glibc's heap that the small int8 tensors
    then pin: without this, the resident memory of a load grows to 2.4-3x the int8 weights."""
    if _TRIM is not None:
        _TRIM(0)


def _torchao() -> tuple[Callable, object]:
    """torchao's `quantize_` and the config this module quantizes with (version 2: torchao's Int8Tensor;
    set_inductor_config=False: no process-wide compiler settings changed)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        return quantize_, Int8DynamicActivationInt8WeightConfig(version=2, set_inductor_config=False)
    except Exception as e:  # noqa: BLE001  (a torchao built for another torch, or another release, fails in many ways)
        version = getattr(sys.modules.get("torchao"), "__version__", "not installed")
        raise EllaError(f"T5 dtype int8 needs torchao, which cannot be used here (torchao {version}; "
                        f"{type(e).__name__}: {str(e)[:200]}); install it into ComfyUI's Python with "
                        f"`pip install {TORCHAO}`, {_INSTEAD}.") from None


def stored_parts(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors that hold `tensor`'s data, by name: {name: tensor} for a plain tensor, the inner
    tensors (int8 values, scales) for a quantized one, which reports its compute dtype's element size."""
    if not hasattr(type(tensor), "__tensor_flatten__"):
        return {name: tensor}
    inner, _ = tensor.__tensor_flatten__()
    parts: dict[str, torch.Tensor] = {}
    for key in inner:
        value = getattr(tensor, key, None)
        if value is not None:
            parts.update(stored_parts(f"{name}.{key}", value))
    return parts


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` really holds (a quantized tensor's inner tensors, not its nominal dtype)."""
    return sum(p.numel() * p.element_size() for p in stored_parts("", tensor).values())
