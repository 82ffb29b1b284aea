"""Build a Connector from a safetensors checkpoint, with its configuration read off the tensor shapes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .connector import Connector, ConnectorConfig, sinusoid_frequencies
from .errors import EllaLoadError
from .safetensors_io import TensorInfo, load_tensors, read_header

EXPECTED = "an ELLA connector such as ella-sd1.5-tsc-t5xl.safetensors (keys time_embedding.* and connector.*)"
_BLOCK = re.compile(r"connector\.perceiver_blocks\.(\d+)\.")
_FLOAT_STORAGE = ("F64", "F32", "F16", "BF16")
# far above ELLA-SD1.5 (64 latents of width 768, 6 blocks, T5 width 2048, 320 time channels), far below
# what a sampler could afford: each output token is attended by every UNet cross-attention layer
LIMITS = {"num_latents": 1024, "width": 8192, "num_blocks": 64, "input_dim": 16384, "time_channels": 8192,
          "time_embed_dim": 8192, "output_dim": 8192}


def config_from_shapes(shapes: dict[str, tuple[int, ...]], heads: int = 8) -> ConnectorConfig:
    """Infer a ConnectorConfig from a state dict's shapes; KeyError if a defining key is absent."""
    num_latents, width = shapes["connector.latents"]
    time_embed_dim, time_channels = shapes["time_embedding.linear_1.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    out = shapes.get("connector.proj_out.0.weight")
    return ConnectorConfig(
        width=width,
        num_latents=num_latents,
        num_blocks=len(blocks),
        input_dim=shapes["connector.proj_in.weight"][1],
        time_channels=time_channels,
        time_embed_dim=time_embed_dim,
        output_dim=out[0] if out else None,
        heads=heads,
    )


def load_connector(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: int = 8,
) -> Connector:
    """Load an ELLA connector from a .safetensors file; every key must be used and none missing."""
    path = Path(path)
    infos = read_header(path, expected=EXPECTED)
    _check_dtypes(path, infos)
    cfg = _config_or_explain(path, infos, heads)
    expected_shapes = _expected_shapes(cfg)
    _check_keys(path, infos, expected_shapes)
    tensors = load_tensors(path, dtype=dtype, device=device, expected=EXPECTED)
    with torch.device("meta"):
        model = Connector(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.time_embedding.frequencies = sinusoid_frequencies(cfg.time_channels, device)
    return model.eval().requires_grad_(False)


def _config_or_explain(path: Path, infos: dict[str, TensorInfo], heads: int) -> ConnectorConfig:
    try:
        cfg = config_from_shapes({k: v.shape for k, v in infos.items()}, heads)
    except (KeyError, ValueError):
        raise EllaLoadError(_mismatch_message(path, infos, _expected_shapes(ConnectorConfig(heads=heads)))) from None
    sizes = {name: getattr(cfg, name) for name in LIMITS if getattr(cfg, name) is not None}
    bad = [f"{name} {value} (expected 1 to {LIMITS[name]})" for name, value in sizes.items()
           if not 1 <= value <= LIMITS[name]]
    if bad:
        raise EllaLoadError(f"{path}: connector sizes out of range: {'; '.join(bad)}. Expected {EXPECTED} "
                            "(64 latents of width 768).")
    if cfg.width % heads:
        raise EllaLoadError(f"{path}: connector width {cfg.width} with {cfg.num_blocks} blocks cannot use {heads} "
                            f"heads; expected {EXPECTED}.")
    return cfg


def _check_dtypes(path: Path, infos: dict[str, TensorInfo]) -> None:
    bad = sorted(f"{k} ({v.dtype})" for k, v in infos.items() if v.dtype not in _FLOAT_STORAGE)
    if bad:
        raise EllaLoadError(f"{path}: {len(bad)} tensor(s) not stored as floating point, e.g. {', '.join(bad[:3])}; "
                            f"expected F32, F16 or BF16 weights of {EXPECTED}.")


def _expected_shapes(cfg: ConnectorConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Connector(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(path: Path, infos: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]]) -> None:
    found = {k: v.shape for k, v in infos.items()}
    if found != expected:
        raise EllaLoadError(_mismatch_message(path, infos, expected))


def _mismatch_message(path: Path, infos: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(set(infos) - set(expected))
    wrong = sorted(k for k in set(expected) & set(infos) if expected[k] != infos[k].shape)
    parts = [f"{path}: this is not {EXPECTED}."]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}.")
    return " ".join(parts)
