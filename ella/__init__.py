"""ELLA for Stable Diffusion 1.5: the timestep-aware connector and the T5 encoder, in plain torch.

Public API: load_connector, Connector, ConnectorConfig, load_t5, T5Encoder, EncodedPrompts,
EllaError, EllaLoadError. This package never imports ComfyUI.
"""

from .connector import Connector, ConnectorConfig
from .connector_loading import load_connector
from .errors import EllaError, EllaLoadError
from .t5 import EncodedPrompts, T5Encoder, load_t5

__all__ = [
    "Connector", "ConnectorConfig", "load_connector", "EllaError", "EllaLoadError",
    "EncodedPrompts", "T5Encoder", "load_t5",
]

