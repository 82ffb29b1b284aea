"""The ELLA_CONNECTOR value: a validated connector file, loaded once per compute dtype a UNet needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import ella
from .row_cache import row_cache

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(dtype: torch.dtype | None, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """A dtype the connector can run in: storage-only types (fp8) and None give `fallback`."""
    return dtype if dtype in COMPUTE_DTYPES else fallback


class EllaHandle:
    """A connector file; `for_dtype` loads it from the file in each dtype asked for (no double rounding)."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        self.path = path
        first = ella.load_connector(path, dtype=compute_dtype(dtype))
        self.config = first.config
        self._by_dtype = {first.connector.latents.dtype: first}
        self._patchers: dict[tuple, Any] = {}

    def for_dtype(self, dtype: torch.dtype) -> ella.Connector:
        dtype = compute_dtype(dtype)
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = ella.load_connector(self.path, dtype=dtype)
        return self._by_dtype[dtype]

    def model_patcher(self, connector: ella.Connector, load_device: torch.device, offload_device: torch.device) -> Any:
        """The ModelPatcher that places `connector` (from for_dtype) on current hosts: one per connector and
        devices, living as long as the handle. A patcher made per Apply ELLA would die with the MODEL it
        served while its connector lives on, which ComfyUI reports as a leak and keeps as a dead entry."""
        import comfy.model_patcher
        import comfy.patcher_extension

        key = (connector.connector.latents.dtype, str(load_device), str(offload_device))
        if key not in self._patchers:
            patcher = comfy.model_patcher.ModelPatcher(connector, load_device=load_device, offload_device=offload_device)
            patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, _forget_rows)
            self._patchers[key] = patcher
        return self._patchers[key]


def _forget_rows(patcher: Any, unpatch_all: bool) -> None:
    """ComfyUI unloads the connector (not merely swapping one clone of its patcher for another): the rows
    kept for it go too, so that no memory stays on the device it left."""
    if unpatch_all:
        row_cache(patcher.model).clear()
