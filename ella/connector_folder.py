"""The ELLA connector as a diffusers-style model folder: `config.json` + `diffusion_pytorch_model.safetensors`.

This is the layout diffusers-format ELLA folders use (a pipeline's `ELLA/` component): the weights keep the
released key layout (`time_embedding.*`, `connector.*`) and the config names the sizes with the keys of the
authors' `ELLA` module (time_channel, time_embed_dim, act_fn, out_dim, width, layers, heads, num_latents,
input_dim). Only safetensors weights are read; pickled `.bin` weights are refused, never opened.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .connector import Connector
from .connector_loading import load_connector
from .containment import Roots, contained, default_roots
from .errors import EllaLoadError, fenced
from .t5_files import read_small_text

__all__ = ["CONFIG_NAME", "load_connector_folder", "save_connector_folder", "weights_name"]

log = logging.getLogger("ELLA")

CONFIG_NAME = "config.json"
CLASS_NAME = "ELLA"
# config key -> ConnectorConfig field it must equal (when present)
_SIZES = {"time_channel": "time_channels", "time_embed_dim": "time_embed_dim", "width": "width",
          "layers": "num_blocks", "num_latents": "num_latents", "input_dim": "input_dim", "output_dim": "output_dim"}


def weights_name(variant: str | None = None, suffix: str = "safetensors") -> str:
    """diffusers' weight file name, `diffusion_pytorch_model[.variant].safetensors`."""
    return f"diffusion_pytorch_model{'.' + variant if variant else ''}.{suffix}"


def save_connector_folder(connector: Connector, folder: str | os.PathLike, variant: str | None = None) -> Path:
    """Write `connector` to `folder` as config.json + diffusion_pytorch_model.safetensors; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = connector.config
    config = {"_class_name": CLASS_NAME, "time_channel": cfg.time_channels, "time_embed_dim": cfg.time_embed_dim,
              "act_fn": "silu", "out_dim": None, "width": cfg.width, "layers": cfg.num_blocks, "heads": cfg.heads,
              "num_latents": cfg.num_latents, "input_dim": cfg.input_dim}
    if cfg.output_dim is not None:
        config["output_dim"] = cfg.output_dim
    tensors = {k: v.detach().contiguous().cpu() for k, v in connector.state_dict().items()}
    save_file(tensors, str(folder / weights_name(variant)), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def load_connector_folder(folder: str | os.PathLike, *, roots: Roots | None = None, variant: str | None = None,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Connector:
    """Load a connector folder (config.json + diffusion_pytorch_model.safetensors). Both files must resolve
    inside `roots` (default: the folder); the config must agree with the weights' shapes."""
    folder = Path(folder)
    roots = default_roots(folder) if roots is None else roots
    config_path, weights = folder / CONFIG_NAME, folder / weights_name(variant)
    if not weights.is_file():
        pickled = folder / weights_name(variant, "bin")
        if pickled.exists():
            raise EllaLoadError(f"{pickled}: pickled weights are not loaded (nothing is unpickled); expected "
                                f"{weights.name} in {folder}. Save the connector with safe_serialization=True.")
        raise EllaLoadError(f"{folder}: no ELLA connector weights: {weights.name} is missing (expected "
                            f"{CONFIG_NAME} and {weights.name}, the released key layout).")
    if not config_path.is_file():
        raise EllaLoadError(f"{folder}: the ELLA connector's {CONFIG_NAME} is missing (expected {CONFIG_NAME} "
                            f"and {weights.name}).")
    config = _read_config(config_path, roots)
    heads = _int_field(config_path, config, "heads", 8)
    connector = load_connector(contained(weights, roots), device=device, dtype=dtype, heads=heads)
    wrong = [f"{key} {config[key]!r} (the weights have {getattr(connector.config, field)!r})"
             for key, field in _SIZES.items() if key in config and config[key] != getattr(connector.config, field)]
    if wrong:
        raise EllaLoadError(f"{config_path}: does not match {weights.name}: {'; '.join(wrong)}.")
    log.info("ELLA: loaded connector folder %s", folder)
    return connector


def _read_config(path: Path, roots: Roots) -> dict:
    with fenced(path, "the ELLA connector's config.json"):
        data = json.loads(read_small_text(path, roots, "config.json"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    name = data.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise EllaLoadError(f"{path}: _class_name is {name!r}; expected {CLASS_NAME!r} (an ELLA connector).")
    if data.get("act_fn", "silu") != "silu":
        raise EllaLoadError(f"{path}: act_fn is {data['act_fn']!r}; the ELLA connector uses 'silu'.")
    if data.get("out_dim") not in (None, data.get("time_embed_dim")):
        raise EllaLoadError(f"{path}: out_dim {data['out_dim']!r} is not supported; ELLA's time embedding keeps "
                            "time_embed_dim (out_dim null).")
    return data


def _int_field(path: Path, config: dict, key: str, default: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
        raise EllaLoadError(f"{path}: {key} is {value!r}; expected a whole number from 1 to 1024.")
    return value
