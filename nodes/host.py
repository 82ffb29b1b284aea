"""What the running ComfyUI offers, detected once (the pack supports the 2024-03 host and current ones)."""

from __future__ import annotations

import inspect

import comfy.model_management as model_management

try:
    from comfy.patcher_extension import WrappersMP
except ImportError:  # ComfyUI before the keyed wrappers (e.g. a28a9dc, 2024-03)
    WrappersMP = None

# Current hosts let a keyed wrapper rewrite each conditioning entry before batching; ControlNet then
# sees the per-step ELLA context too. Older hosts get the context swapped in at model-call time.
CALC_COND_BATCH: str | None = getattr(WrappersMP, "CALC_COND_BATCH", None)

# Current hosts may load a model partly (lowvram budget) unless asked for all of it; T5 needs all of it.
FULL_LOAD: dict = (
    {"force_full_load": True}
    if "force_full_load" in inspect.signature(model_management.load_models_gpu).parameters else {}
)
