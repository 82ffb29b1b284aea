"""Validated reading of safetensors files: never unpickles, explains bad files."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import EllaError, EllaLoadError

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Shape, storage type and place in the file of one tensor in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the tensor's data in the file
    nbytes: int = 0


def read_header(path: str | os.PathLike, *, expected: str = "a safetensors file") -> dict[str, TensorInfo]:
    """Read and check a safetensors header; raise EllaLoadError naming the file if it is not sound."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise EllaLoadError(f"{path}: file is empty or too short ({size} bytes); expected {expected}.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise EllaLoadError(
                    f"{path}: not a safetensors file (a pickled .ckpt/.pt/.bin renamed, or random bytes); "
                    f"expected {expected}. Only .safetensors files are loaded; nothing is unpickled."
                )
            raw = f.read(header_len)
    except OSError as e:
        raise EllaLoadError(f"{path}: cannot read file ({e.strerror or e}); expected {expected}.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise EllaLoadError(f"{path}: not a safetensors file (bad header: {e}); expected {expected}.") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _check_entry(path, name, entry, data_bytes, expected, 8 + header_len)
    return infos


def _check_entry(path: Path, name: str, entry: object, data_bytes: int, expected: str, start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError):
        raise EllaLoadError(f"{path}: corrupt safetensors header at tensor {name!r}; expected {expected}.") from None
    item = _ITEM_SIZES.get(dtype)
    numel = 1
    for d in shape:
        numel *= d
    if item is None or min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * item:
        raise EllaLoadError(f"{path}: corrupt safetensors header at tensor {name!r}; expected {expected}.")
    if end > data_bytes:
        raise EllaLoadError(
            f"{path}: file is truncated (tensor {name!r} ends at byte {end} of a {data_bytes}-byte data "
            f"section); download it again. Expected {expected}."
        )
    return TensorInfo(dtype, shape, start + begin, end - begin)


def load_tensors(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    device: str | torch.device = "cpu",
    keys: list[str] | None = None,
    expected: str = "a safetensors file",
    on_tensor: Callable[[], None] | None = None,
    convert: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Load tensors one at a time, each cast to `dtype` (floating tensors only; a mapping gives each key's
    dtype), moved to `device` and, for keys in `convert`, replaced at once by what its function returns
    (e.g. a quantized tensor); `on_tensor()` is called after each one (progress).

    Tensors are read with plain file reads (no memory map) and cast chunk by chunk, so peak memory stays
    near the size of the weights in `dtype` plus one small buffer. Casts to fp8 saturate at its range."""
    infos = read_header(path, expected=expected)
    out: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            for key in infos if keys is None else keys:
                target = dtype.get(key) if isinstance(dtype, Mapping) else dtype
                out[key] = _read(f, infos[key], target).to(device)
                if convert and key in convert:
                    out[key] = convert[key](out[key])
                if on_tensor is not None:
                    on_tensor()
    except EllaError:
        raise
    except KeyError as e:
        raise EllaLoadError(f"{path}: tensor {e} is missing; expected {expected}.") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise EllaLoadError(f"{path}: cannot read tensors ({e}); expected {expected}.") from None
    return out


_CHUNK = 8 * 1024 * 1024


def _read(f: BinaryIO, info: TensorInfo, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor, cast to `dtype` if it is floating, reading at most _CHUNK bytes at a time."""
    stored = _TORCH_DTYPES.get(info.dtype)
    if stored is None:
        raise ValueError(f"unsupported tensor type {info.dtype}")
    target = dtype if dtype is not None and stored.is_floating_point else stored
    out = torch.empty(info.shape, dtype=target)
    f.seek(info.offset)
    if target == stored:  # no cast: read straight into the result
        if info.nbytes and f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != info.nbytes:
            raise ValueError("file ended early")
        return out
    flat, item = out.view(-1), stored.itemsize
    per_chunk = max(1, _CHUNK // item)
    for start in range(0, flat.numel(), per_chunk):
        count = min(per_chunk, flat.numel() - start)
        raw = bytearray(count * item)
        if f.readinto(raw) != len(raw):
            raise ValueError("file ended early")
        flat[start:start + count] = _saturated(torch.frombuffer(raw, dtype=stored), target)
    return out


def _saturated(chunk: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """`chunk` clamped to the finite range of an 8-bit float `target` (torch's casts differ: inf, NaN or
    saturation by format and version); other targets unchanged."""
    if target.itemsize != 1 or not target.is_floating_point:
        return chunk
    limit = torch.finfo(target).max
    return chunk.float().clamp_(-limit, limit) if chunk.itemsize == 1 else chunk.clamp_(-limit, limit)
