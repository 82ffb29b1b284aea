"""Patch a ComfyUI MODEL so every model evaluation gets ELLA context for its own sigma; reversibly.

The hook is in `hooks.py`; how it is installed is `host.py`'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.model_patcher

from ..ella import Connector
from .context import ContextBuilder
from .host import HOST
from .row_cache import RowCache


def apply_ella(model: comfy.model_patcher.ModelPatcher, connector: Connector, cache: RowCache | None = None,
               placement: Callable[[], comfy.model_patcher.ModelPatcher] | None = None) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` whose sampling gives ELLA conditioning its context; applying again replaces.
    `cache` keeps the connector's rows across runs (a new one when None); `placement` gives the connector's
    ModelPatcher (a new one when None)."""
    patched = remove_ella(model)
    builder = ContextBuilder(connector, RowCache() if cache is None else cache)
    HOST.install(patched, builder, placement or (lambda: comfy.model_patcher.ModelPatcher(
        connector, load_device=model.load_device, offload_device=model.offload_device)))
    return patched


def remove_ella(model: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` without ELLA's hooks; other packs' wrappers stay as they were."""
    clean = model.clone()
    HOST.remove(clean)
    return clean


def ella_hook(model: comfy.model_patcher.ModelPatcher) -> Any:
    """The hook ELLA installed on `model`, or None (for tests and benchmarks)."""
    return HOST.find(model)


def ella_builder(model: comfy.model_patcher.ModelPatcher) -> ContextBuilder | None:
    """The context builder ELLA installed on `model`, or None (for tests and benchmarks)."""
    hook = HOST.find(model)
    return None if hook is None else hook.builder
