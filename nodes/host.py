"""The one place that talks to ComfyUI's model hooks: keyed wrappers and callbacks (`comfy.patcher_extension`).

A CALC_COND_BATCH wrapper rewrites each conditioning entry before batching, so the UNet and ControlNet both see
ELLA's context, and the sampling run's start and end come from the host's ON_PRE_RUN / ON_CLEANUP callbacks.
Everything ELLA installs lives under the key `ella_nodes` and is removed by `remove`. A ComfyUI without these
(older than the supported window, see the README) is refused at import with a message saying which to install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .context import ContextBuilder
from .hooks import CondBatchHook

KEY = "ella_nodes"


class KeyedHost:
    """ComfyUI's keyed, composable wrappers and callbacks; the connector has a ModelPatcher of its own."""

    def __init__(self, patcher_extension: Any) -> None:
        self.wrapper = patcher_extension.WrappersMP.CALC_COND_BATCH
        self.callbacks = patcher_extension.CallbacksMP
        # T5 needs all of itself loaded; ComfyUI may load a model partly (lowvram budget) unless asked
        self.full_load: dict = {"force_full_load": True}

    def install(self, model: Any, builder: ContextBuilder, patcher: Callable[[], Any]) -> None:
        """Hook `model` (a fresh clone without ELLA); `patcher()` gives the connector's ModelPatcher."""
        hook = CondBatchHook(builder)
        model.add_wrapper_with_key(self.wrapper, KEY, hook)
        model.add_callback_with_key(self.callbacks.ON_PRE_RUN, KEY, hook.start_run)
        model.add_callback_with_key(self.callbacks.ON_CLEANUP, KEY, hook.end_run)
        model.set_additional_models(KEY, [patcher()])

    def remove(self, model: Any) -> None:
        """Take ELLA's hooks off `model` (a fresh clone); other packs' stay."""
        model.remove_wrappers_with_key(self.wrapper, KEY)
        _drop_empty(model.wrappers, self.wrapper)
        for call in (self.callbacks.ON_PRE_RUN, self.callbacks.ON_CLEANUP):
            model.remove_callbacks_with_key(call, KEY)
            _drop_empty(model.callbacks, call)
        model.remove_additional_models(KEY)

    def find(self, model: Any) -> CondBatchHook | None:
        """ELLA's hook on `model`, or None."""
        hooks = model.get_wrappers(self.wrapper, KEY)
        return hooks[0] if hooks else None

    def own_connector(self, patcher: Any, forget: Callable[[], None]) -> None:
        """Set up the connector's ModelPatcher: `forget` when ComfyUI unloads it (not when it swaps one clone
        for another), and, where ComfyUI deep-clones models for other devices (MultiGPU CFG Split), a deep
        clone that holds nothing."""
        patcher.add_callback_with_key(self.callbacks.ON_DETACH, KEY, _OnUnload(patcher.model, forget))
        if hasattr(self.callbacks, "ON_DEEPCLONE_MULTIGPU"):
            # ComfyUI deep-clones every model attached to the UNet for each extra device, through the reload
            # factory a loader registers. ELLA's rows are made on the main thread before ComfyUI hands the
            # batches to the devices, so only the primary device runs the connector: the clone is empty.
            patcher.cached_patcher_init = (_empty_patcher, (patcher.load_device, patcher.offload_device))
            patcher.add_callback_with_key(self.callbacks.ON_DEEPCLONE_MULTIGPU, KEY, _holds_nothing)


class _OnUnload:
    """ON_DETACH callback: `forget()` when the whole connector is unloaded (its clones on other devices hold
    nothing to forget)."""

    def __init__(self, connector: Any, forget: Callable[[], None]) -> None:
        self.connector, self.forget = connector, forget

    def __call__(self, patcher: Any, unpatch_all: bool) -> None:
        if unpatch_all and patcher.model is self.connector:
            self.forget()


class NoConnectorHere(torch.nn.Module):
    """Stands in for the connector on a device that never computes a row (MultiGPU CFG Split's extra devices)."""


def _empty_patcher(load_device: Any, offload_device: Any, disable_dynamic: bool = False) -> Any:
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(NoConnectorHere(), load_device=load_device, offload_device=offload_device)


def _holds_nothing(original: Any, clone: Any) -> None:
    """ON_DEEPCLONE_MULTIGPU: the clone is sized by what it holds (nothing), not by the connector it copies."""
    if isinstance(clone.model, NoConnectorHere):
        clone.size = 0


def _drop_empty(table: dict, kind: str) -> None:
    if not table.get(kind, True):
        del table[kind]


def _pick() -> KeyedHost:
    try:
        import comfy.patcher_extension as patcher_extension
    except ImportError:
        patcher_extension = None
    if not hasattr(getattr(patcher_extension, "WrappersMP", None), "CALC_COND_BATCH"):
        raise ImportError("ELLA Nodes needs a ComfyUI of the last twelve months (keyed model wrappers, "
                          "comfy.patcher_extension with CALC_COND_BATCH): update ComfyUI, or see the README's "
                          "'Supported ComfyUI versions' for the release of ELLA Nodes that an older one takes.")
    return KeyedHost(patcher_extension)


HOST: KeyedHost = _pick()
