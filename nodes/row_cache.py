"""Connector outputs kept across sampling runs; each ELLA handle owns one cache per connector it loads.

A row depends only on the prompt's features and the timestep, never on the seed or the latent, so a
prompt sampled again (a new seed, a re-queued workflow) can reuse its rows. They are kept by the exact
group of (prompt key, timestep) rows computed together, because a row's last bits depend on what it was
batched with: a group asked for again gets exactly the tensor that computing it again would give, so a
seed reproduces the same image whatever ran before. The least recently used groups go first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

MAX_ROWS = 256  # 64 x 768 tokens each: at most 24 MiB in fp16, 48 MiB in fp32

Key = tuple[int, float]  # (a prompt's key, given when it was encoded; timestep)
Group = tuple[Key, ...]  # the rows computed together, in order


class RowCache:
    """[rows, L, W] connector outputs by group, all on `device` (see `follow`), at most `max_rows` rows;
    plus the rows of the sampling run in progress, by key (see `start_run`)."""

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        self.max_rows = max_rows
        self.device: torch.device | None = None
        self.in_run = False
        self._rows = 0
        self._groups: OrderedDict[Group, torch.Tensor] = OrderedDict()
        self._run: dict[Key, torch.Tensor] = {}

    def __len__(self) -> int:
        return self._rows

    @property
    def run_size(self) -> int:
        return len(self._run)

    def follow(self, device: torch.device) -> None:
        """Rows are for the connector's device: when it has moved, the kept rows go."""
        if device != self.device:
            self.clear()
            self.device = device

    def clear(self) -> None:
        self._groups.clear()
        self._run.clear()
        self._rows = 0

    def get(self, group: Group) -> torch.Tensor | None:
        out = self._groups.get(group)
        if out is not None:
            self._groups.move_to_end(group)
        return out

    def put(self, group: Group, out: torch.Tensor, evict: bool = True) -> None:
        """Keep `out`, the rows of `group`. With `evict` False it is kept only if it fits without dropping
        anything."""
        if group in self._groups or len(group) > self.max_rows - (0 if evict else self._rows):
            return
        self._groups[group] = out
        self._rows += len(group)
        while self._rows > self.max_rows:
            dropped, _ = self._groups.popitem(last=False)
            self._rows -= len(dropped)

    def start_run(self) -> None:
        """A sampling run begins: the last run's own rows go (not the kept groups)."""
        self.in_run, self._run = True, {}

    def end_run(self) -> None:
        """The sampling run is over: its own rows go (not the kept groups)."""
        self.in_run, self._run = False, {}

    def add_to_run(self, group: Group, out: torch.Tensor) -> None:
        """Make the rows of `group` this run's rows."""
        self._run.update(zip(group, out.split(1), strict=True))

    def run_row(self, key: int, timestep: float) -> torch.Tensor | None:
        """This run's [1, L, W] row of the prompt `key` at `timestep`, if it was made ready."""
        return self._run.get((key, timestep))
