"""The one place that knows which ComfyUI runs: an adapter picked once, at import.

Current hosts (keyed wrappers and callbacks, `comfy.patcher_extension`): a CALC_COND_BATCH wrapper rewrites
each conditioning entry before batching, so the UNet and ControlNet both see ELLA's context, and the sampling
run's start and end come from the host's ON_PRE_RUN / ON_CLEANUP callbacks. The 2024-03 host (a28a9dc): a
model_function_wrapper, chained to any wrapper already there, swaps the context into the batched call.
Everything ELLA installs lives under the key `ella_nodes` and is removed by `remove`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import comfy.model_management as model_management

from .context import ContextBuilder
from .hooks import CondBatchHook, EntrySizeHook, ModelFunctionHook

KEY = "ella_nodes"


class KeyedHost:
    """Current ComfyUI: keyed, composable wrappers and callbacks; the connector has a ModelPatcher of its own."""

    keyed = True

    def __init__(self, patcher_extension: Any) -> None:
        self.wrapper = patcher_extension.WrappersMP.CALC_COND_BATCH
        self.callbacks = patcher_extension.CallbacksMP
        # T5 needs all of itself loaded; these hosts may load a model partly (lowvram budget) unless asked
        accepts = "force_full_load" in inspect.signature(model_management.load_models_gpu).parameters
        self.full_load: dict = {"force_full_load": True} if accepts else {}

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

    def on_unload(self, patcher: Any, forget: Callable[[], None]) -> None:
        """Call `forget` when ComfyUI unloads `patcher`'s model (not when it swaps one clone for another)."""
        patcher.add_callback_with_key(self.callbacks.ON_DETACH, KEY, _OnUnload(forget))


class FunctionWrapperHost:
    """The 2024-03 host: one model_function_wrapper slot, chained; the connector follows the UNet."""

    keyed = False
    full_load: dict = {}

    def install(self, model: Any, builder: ContextBuilder, patcher: Callable[[], Any]) -> None:
        """Hook `model` (a fresh clone without ELLA), keeping any wrapper already there."""
        inner = model.model_options.get("model_function_wrapper")
        model.set_model_unet_function_wrapper(ModelFunctionHook(builder, model.model, inner))
        model.add_object_patch("extra_conds", EntrySizeHook(model.model, model.object_patches.get("extra_conds")))

    def remove(self, model: Any) -> None:
        _unchain(model.model_options, "model_function_wrapper", ModelFunctionHook)
        _unchain(model.object_patches, "extra_conds", EntrySizeHook)

    def find(self, model: Any) -> ModelFunctionHook | None:
        wrapper = model.model_options.get("model_function_wrapper")
        return wrapper if isinstance(wrapper, ModelFunctionHook) else None

    def on_unload(self, patcher: Any, forget: Callable[[], None]) -> None:
        """No connector ModelPatcher on this host: nothing to follow."""


class _OnUnload:
    """ON_DETACH callback: `forget()` when the whole model is unloaded."""

    def __init__(self, forget: Callable[[], None]) -> None:
        self.forget = forget

    def __call__(self, patcher: Any, unpatch_all: bool) -> None:
        if unpatch_all:
            self.forget()


def _drop_empty(table: dict, kind: str) -> None:
    if not table.get(kind, True):
        del table[kind]


def _unchain(slots: dict, key: str, hook_type: type) -> None:
    """Take our hook of `hook_type` out of `slots[key]`, putting back what it wrapped (another pack's), if any."""
    hook = slots.get(key)
    if isinstance(hook, hook_type):
        if hook.inner is None:
            del slots[key]
        else:
            slots[key] = hook.inner


def _pick() -> KeyedHost | FunctionWrapperHost:
    try:
        import comfy.patcher_extension as patcher_extension
    except ImportError:  # ComfyUI before the keyed wrappers (a28a9dc, 2024-03)
        return FunctionWrapperHost()
    if not hasattr(patcher_extension.WrappersMP, "CALC_COND_BATCH"):
        return FunctionWrapperHost()
    return KeyedHost(patcher_extension)


HOST: KeyedHost | FunctionWrapperHost = _pick()
