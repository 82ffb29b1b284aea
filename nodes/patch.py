"""Patch a ComfyUI MODEL so every model evaluation gets ELLA context for its own sigma.

Current hosts: a keyed CALC_COND_BATCH wrapper rewrites each conditioning entry before batching, so
the UNet and ControlNet both see the context. Older hosts: a model_function_wrapper (chained to any
wrapper already there) swaps the context into the batched call. Both are reversible with `remove_ella`.
"""

from __future__ import annotations

import copy
import math
import struct
from collections.abc import Callable
from typing import Any

import comfy.conds
import comfy.model_patcher
import comfy.utils
import torch

from ..ella import Connector
from .context import ContextBuilder
from .host import CALC_COND_BATCH
from .payload import KEY, EllaPrompt

WRAPPER_KEY = "ella_nodes"
RUN_TOKEN = "ella_nodes_run"


def _with_clip(ella: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """ELLA's tokens followed by CLIP's, in the ELLA tokens' dtype and device."""
    clip = comfy.utils.repeat_to_batch_size(clip, ella.shape[0]).to(ella.device, ella.dtype)
    return torch.cat([ella, clip], dim=1)


class _Hook:
    """Shared state of both hook kinds: the connector and its context builder."""

    def __init__(self, connector: Connector) -> None:
        self.builder = ContextBuilder(connector)

    def __deepcopy__(self, memo: dict) -> _Hook:  # ModelPatcher.clone deep-copies model_options
        return self

    def to(self, device_or_dtype: Any) -> _Hook:
        """Follow the UNet when the host moves model patches (dtype is fixed at Apply ELLA)."""
        if not isinstance(device_or_dtype, torch.dtype):
            self.builder.connector.to(device_or_dtype)
        return self

    def _follow(self, device: torch.device) -> None:
        connector = self.builder.connector
        if connector.connector.latents.device != device:
            connector.to(device)


class CondBatchHook(_Hook):
    """CALC_COND_BATCH wrapper: replaces each ELLA entry's c_crossattn before ComfyUI batches entries."""

    def __init__(self, connector: Connector) -> None:
        super().__init__(connector)
        self._run: object = None  # the token of the sampling run in progress
        self._timestep_of: dict[float, float] = {}  # its scheduled sigmas' timesteps
        self._planned: set[tuple] = set()

    def to(self, device_or_dtype: Any) -> CondBatchHook:
        """Current hosts call this on wrappers before and after every run (offload device at the end). The
        connector's own ModelPatcher places it, with memory accounting, so nothing moves here."""
        return self

    def __call__(self, executor: Callable, model: Any, conds: list, x_in: torch.Tensor,
                 timestep: torch.Tensor, model_options: dict) -> Any:
        ella = [e for cond in conds if cond is not None for e in cond if KEY in e["model_conds"]]
        entries = [e for e in ella if _in_range(e, timestep)]
        if entries:
            self._follow(x_in.device)
            self._prefill(model, ella, model_options)
            contexts = self._contexts(model, entries, timestep)
            conds = [None if cond is None else [contexts.get(id(e), e) for e in cond] for cond in conds]
        return executor(model, conds, x_in, timestep, model_options)

    def _prefill(self, model: Any, ella: list[dict], model_options: dict) -> None:
        """Once per sampling run (and per entry): the rows of each ELLA entry at the run's scheduled sigmas
        inside its timestep range, computed in batched passes."""
        options = model_options.get("transformer_options", {})
        sigmas = options.get("sample_sigmas")
        if sigmas is None:
            return
        # the host gives each run its own copy of transformer_options: a token there marks the run (the
        # sigmas tensor may be the same object run after run, e.g. a cached scheduler output on CPU)
        run = options.setdefault(RUN_TOKEN, _RunToken())
        if run is not self._run:
            positive = sigmas[sigmas > 0]
            self._run, self._planned = run, set()
            self._timestep_of = dict(zip(positive.float().tolist(),
                                         model.model_sampling.timestep(positive).float().tolist(), strict=True))
        wanted = []
        for entry in ella:
            prompt = entry["model_conds"][KEY].cond[0]
            plan = (id(prompt.features), entry.get("timestep_start"), entry.get("timestep_end"))
            if plan not in self._planned:
                self._planned.add(plan)
                wanted.append((prompt, [t for sigma, t in self._timestep_of.items() if _in_range(entry, sigma)]))
        if wanted:
            self.builder.prefill(run, wanted)

    def _contexts(self, model: Any, entries: list[dict], sigmas: torch.Tensor) -> dict[int, dict]:
        prompts = [e["model_conds"][KEY].cond[0] for e in entries]
        values = sigmas.float().tolist()  # the one device-to-host read of an evaluation
        uniform = values.count(values[0]) == len(values)
        scheduled = self._timestep_of.get(values[0]) if uniform else None
        looked_up = None if scheduled is None else self.builder.lookup(prompts, scheduled)
        if looked_up is not None:  # a scheduled sigma: rows computed up front, no device work here
            rows, tokens = 1, looked_up
        else:
            timesteps = model.model_sampling.timestep(sigmas).float()
            rows = 1 if uniform else len(values)
            tokens = self.builder.ella_tokens([p for p in prompts for _ in range(rows)],
                                              timesteps[:rows].repeat(len(prompts))).split(rows)
        out = {}
        for entry, prompt, context in zip(entries, prompts, tokens, strict=True):
            model_conds = {k: v for k, v in entry["model_conds"].items() if k != KEY}
            if prompt.clip_tokens:
                context = _with_clip(context, model_conds["c_crossattn"].cond)
            model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
            out[id(entry)] = {**entry, "model_conds": model_conds}
        return out


class _RunToken:
    """Marks one sampling run; copies of the run's options (shallow or deep) keep the same token."""

    def __copy__(self) -> _RunToken:
        return self

    def __deepcopy__(self, memo: dict) -> _RunToken:
        return self


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


class ModelFunctionHook(_Hook):
    """model_function_wrapper: swaps the batched c_crossattn at model-call time; calls `inner` if set."""

    def __init__(self, connector: Connector, inner: Callable | None) -> None:
        super().__init__(connector)
        self.inner = inner

    def __deepcopy__(self, memo: dict) -> ModelFunctionHook:
        twin = ModelFunctionHook.__new__(ModelFunctionHook)
        twin.builder, twin.inner = self.builder, copy.deepcopy(self.inner, memo)
        return twin

    def to(self, device_or_dtype: Any) -> ModelFunctionHook:
        super().to(device_or_dtype)
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(device_or_dtype)
        return self

    def __call__(self, apply_model: Callable, args: dict) -> torch.Tensor:
        c = args["c"]
        if KEY in c:
            c = dict(c)
            prompts: tuple[EllaPrompt, ...] = c.pop(KEY)
            self._follow(args["input"].device)
            timesteps = apply_model.__self__.model_sampling.timestep(args["timestep"]).float()
            context = self.builder.ella_tokens(prompts, timesteps)
            if prompts[0].clip_tokens:
                context = _with_clip(context, c["c_crossattn"])
            c["c_crossattn"] = context
            args = {**args, "c": c}
        if self.inner is not None:
            return self.inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])


def apply_ella(model: comfy.model_patcher.ModelPatcher, connector: Connector,
               placement: Callable[[], comfy.model_patcher.ModelPatcher] | None = None) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` whose sampling gives ELLA conditioning its context; applying again replaces.
    On current hosts `placement` gives the connector's ModelPatcher (a new one when None)."""
    patched = remove_ella(model)
    if CALC_COND_BATCH:
        patched.add_wrapper_with_key(CALC_COND_BATCH, WRAPPER_KEY, CondBatchHook(connector))
        patcher = placement() if placement else comfy.model_patcher.ModelPatcher(
            connector, load_device=model.load_device, offload_device=model.offload_device)
        patched.set_additional_models(WRAPPER_KEY, [patcher])
    else:
        inner = patched.model_options.get("model_function_wrapper")
        patched.set_model_unet_function_wrapper(ModelFunctionHook(connector, inner))
    return patched


def remove_ella(model: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` without ELLA's hooks; other packs' wrappers stay as they were."""
    clean = model.clone()
    if CALC_COND_BATCH:
        clean.remove_wrappers_with_key(CALC_COND_BATCH, WRAPPER_KEY)
        if not clean.wrappers.get(CALC_COND_BATCH, True):
            del clean.wrappers[CALC_COND_BATCH]
        clean.remove_additional_models(WRAPPER_KEY)
        return clean
    wrapper = clean.model_options.get("model_function_wrapper")
    if isinstance(wrapper, ModelFunctionHook):
        if wrapper.inner is None:
            del clean.model_options["model_function_wrapper"]
        else:
            clean.model_options["model_function_wrapper"] = wrapper.inner
    return clean


def ella_builder(model: comfy.model_patcher.ModelPatcher) -> ContextBuilder | None:
    """The context builder ELLA installed on `model`, or None (for tests and benchmarks)."""
    if CALC_COND_BATCH:
        hooks = model.get_wrappers(CALC_COND_BATCH, WRAPPER_KEY)
        return hooks[0].builder if hooks else None
    wrapper = model.model_options.get("model_function_wrapper")
    return wrapper.builder if isinstance(wrapper, ModelFunctionHook) else None
