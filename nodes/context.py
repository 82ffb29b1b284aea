"""Turn (prompt, timestep) rows into ELLA context, running the connector once per distinct pair."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ella import Connector, EllaError
from ..ella.connector_graphs import GraphedConnector
from .payload import EllaPrompt


class ContextBuilder:
    """Computes the connector output for batch rows; `rows_computed` counts connector rows (for tests/bench)."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.run = GraphedConnector(connector)  # CUDA graph replays on a GPU, eager elsewhere
        self.rows_computed = 0

    def ella_tokens(self, prompts: Sequence[EllaPrompt], timesteps: torch.Tensor) -> torch.Tensor:
        """[N, num_latents, width] for row i = connector(prompts[i], timesteps[i]); rows sharing prompt
        features (one encode) and a timestep share one connector evaluation."""
        weight = self.connector.connector.latents
        device, dtype = weight.device, weight.dtype
        distinct: dict[tuple[int, float], int] = {}
        row_index = [distinct.setdefault((id(p.features), t), len(distinct))
                     for p, t in zip(prompts, timesteps.tolist(), strict=True)]
        by_id = {id(p.features): p for p in prompts}
        for p in by_id.values():
            if p.features.shape[-1] != self.connector.config.input_dim:
                raise EllaError(f"ELLA: the T5 encoder gives {p.features.shape[-1]}-wide features but this ELLA "
                                f"model reads {self.connector.config.input_dim}-wide ones; ella-sd1.5-tsc-t5xl "
                                "needs FLAN-T5-XL (2048).")
        keys = list(distinct)
        features, mask = _pad([by_id[pid] for pid, _ in keys], device, dtype)
        t = torch.tensor([t for _, t in keys], device=device)
        with torch.no_grad():
            out = self.run(features, t, mask)
        self.rows_computed += len(keys)
        if row_index == list(range(len(keys))):
            return out
        return out[torch.tensor(row_index, device=device)]


def _pad(prompts: list[EllaPrompt], device: torch.device,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the prompts' features, zero-padding to the longest; the mask is None when nothing is masked."""
    placed = [p.placed(device, dtype) for p in prompts]
    longest = max(p.length for p in prompts)
    if all(p.length == longest and p.unmasked for p in prompts):
        return torch.cat([f for f, _ in placed]), None
    features = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[1])) for f, _ in placed])
    weighted = any(m.is_floating_point() for _, m in placed)  # token weights: pad and join as floats
    mask = torch.cat([torch.nn.functional.pad(m.float() if weighted else m, (0, longest - m.shape[1])) for _, m in placed])
    return features, mask
