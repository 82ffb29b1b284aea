"""Connector outputs kept across sampling runs.

A row depends only on the prompt's features and the timestep, never on the seed or the latent, so a
prompt sampled again (a new seed, a re-queued workflow) can reuse its rows. They are kept by the exact
group of (features, timestep) rows computed together, because a row's last bits depend on what it was
batched with: a group asked for again gets exactly the tensor that computing it again would give, so a
seed reproduces the same image whatever ran before. The least recently used groups go first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

MAX_ROWS = 256  # 64 x 768 tokens each: at most 24 MiB in fp16, 48 MiB in fp32

Group = tuple[tuple[int, float], ...]  # (id of the prompt's features, timestep) of each row, in order


class RowCache:
    """[rows, L, W] connector outputs by group, all on `device` (see `follow`), at most `max_rows` rows."""

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        self.max_rows = max_rows
        self.device: torch.device | None = None
        self._rows = 0
        # the features are held so that the ids in the keys stay theirs
        self._groups: OrderedDict[Group, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return self._rows

    def follow(self, device: torch.device) -> None:
        """Rows are for the connector's device: when it has moved, the kept rows go."""
        if device != self.device:
            self._groups.clear()
            self._rows, self.device = 0, device

    def get(self, group: Group) -> torch.Tensor | None:
        entry = self._groups.get(group)
        if entry is None:
            return None
        self._groups.move_to_end(group)
        return entry[1]

    def put(self, group: Group, features: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Keep `out`, the rows of `group`; `features` are the tensors whose ids the group names."""
        if len(group) > self.max_rows or group in self._groups:
            return
        self._groups[group] = (tuple(features), out)
        self._rows += len(group)
        while self._rows > self.max_rows:
            dropped, _ = self._groups.popitem(last=False)
            self._rows -= len(dropped)
