"""Turn (prompt, timestep) rows into ELLA context, running the connector once per distinct pair.

When the host tells us a sampling run's start and schedule, the rows of every prompt at every
scheduled timestep are computed up front in a few batched passes and each model evaluation only looks
them up; otherwise each evaluation computes its own rows. Rows are kept across runs (`RowCache`), so a
graph sampled again (a new seed) costs no connector work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ella import Connector, EllaError
from ..ella.connector_graphs import GraphedConnector
from .payload import EllaPrompt
from .row_cache import Group, RowCache

PREFILL_CHUNK = 64


class ContextBuilder:
    """Computes the connector's rows (its output for one prompt at one timestep) for batch rows, and decides
    where the connector and its rows live; `rows_computed` counts connector rows (for tests and the bench)."""

    def __init__(self, connector: Connector, cache: RowCache) -> None:
        self.connector = connector
        self.graphed = GraphedConnector(connector)  # CUDA graph replays on a GPU, eager elsewhere
        self.rows_computed = 0
        self.cache = cache

    def start_run(self) -> None:
        """A sampling run begins: what `prefill` makes ready is for this run."""
        self.cache.start_run()

    def end_run(self) -> None:
        self.cache.end_run()

    def prefill(self, wanted: Sequence[tuple[EllaPrompt, Sequence[float]]]) -> None:
        """Make ready, in batched passes, the rows this sampling run will ask for: each prompt at the
        timesteps it will be asked for. More rows than the cache holds: none (each evaluation computes its own)."""
        self.cache.follow(self.connector.device)
        by_key = {p.key: p for p, _ in wanted}
        todo = [k for k in dict.fromkeys((p.key, t) for p, ts in wanted for t in ts) if self.cache.run_row(*k) is None]
        if self.cache.run_size + len(todo) > self.cache.max_rows:
            return
        for start in range(0, len(todo), PREFILL_CHUNK):
            group = tuple(todo[start:start + PREFILL_CHUNK])
            self.cache.add_to_run(group, self._group_rows(group, by_key, self.connector, evict=True))

    def lookup(self, prompts: Sequence[EllaPrompt], timestep: float) -> list[torch.Tensor] | None:
        """This run's up-front [1, L, W] row of each prompt at `timestep`, or None unless all are there."""
        rows = [self.cache.run_row(p.key, timestep) for p in prompts]
        return None if any(r is None for r in rows) else rows

    def rows(self, prompts: Sequence[EllaPrompt], timesteps: torch.Tensor) -> torch.Tensor:
        """[N, num_latents, width] for row i = connector(prompts[i], timesteps[i]); rows sharing a prompt (one
        encode) and a timestep share one connector evaluation."""
        self.cache.follow(self.connector.device)
        distinct: dict[tuple[int, float], int] = {}
        row_index = [distinct.setdefault((p.key, t), len(distinct))
                     for p, t in zip(prompts, timesteps.tolist(), strict=True)]
        group = tuple(distinct)
        by_key = {p.key: p for p in prompts}
        ready = [self.cache.run_row(*k) for k in group]
        if all(row is not None for row in ready):
            out = torch.cat(ready)
        else:  # kept only where it fits: a run's own up-front rows stay
            out = self._group_rows(group, by_key, self.graphed, evict=not self.cache.in_run)
        if row_index == list(range(len(group))):
            return out
        return out[torch.tensor(row_index, device=out.device)]

    def _group_rows(self, group: Group, by_key: dict[int, EllaPrompt], call: Callable, evict: bool) -> torch.Tensor:
        """The connector's rows for `group`, kept from an earlier run or computed (and kept)."""
        out = self.cache.get(group)
        if out is None:
            out = self._compute([by_key[key] for key, _ in group], [t for _, t in group], call)
            self.cache.put(group, out, evict=evict)
        return out

    @torch.no_grad()
    def _compute(self, prompts: list[EllaPrompt], timesteps: list[float], call: Callable) -> torch.Tensor:
        device, dtype = self.connector.device, self.connector.dtype
        for p in prompts:
            if p.features.shape[-1] != self.connector.config.input_dim:
                raise EllaError(f"ELLA: the T5 encoder gives {p.features.shape[-1]}-wide features but this ELLA "
                                f"model reads {self.connector.config.input_dim}-wide ones; ella-sd1.5-tsc-t5xl "
                                "needs FLAN-T5-XL (2048).")
        features, mask = _pad(prompts, device, dtype)
        self.rows_computed += len(prompts)
        out = call(features, torch.tensor(timesteps, device=device), mask)
        if not bool(torch.isfinite(out).all()):  # once per computed batch of rows (kept rows are not rechecked)
            raise EllaError(_non_finite(self.connector, features, out.dtype))
        return out


def _non_finite(connector: Connector, features: torch.Tensor, dtype: torch.dtype) -> str:
    """What to say when the connector's output holds inf or NaN, naming the likely cause."""
    name = str(dtype).removeprefix("torch.")
    if not bool(torch.isfinite(features).all()):
        cause = "the T5 features already hold inf/NaN: load T5 as bf16 or fp32"
    elif not all(bool(torch.isfinite(p).all()) for p in connector.parameters()):
        cause = "the ELLA model file holds inf/NaN weights: it is damaged, download it again"
    elif dtype == torch.float16:
        cause = "the connector overflowed in float16: run the model in bf16 or fp32"
    else:
        cause = "the ELLA model file may be damaged: download it again"
    return (f"ELLA: the connector produced non-finite values (inf/NaN) in {name}; {cause}. "
            "Nothing was sent to the UNet.")


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
