"""The ELLA_CONNECTOR value: a validated connector file, loaded once per compute dtype and devices a UNet needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import ella
from .host import HOST
from .row_cache import RowCache

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(dtype: torch.dtype | None, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """A dtype the connector can run in: storage-only types (fp8) and None give `fallback`."""
    return dtype if dtype in COMPUTE_DTYPES else fallback


class EllaHandle:
    """A connector file, loaded once per compute dtype and devices a UNet needs (from the file each time: no
    double rounding; UNets on two GPUs never share, and so never move, one connector)."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        self.path = path
        first = ella.load_connector(path, dtype=compute_dtype(dtype))
        self.config = first.config
        self._spare = {first.dtype: first}  # loaded to check the file; kept for a UNet in its dtype
        self._connectors: dict[tuple[torch.dtype, str, str], ella.Connector] = {}
        self._caches: dict[tuple[torch.dtype, str, str], RowCache] = {}
        self._patchers: dict[tuple[torch.dtype, str, str], Any] = {}

    def connector(self, dtype: torch.dtype, load_device: torch.device, offload_device: torch.device) -> ella.Connector:
        """The connector for a UNet that computes in `dtype` and lives on these devices."""
        key = _key(dtype, load_device, offload_device)
        if key not in self._connectors:
            spare = self._spare.pop(key[0], None)
            self._spare.clear()  # the first UNet computes in another dtype (fp8 storage): don't hold it for nothing
            self._connectors[key] = spare if spare is not None else ella.load_connector(self.path, dtype=key[0])
        return self._connectors[key]

    def row_cache(self, dtype: torch.dtype, load_device: torch.device, offload_device: torch.device) -> RowCache:
        """The rows kept for `connector(dtype, load_device, offload_device)`, shared by every Apply ELLA of it."""
        key = _key(dtype, load_device, offload_device)
        if key not in self._caches:
            self._caches[key] = RowCache()
        return self._caches[key]

    def model_patcher(self, dtype: torch.dtype, load_device: torch.device, offload_device: torch.device) -> Any:
        """The ModelPatcher that places `connector(dtype, load_device, offload_device)`,
        living as long as the handle. A patcher made per Apply ELLA would die with the MODEL it served while
        its connector lives on, which ComfyUI reports as a leak and keeps as a dead entry. When ComfyUI
        unloads the connector (not merely swapping one clone of its patcher for another), its kept rows go
        too, so that no memory stays on the device it left."""
        import comfy.model_patcher

        key = _key(dtype, load_device, offload_device)
        if key not in self._patchers:
            patcher = comfy.model_patcher.ModelPatcher(self.connector(dtype, load_device, offload_device),
                                                       load_device=load_device, offload_device=offload_device)
            HOST.own_connector(patcher, self.row_cache(dtype, load_device, offload_device).clear)
            self._patchers[key] = patcher
        return self._patchers[key]


def _key(dtype: torch.dtype, load_device: torch.device, offload_device: torch.device) -> tuple[torch.dtype, str, str]:
    return compute_dtype(dtype), str(load_device), str(offload_device)
