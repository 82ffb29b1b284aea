"""CUDA graph replays of the connector give the eager connector's output; off CUDA it runs eagerly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from connector_fixtures import TINY, random_connector_state

from ella import Connector
from ella.connector_graphs import GraphedConnector

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _connector(device: str, dtype: torch.dtype = torch.float32) -> Connector:
    connector = Connector(TINY)
    connector.load_state_dict(random_connector_state(TINY))
    return connector.eval().requires_grad_(False).to(device, dtype)


def _inputs(device: str, rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, length, TINY.input_dim, generator=gen).to(device)
    timesteps = torch.rand(rows, generator=gen).mul(999).to(device)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, length // 2:] = False
    return features, timesteps, mask.to(device)


def test_off_cuda_the_connector_runs_eagerly():
    connector = _connector("cpu")
    graphed = GraphedConnector(connector)
    features, timesteps, mask = _inputs("cpu", 2, 7, 0)
    with torch.no_grad():
        assert torch.equal(graphed(features, timesteps, mask), connector(features, timesteps, mask))
    assert graphed.captures == 0


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replays_equal_eager_across_shapes_masks_and_inputs(dtype):
    connector = _connector("cuda", dtype)
    graphed = GraphedConnector(connector)
    with torch.no_grad():
        for seed, (rows, length, masked) in enumerate([(2, 9, True), (2, 9, True), (2, 9, False), (3, 4, True)]):
            features, timesteps, mask = _inputs("cuda", rows, length, seed)
            mask = mask if masked else None
            assert torch.equal(graphed(features, timesteps, mask), connector(features, timesteps, mask))
    assert graphed.captures == 3  # the repeated shape replays the graph captured for it


@cuda
def test_a_moved_connector_gets_a_new_graph():
    connector = _connector("cuda")
    graphed = GraphedConnector(connector)
    features, timesteps, mask = _inputs("cuda", 2, 5, 0)
    with torch.no_grad():
        first = graphed(features, timesteps, mask)
        connector.to("cpu")
        connector.load_state_dict(random_connector_state(TINY, seed=1))
        connector.to("cuda")
        moved = graphed(features, timesteps, mask)
        assert torch.equal(moved, connector(features, timesteps, mask))
    assert not torch.equal(first, moved)


@cuda
def test_graphs_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ELLA_CUDA_GRAPHS", "0")
    graphed = GraphedConnector(_connector("cuda"))
    with torch.no_grad():
        graphed(*_inputs("cuda", 2, 5, 0))
    assert graphed.captures == 0


@cuda
def test_replays_under_the_async_allocator_current_comfyui_enables():
    script = ("import torch; from test_connector_graphs import GraphedConnector, _connector, _inputs\n"
              "c = _connector('cuda'); g = GraphedConnector(c); x = _inputs('cuda', 2, 6, 0)\n"
              "with torch.no_grad(): assert torch.equal(g(*x), c(*x)); g(*x)\n"
              "print('captures', g.captures)")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    done = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "captures 1" in done.stdout
