"""Validated reading of safetensors files: never unpickles, explains bad files."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import EllaLoadError

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and storage type of one tensor in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


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
    except (UnicodeDecodeError, ValueError) as e:
        raise EllaLoadError(f"{path}: not a safetensors file (bad header: {e}); expected {expected}.") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _check_entry(path, name, entry, data_bytes, expected)
    return infos


def _check_entry(path: Path, name: str, entry: object, data_bytes: int, expected: str) -> TensorInfo:
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
    return TensorInfo(dtype, shape)


def load_tensors(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    keys: list[str] | None = None,
    expected: str = "a safetensors file",
) -> dict[str, torch.Tensor]:
    """Load tensors one at a time, each cast to `dtype` (floating tensors only) and moved to `device`."""
    infos = read_header(path, expected=expected)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in infos if keys is None else keys:
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[key] = t.to(device)
    except EllaLoadError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise EllaLoadError(f"{path}: cannot read tensors ({e}); expected {expected}.") from None
    return out
