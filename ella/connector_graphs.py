"""Run the connector as CUDA graph replays: one launch per call instead of a few hundred small kernels.

At 512x512 on a fast GPU the UNet step is short enough that launching the connector's kernels one by one
costs several percent of it. A graph is captured once per input shape (and per placement of the weights)
and replayed with the new inputs copied into its static buffers. Off CUDA, or when capture fails, the
connector runs eagerly. ELLA_CUDA_GRAPHS=0 turns graphs off.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .connector import Connector

log = logging.getLogger("ELLA")

MAX_GRAPHS = 8


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    features: torch.Tensor
    timesteps: torch.Tensor
    mask: torch.Tensor | None
    out: torch.Tensor


class GraphedConnector:
    """`graphed(features, timesteps, mask)` equals `connector(...)` for timesteps given as a [B] tensor."""

    def __init__(self, connector: Connector, max_graphs: int = MAX_GRAPHS) -> None:
        self.connector = connector
        self.max_graphs = max_graphs
        self.enabled = os.environ.get("ELLA_CUDA_GRAPHS", "1") != "0"
        self.captures = 0  # graphs captured so far (for tests and benchmarks)
        self._params = list(connector.parameters())  # .to() keeps these objects and swaps their storage
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    def __call__(self, features: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        device = self.connector.device
        if not (self.enabled and device.type == "cuda" and features.device == device
                and not torch.is_grad_enabled() and not torch.cuda.is_current_stream_capturing()):
            return self.connector(features, timesteps, mask)
        key = (tuple(features.shape), features.dtype, tuple(timesteps.shape), timesteps.dtype,
               None if mask is None else (tuple(mask.shape), mask.dtype), self._placement())
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, features, timesteps, mask)
            if captured is None:
                return self.connector(features, timesteps, mask)
        else:
            self._graphs.move_to_end(key)
        captured.features.copy_(features)
        captured.timesteps.copy_(timesteps)
        if mask is not None:
            captured.mask.copy_(mask)
        captured.graph.replay()
        return captured.out.clone()

    def _placement(self) -> tuple[int, ...]:
        """Where the weights live: a graph reads them by address, so a move needs a new graph."""
        return tuple(p.data_ptr() for p in self._params)

    def _capture(self, key: tuple, features: torch.Tensor, timesteps: torch.Tensor,
                 mask: torch.Tensor | None) -> _Captured | None:
        static = [features.clone(), timesteps.clone(), None if mask is None else mask.clone()]
        try:
            side = torch.cuda.Stream(device=features.device)
            side.wait_stream(torch.cuda.current_stream(features.device))
            with torch.cuda.stream(side):
                self.connector(*static)  # warm-up outside the graph, as capture requires
            torch.cuda.current_stream(features.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.connector(*static)
        except RuntimeError as err:
            log.warning("ELLA: CUDA graph capture failed (%s); running the connector without graphs.", err)
            self.enabled = False
            return None
        captured = _Captured(graph, static[0], static[1], static[2], out)
        self._graphs[key] = captured
        self.captures += 1
        if len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return captured
