"""Where a module computes, including under accelerate's offloading (weights parked on 'meta')."""
from __future__ import annotations

import torch
from torch import nn

from .errors import EllaError


def compute_device(owner: nn.Module, weight: torch.Tensor) -> torch.device:
    """The device `owner` computes `weight` on: where the weight is, or, when accelerate's sequential offload
    left it on 'meta', the execution device of the hook that brings it in for each forward."""
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(owner, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(device)
    raise EllaError(f"The weights of {type(owner).__name__} are on the 'meta' device and no offload hook says "
                    "where they compute; load the model's weights before running it.")
