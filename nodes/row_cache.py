"""Connector outputs kept across sampling runs, one cache per connector.

A row depends only on the prompt's features and the timestep, never on the seed or the latent, so a
prompt sampled again (a new seed, a re-queued workflow) can reuse its rows. They are kept by the exact
group of (features, timestep) rows computed together, because a row's last bits depend on what it was
batched with: a group asked for again gets exactly the tensor that computing it again would give, so a
seed reproduces the same image whatever ran before. The least recently used groups go first.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

MAX_ROWS = 256  # 64 x 768 tokens each: at most 24 MiB in fp16, 48 MiB in fp32

Key = tuple[int, float]  # (id of a prompt's features, timestep)
Group = tuple[Key, ...]  # the rows computed together, in order


class RowCache:
    """[rows, L, W] connector outputs by group, all on `device` (see `follow`), at most `max_rows` rows;
    plus the rows of the sampling run in progress, by key (see `start_run`)."""

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        self.max_rows = max_rows
        self.device: torch.device | None = None
        self.run_key: object = None
        self._rows = 0
        # the features are held so that the ids in the keys stay theirs
        self._groups: OrderedDict[Group, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = OrderedDict()
        self._run: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}

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
        self._rows, self.run_key = 0, None

    def get(self, group: Group) -> torch.Tensor | None:
        entry = self._groups.get(group)
        if entry is None:
            return None
        self._groups.move_to_end(group)
        return entry[1]

    def put(self, group: Group, features: Sequence[torch.Tensor], out: torch.Tensor, evict: bool = True) -> None:
        """Keep `out`, the rows of `group`; `features` are the tensors whose ids the group names. With
        `evict` False it is kept only if it fits without dropping anything."""
        if group in self._groups or len(group) > self.max_rows - (0 if evict else self._rows):
            return
        self._groups[group] = (tuple(features), out)
        self._rows += len(group)
        while self._rows > self.max_rows:
            dropped, _ = self._groups.popitem(last=False)
            self._rows -= len(dropped)

    def start_run(self, run_key: object) -> None:
        """A new `run_key` (held, compared by identity) forgets the last run's rows (not the kept groups)."""
        if run_key is not self.run_key:
            self.run_key = run_key
            self._run = {}

    def add_to_run(self, group: Group, features: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Make the rows of `group` this run's rows, each with the features it is for."""
        self._run.update((key, (f, row)) for key, f, row in zip(group, features, out.split(1), strict=True))

    def run_row(self, features: torch.Tensor, timestep: float) -> torch.Tensor | None:
        """This run's [1, L, W] row of `features` at `timestep`, if it was made ready."""
        entry = self._run.get((id(features), timestep))
        return entry[1] if entry is not None and entry[0] is features else None


_BY_CONNECTOR: weakref.WeakKeyDictionary[torch.nn.Module, RowCache] = weakref.WeakKeyDictionary()


def row_cache(connector: torch.nn.Module) -> RowCache:
    """The one RowCache of `connector` (every Apply ELLA of it shares it); it goes with the connector."""
    cache = _BY_CONNECTOR.get(connector)
    if cache is None:
        cache = _BY_CONNECTOR[connector] = RowCache()
    return cache
