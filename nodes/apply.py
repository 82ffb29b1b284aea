"""Apply ELLA: MODEL + ELLA_CONNECTOR -> MODEL whose sampling gives ELLA conditioning its context."""

from __future__ import annotations

from ..ella import EllaError
from .ella_handle import EllaHandle
from .loaders import CATEGORY
from .patch import apply_ella


class ApplyElla:
    """MODEL + ELLA -> MODEL."""

    DESCRIPTION = ("Lets an SD1.5 MODEL read ELLA conditioning: at every model evaluation the connector runs for "
                   "that evaluation's own timestep, for every sampler and scheduler. The input MODEL is not changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 model (LoRAs and other patches may come before or after)."}),
            "ella": ("ELLA_CONNECTOR", {"tooltip": "From 'Load ELLA Model'."}),
        }}

    def apply(self, model, ella: EllaHandle) -> tuple:
        unet = model.model.model_config.unet_config
        width = unet.get("context_dim")
        if width != 768 or unet.get("adm_in_channels"):
            raise EllaError(f"Apply ELLA: this model is not Stable Diffusion 1.5 ({type(model.model.model_config).__name__}, "
                            f"cross-attention width {width}); the released ELLA connector works with SD1.5 models only.")
        if ella.config.out_width != width:
            raise EllaError(f"Apply ELLA: {ella.path.name} gives {ella.config.out_width}-wide tokens but this model's "
                            f"cross-attention expects {width}; use a connector made for this model.")
        # the dtype this clone computes in (fp8 storage computes in manual_cast_dtype): Model Compute Dtype sets it
        # as an object patch of its clone, applied to the UNet all clones share only while that copy is loaded
        dtype = model.get_model_object("manual_cast_dtype") or model.model.get_dtype()
        devices = (model.load_device, model.offload_device)
        return (apply_ella(model, ella.connector(dtype, *devices), ella.row_cache(dtype, *devices),
                           lambda: ella.model_patcher(dtype, *devices)),)
