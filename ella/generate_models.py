"""The models of batch generation, from the files the nodes read: an ELLA pipeline with the chosen
scheduler and token-length mode. Local files only; nothing is downloaded. diffusers is imported only
when a pipeline is built, so the command line's --help stays quick."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import EllaError, EllaLoadError, fenced

if TYPE_CHECKING:
    from .pipelines import _EllaPipeline

__all__ = ["SCHEDULERS", "ModelFiles", "load_pipeline"]

log = logging.getLogger("ELLA")

# name -> diffusers scheduler class name, each built from the checkpoint's own scheduler config
SCHEDULERS = {
    "dpmpp_2m": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M): the authors' sampler
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass(frozen=True)
class ModelFiles:
    """Where the models are: `sd` a diffusers SD1.5 folder (or one that save_pretrained wrote, holding ELLA/
    and t5/) or a single-file SD1.5 checkpoint (.safetensors), with `sd_config` a diffusers SD1.5 folder whose
    config files describe it; `ella` the connector file or folder; `t5` a T5 folder or file."""

    sd: Path
    ella: Path | None = None
    t5: Path | None = None
    t5_tokenizer: Path | None = None
    sd_config: Path | None = None


def load_pipeline(files: ModelFiles, *, device: torch.device, dtype: torch.dtype, t5_dtype: torch.dtype,
                  t5_storage: str | None, fixed_tokens: int | None, scheduler: str) -> _EllaPipeline:
    """An ELLA pipeline on `device`: UNet, VAE and connector in `dtype`, T5 computing in `t5_dtype` (linear
    weights stored in `t5_storage`, e.g. "fp8_e4m3fn", if given); prompts padded or cut to `fixed_tokens` T5
    tokens, or read at their own length when it is None; literal prompt text (no weighting markup)."""
    from .pipelines import EllaFixedDiffusionPipeline, EllaFlexDiffusionPipeline

    cls = EllaFlexDiffusionPipeline if fixed_tokens is None else EllaFixedDiffusionPipeline
    if files.sd.is_file():
        pipe = _from_single_file(cls, files, dtype, t5_dtype, t5_storage)
    else:
        pipe = cls.from_pretrained(files.sd, files.ella, files.t5, t5_dtype=t5_dtype, t5_tokenizer=files.t5_tokenizer,
                                   t5_storage_dtype=t5_storage, dtype=dtype, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if fixed_tokens is not None:
        pipe.t5_max_length = fixed_tokens
    pipe.weighted_prompts = False  # benchmark prompts are literal text: brackets are not weights
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make_scheduler(name: str, config: dict) -> object:
    """The scheduler called `name` (a key of SCHEDULERS) built from a checkpoint's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise EllaError(f"Unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}.")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def _from_single_file(cls: type[_EllaPipeline], files: ModelFiles, dtype: torch.dtype, t5_dtype: torch.dtype,
                      t5_storage: str | None) -> _EllaPipeline:
    from diffusers import StableDiffusionPipeline

    from .pipelines import _load_any_connector
    from .t5 import load_t5

    if files.sd.suffix != ".safetensors":
        raise EllaLoadError(f"{files.sd}: only .safetensors checkpoints are read (nothing is unpickled); convert the "
                            "checkpoint to safetensors or pass a diffusers SD1.5 folder.")
    if files.ella is None or files.t5 is None:
        raise EllaError(f"{files.sd} is a single-file checkpoint: pass --ella (the connector file) and --t5 (the "
                        "T5 folder or file) too.")
    if files.sd_config is None:  # else diffusers fetches SD1.5's configs from the network, whatever the flags
        raise EllaLoadError(f"{files.sd}: a single-file checkpoint needs SD1.5's config files, which diffusers would "
                            "download: pass --sd-config with a diffusers SD1.5 folder (model_index.json, unet/config.json, "
                            "vae/config.json, scheduler/scheduler_config.json are enough), or pass a diffusers SD1.5 "
                            "folder as --sd.")
    what = (f"a single-file SD1.5 checkpoint with the configs of {files.sd_config}, which must be a diffusers SD1.5 "
            "folder (model_index.json, unet/config.json, vae/config.json, scheduler/scheduler_config.json)")
    with fenced(files.sd, what):
        sd = StableDiffusionPipeline.from_single_file(
            str(files.sd), local_files_only=True, dtype=dtype, text_encoder=None, tokenizer=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, config=str(files.sd_config))
    connector = _load_any_connector(files.sd.parent, [files.sd.parent], files.ella, None, sd.unet.device, dtype)
    t5 = load_t5(files.t5, tokenizer=files.t5_tokenizer, dtype=t5_dtype, storage_dtype=t5_storage)
    return cls(**sd.components, t5=t5, connector=connector, requires_safety_checker=False)
