"""ELLA's hook: each model evaluation gets the ELLA context of its own sigma.

`CondBatchHook` rewrites each conditioning entry before ComfyUI batches them; the host tells it when a sampling
run starts and ends, and the run's schedule lets it compute the rows of a whole run up front. `host.py`
installs it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import comfy.conds
import comfy.utils
import torch

from .context import ContextBuilder
from .payload import KEY


def _context(ella: torch.Tensor, entry: torch.Tensor, stand_in: int) -> torch.Tensor:
    """ELLA's tokens followed by the entry's tokens after its stand-in (CLIP's in ELLA + CLIP mode, and what
    Conditioning Concat appended), in the ELLA tokens' dtype and device. An entry with a row per frame
    (scheduled prompts, prompt travel) keeps its rows: ELLA's tokens are repeated to them, and a pack that
    splits frames into context windows then slices the entry's rows as it does CLIP's."""
    if entry.shape[1] <= stand_in:
        return ella
    tail = entry[:, stand_in:]
    rows = max(ella.shape[0], tail.shape[0])
    ella = comfy.utils.repeat_to_batch_size(ella, rows)
    return torch.cat([ella, comfy.utils.repeat_to_batch_size(tail, rows).to(ella.device, ella.dtype)], dim=1)


class CondBatchHook:
    """CALC_COND_BATCH wrapper: replaces each ELLA entry's c_crossattn before ComfyUI batches entries. The
    connector's own ModelPatcher places it; the host's run callbacks (`start_run`, `end_run`) bound a run."""

    def __init__(self, builder: ContextBuilder) -> None:
        self.builder = builder
        self._in_run = False
        self._timestep_of: dict[float, float] | None = None  # the run's scheduled sigmas -> timesteps, once read
        self._planned: set[tuple] = set()

    def __deepcopy__(self, memo: dict) -> CondBatchHook:  # ModelPatcher.clone deep-copies model_options
        return self

    def to(self, device_or_dtype: Any) -> CondBatchHook:
        """ComfyUI calls this on wrappers before and after every run (offload device at the end). The
        connector's own ModelPatcher places it, with memory accounting, so nothing moves here."""
        return self

    def start_run(self, patcher: Any = None) -> None:
        """ON_PRE_RUN: a sampling run begins (its schedule is read at its first evaluation)."""
        if _device_copy(patcher):
            return
        self._in_run, self._timestep_of, self._planned = True, None, set()
        self.builder.start_run()

    def end_run(self, patcher: Any = None) -> None:
        """ON_CLEANUP: the run is over; its own rows go (rows kept across runs stay)."""
        if _device_copy(patcher):
            return
        self._in_run, self._timestep_of, self._planned = False, None, set()
        self.builder.end_run()

    def __call__(self, executor: Callable, model: Any, conds: list, x_in: torch.Tensor,
                 timestep: torch.Tensor, model_options: dict) -> Any:
        ella = [e for cond in conds if cond is not None for e in cond if KEY in e["model_conds"]]
        entries = [e for e in ella if _in_range(e, timestep)]
        if entries:
            if self._in_run:
                self._prefill(model, ella, model_options)
            contexts = self._contexts(model, entries, timestep)
            conds = [None if cond is None else [contexts.get(id(e), e) for e in cond] for cond in conds]
        return executor(model, conds, x_in, timestep, model_options)

    def _prefill(self, model: Any, ella: list[dict], model_options: dict) -> None:
        """Once per sampling run (and per entry): the rows of each ELLA entry at the run's scheduled sigmas
        inside its timestep range, computed in batched passes."""
        if self._timestep_of is None:
            sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
            if sigmas is None:
                return
            positive = sigmas[sigmas > 0]
            self._timestep_of = dict(zip(positive.float().tolist(),
                                         model.model_sampling.timestep(positive).float().tolist(), strict=True))
        wanted = []
        for entry in ella:
            prompt = entry["model_conds"][KEY].cond[0]
            plan = (prompt.key, entry.get("timestep_start"), entry.get("timestep_end"))
            if plan not in self._planned:
                self._planned.add(plan)
                wanted.append((prompt, [t for sigma, t in self._timestep_of.items() if _in_range(entry, sigma)]))
        if wanted:
            self.builder.prefill(wanted)

    def _contexts(self, model: Any, entries: list[dict], sigmas: torch.Tensor) -> dict[int, dict]:
        prompts = [e["model_conds"][KEY].cond[0] for e in entries]
        values = sigmas.float().tolist()  # the one device-to-host read of an evaluation
        uniform = values.count(values[0]) == len(values)
        scheduled = self._timestep_of.get(values[0]) if uniform and self._timestep_of else None
        looked_up = None if scheduled is None else self.builder.lookup(prompts, scheduled)
        if looked_up is not None:  # a scheduled sigma: rows computed up front, no device work here
            rows, found = 1, looked_up
        else:
            timesteps = model.model_sampling.timestep(sigmas).float()
            rows = 1 if uniform else len(values)
            found = self.builder.rows([p for p in prompts for _ in range(rows)],
                                      timesteps[:rows].repeat(len(prompts))).split(rows)
        out = {}
        for entry, prompt, context in zip(entries, prompts, found, strict=True):
            model_conds = {k: v for k, v in entry["model_conds"].items() if k != KEY}
            context = _context(context, model_conds["c_crossattn"].cond, prompt.stand_in)
            model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
            out[id(entry)] = {**entry, "model_conds": model_conds}
        return out


def _device_copy(patcher: Any) -> bool:
    """Whether `patcher` is MultiGPU CFG Split's copy of the UNet for an extra device: ComfyUI starts and
    cleans up each copy with the sampled model, whose own callbacks bound the run."""
    return bool(getattr(patcher, "is_multigpu_base_clone", False))


def _in_range(entry: dict, sigma: float | torch.Tensor) -> bool:
    """Whether ComfyUI will run this entry at this sigma: an evaluation's [B] sigmas, of which
    get_area_and_mult compares the first row as a tensor, or a schedule's sigma as a float32 value (the
    tensor comparison rounds the bound to float32 too)."""
    start, end = entry.get("timestep_start"), entry.get("timestep_end")
    if start is None and end is None:
        return True
    if isinstance(sigma, torch.Tensor):
        sigma = sigma[0]
    else:
        start, end = _float32(start), _float32(end)
    return not ((start is not None and sigma > start) or (end is not None and sigma < end))


def _float32(value: float | None) -> float | None:
    if value is None:
        return None
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: a float32 tensor compares it as infinity
        return math.copysign(math.inf, value)
