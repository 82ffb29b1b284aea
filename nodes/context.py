"""Turn (prompt, timestep) rows into ELLA context, running the connector once per distinct pair.

When the host tells us a sampling run's schedule (current ComfyUI), the rows of every prompt at every
scheduled timestep are computed up front in a few batched passes and each model evaluation only looks
them up; otherwise each evaluation computes its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ella import Connector, EllaError
from ..ella.connector_graphs import GraphedConnector
from .payload import EllaPrompt

PREFILL_MAX_ROWS = 256  # 64 x 768 tokens each: at most 24 MiB in fp16, 48 MiB in fp32
PREFILL_CHUNK = 64


class ContextBuilder:
    """Computes the connector output for batch rows; `rows_computed` counts connector rows (for tests/bench)."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.run = GraphedConnector(connector)  # CUDA graph replays on a GPU, eager elsewhere
        self.rows_computed = 0
        self._run_key: object = None
        self._rows: dict[tuple[int, float], torch.Tensor] = {}  # this run's [1, L, W] rows, by (features id, timestep)
        self._features: dict[int, torch.Tensor] = {}  # holds those features, so their ids stay theirs

    def prefill(self, run_key: object, wanted: Sequence[tuple[EllaPrompt, Sequence[float]]]) -> None:
        """Compute the rows of a sampling run up front: each prompt at the timesteps it will be asked for.
        `run_key` names the run (a new key drops the rows of the last one). Too many rows: nothing is kept."""
        if run_key is not self._run_key:
            self._run_key, self._rows, self._features = run_key, {}, {}
        todo = list(dict.fromkeys((id(p.features), t) for p, ts in wanted for t in ts if (id(p.features), t) not in
                                  self._rows))
        if not todo:
            return
        if len(self._rows) + len(todo) > PREFILL_MAX_ROWS:
            self._run_key, self._rows, self._features = None, {}, {}
            return
        by_id = {id(p.features): p for p, _ in wanted}
        self._features.update((pid, p.features) for pid, p in by_id.items())
        for start in range(0, len(todo), PREFILL_CHUNK):
            keys = todo[start:start + PREFILL_CHUNK]
            with torch.no_grad():
                out = self._compute([by_id[pid] for pid, _ in keys], [t for _, t in keys], self.connector)
            self._rows.update(zip(keys, out.split(1), strict=True))

    def lookup(self, prompts: Sequence[EllaPrompt], timestep: float) -> list[torch.Tensor] | None:
        """The up-front [1, L, W] row of each prompt at `timestep`, or None unless every one is there."""
        rows = [self._rows.get((id(p.features), timestep)) for p in prompts]
        return None if any(r is None for r in rows) else rows

    def ella_tokens(self, prompts: Sequence[EllaPrompt], timesteps: torch.Tensor) -> torch.Tensor:
        """[N, num_latents, width] for row i = connector(prompts[i], timesteps[i]); rows sharing prompt
        features (one encode) and a timestep share one connector evaluation."""
        distinct: dict[tuple[int, float], int] = {}
        row_index = [distinct.setdefault((id(p.features), t), len(distinct))
                     for p, t in zip(prompts, timesteps.tolist(), strict=True)]
        keys = list(distinct)
        if self._rows and all(k in self._rows for k in keys):
            out = torch.cat([self._rows[k] for k in keys])
        else:
            by_id = {id(p.features): p for p in prompts}
            with torch.no_grad():
                out = self._compute([by_id[pid] for pid, _ in keys], [t for _, t in keys], self.run)
        if row_index == list(range(len(keys))):
            return out
        return out[torch.tensor(row_index, device=out.device)]

    def _compute(self, prompts: list[EllaPrompt], timesteps: list[float], run: object) -> torch.Tensor:
        weight = self.connector.connector.latents
        for p in prompts:
            if p.features.shape[-1] != self.connector.config.input_dim:
                raise EllaError(f"ELLA: the T5 encoder gives {p.features.shape[-1]}-wide features but this ELLA "
                                f"model reads {self.connector.config.input_dim}-wide ones; ella-sd1.5-tsc-t5xl "
                                "needs FLAN-T5-XL (2048).")
        features, mask = _pad(prompts, weight.device, weight.dtype)
        self.rows_computed += len(prompts)
        return run(features, torch.tensor(timesteps, device=weight.device), mask)


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
