"""Random-weight ELLA connectors in the released key layout, written to temporary files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ella.connector import Connector, ConnectorConfig

RELEASED = ConnectorConfig()
TINY = ConnectorConfig(width=32, num_latents=8, num_blocks=2, input_dim=24, time_channels=16,
                       time_embed_dim=32)


def random_connector_state(cfg: ConnectorConfig = TINY, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict with every tensor drawn from N(0, 0.05^2), in the released key layout."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Connector(cfg).state_dict().items()}
    return {k: (torch.randn(s, generator=gen) * 0.05).to(dtype) for k, s in shapes.items()}


def save_connector(path: Path, cfg: ConnectorConfig = TINY, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write a random connector of `cfg` to `path` (.safetensors) and return the path."""
    save_file(random_connector_state(cfg, seed, dtype), str(path))
    return path
