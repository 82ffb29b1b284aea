"""The ELLA_CONNECTOR value: a loaded connector, with copies cast to the dtype of each UNet it serves."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import ella


class EllaHandle:
    """A connector loaded once; `for_dtype` gives (and keeps) a copy in another dtype when a UNet needs it."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        self.path = path
        self._by_dtype = {dtype: ella.load_connector(path, dtype=dtype)}

    @property
    def config(self) -> ella.ConnectorConfig:
        return next(iter(self._by_dtype.values())).config

    def for_dtype(self, dtype: torch.dtype) -> ella.Connector:
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = copy.deepcopy(next(iter(self._by_dtype.values()))).to(dtype)
        return self._by_dtype[dtype]
