"""ELLA text-to-image pipelines for diffusers users, built on diffusers' StableDiffusionPipeline.

`EllaFixedDiffusionPipeline` reads prompts as T5 tokens padded or cut to 128 (the training setting);
`EllaFlexDiffusionPipeline` reads each prompt at its own length (the authors' advice for short prompts),
batching prompts of different lengths with the connector's padding mask.

How it works: `encode_prompt` runs T5 (prompts and negative prompts in one call) and returns the features
with one extra last channel, the connector mask (1 = attend, 0 = not; other values are prompt weights
written as `(red dress:1.3)`, ComfyUI's syntax). That tensor travels through the stock
denoising loop as `prompt_embeds`, so classifier-free guidance, `num_images_per_prompt` and step callbacks
keep each row's mask with its features. The pipeline's `unet` is an `EllaUNet`: at every call it runs the
connector on the features with that call's timestep and hands the result to the real UNet as its
cross-attention context.

This module needs `diffusers`; `import ella` does not import it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path

import torch

from .connector import Connector
from .connector_folder import CONFIG_NAME, load_connector_folder, save_connector_folder, weights_name
from .connector_loading import load_connector
from .containment import Roots, contained, default_roots
from .errors import EllaError, EllaLoadError, fenced
from .pipeline_configs import check_pipeline_configs
from .t5 import T5Encoder, load_t5
from .t5_files import TOKENIZER_NAMES, read_small_text, shard_files
from .t5_tokenizer import prompt_list

try:
    from diffusers import StableDiffusionPipeline
except ImportError as e:
    raise ModuleNotFoundError(
        f"ella.pipelines needs the `diffusers` package, which could not be imported ({e}). "
        "Install it with: pip install diffusers", name="diffusers",
    ) from e

__all__ = ["EllaFixedDiffusionPipeline", "EllaFlexDiffusionPipeline", "EllaUNet", "FIXED_LENGTH"]

FIXED_LENGTH = 128
CONNECTOR_FOLDER = "ELLA"  # the pipeline component name diffusers-format ELLA folders use
T5_FOLDER = "t5"
log = logging.getLogger("ELLA")


class EllaUNet(torch.nn.Module):
    """A UNet2DConditionModel whose cross-attention context is the ELLA connector's output at each call.

    Called like the UNet, with `encoder_hidden_states` = T5 features [B, L, D] or features plus a mask
    channel [B, L, D + 1]; `config`, `dtype` and `device` are the UNet's, so diffusers pipelines use it as is.
    """

    def __init__(self, unet: torch.nn.Module, connector: Connector) -> None:
        super().__init__()
        self.unet = unet
        self.connector = connector

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                *args: object, **kwargs: object) -> object:
        features, mask = split_mask(encoder_hidden_states, self.connector.config.input_dim)
        context = self.connector(features, timestep, mask).to(self.unet.dtype)
        return self.unet(sample, timestep, context, *args, **kwargs)


def split_mask(hidden: torch.Tensor, input_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features, connector mask or None) from [B, L, D + 1] packed or [B, L, D] plain T5 features."""
    if hidden.shape[-1] == input_dim:
        return hidden, None
    if hidden.shape[-1] != input_dim + 1:
        raise EllaError(f"encoder_hidden_states have {hidden.shape[-1]} channels; the ELLA connector reads T5 "
                        f"features of width {input_dim} (plus an optional mask channel).")
    weights = hidden[..., -1].float()  # 1 = attended, 0 = not, other values = prompt weights
    return hidden[..., :-1], None if bool((weights == 1).all()) else weights


class _EllaPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline with T5 + the ELLA connector in place of CLIP.

    `text_encoder` and `tokenizer` are accepted and dropped, so `cls(**sd_pipe.components, t5=..., connector=...)`
    works; `unet` may be a UNet2DConditionModel (then `connector` is required) or an EllaUNet.
    """

    t5_max_length: int | None = FIXED_LENGTH
    weighted_prompts = True  # read ComfyUI weighting markup, `(red dress:1.3)`; set False for literal brackets
    model_cpu_offload_seq = "t5->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "text_encoder", "tokenizer"]

    def __init__(self, vae, unet, scheduler, t5: T5Encoder, connector: Connector | None = None, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker: bool = True,
                 text_encoder=None, tokenizer=None) -> None:
        if isinstance(unet, EllaUNet):
            unet, connector = unet.unet, connector or unet.connector
        if connector is None:
            raise EllaError("No ELLA connector given: pass connector=ella.load_connector(...).")
        cfg = connector.config
        if cfg.input_dim != t5.config.d_model:
            raise EllaError(f"The ELLA connector reads {cfg.input_dim}-wide T5 features but the T5 encoder gives "
                            f"{t5.config.d_model}-wide ones; ELLA-SD1.5 needs FLAN-T5-XL.")
        if cfg.out_width != unet.config.cross_attention_dim:
            raise EllaError(f"The ELLA connector gives {cfg.out_width}-wide tokens but the UNet's cross-attention "
                            f"expects {unet.config.cross_attention_dim}; ELLA-SD1.5 needs a Stable Diffusion 1.x UNet.")
        super().__init__(vae=vae, text_encoder=None, tokenizer=None, unet=EllaUNet(unet, connector),
                         scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_modules(t5=t5)

    @property
    def connector(self) -> Connector:
        """The ELLA connector (it lives in `self.unet`, the EllaUNet around the real UNet)."""
        return self.unet.connector

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, ella_path: str | os.PathLike | None = None,
                        t5_path: str | os.PathLike | None = None, *, t5_dtype: torch.dtype | str | None = None,
                        t5_tokenizer: str | os.PathLike | None = None,
                        t5_storage_dtype: torch.dtype | str | None = None, **kwargs: object) -> _EllaPipeline:
        """Load a local diffusers folder: one that `save_pretrained` wrote (model_index.json, unet/, vae/,
        scheduler/, t5/, ELLA/), or a Stable Diffusion 1.x folder (its CLIP is not loaded) with an `ELLA/`
        connector folder inside (the seed's layout) or `ella_path` (a connector .safetensors file or a
        diffusers-format ELLA folder: config.json + diffusion_pytorch_model.safetensors), and a `t5/` folder inside
        or `t5_path` (a T5 folder or file). Local files only; only safetensors weights, never pickles; every file
        of the folder must resolve inside it. `kwargs` go to StableDiffusionPipeline.from_pretrained
        (e.g. torch_dtype, safety_checker=None, variant); the connector takes the UNet's dtype, T5 takes
        `t5_dtype` (None: float32 on CPU) and stores its linear weights in `t5_storage_dtype` if given
        (e.g. "fp8_e4m3fn", as ella.load_t5). Move everything with `.to("cuda")` afterwards."""
        folder = Path(path).expanduser()
        roots = [folder]
        variant = kwargs.get("variant")
        _check_pipeline_folder(folder, roots, variant, passed=kwargs)
        kwargs |= {"local_files_only": True, "use_safetensors": True}
        with fenced(folder, "a diffusers Stable Diffusion 1.x folder (model_index.json, unet/, vae/, scheduler/)"):
            sd = StableDiffusionPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, **kwargs)
        device, dtype = sd.unet.device, sd.unet.dtype
        connector = _load_any_connector(folder, roots, ella_path, variant, device, dtype)
        if t5_path is None:
            t5_folder = folder / T5_FOLDER
            if not (t5_folder / "config.json").is_file():
                raise EllaLoadError(f"{folder}: no T5 encoder: {T5_FOLDER}/config.json is missing (a folder written by "
                                    "save_pretrained holds t5/ with config.json, model.safetensors, tokenizer.json); "
                                    "pass t5_path= (a FLAN-T5-XL folder or file).")
            t5 = load_t5(t5_folder, tokenizer=t5_tokenizer, device=device, dtype=t5_dtype,
                         storage_dtype=t5_storage_dtype, roots=roots)
        else:
            t5 = load_t5(t5_path, tokenizer=t5_tokenizer, device=device, dtype=t5_dtype, storage_dtype=t5_storage_dtype)
        return cls(**sd.components, t5=t5, connector=connector,
                   requires_safety_checker=sd.config.requires_safety_checker)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, **kwargs: object) -> None:
        """Write a complete diffusers folder that `from_pretrained(save_directory)` loads alone:
        model_index.json, unet/, vae/, scheduler/ (and any safety checker), t5/ (the T5 encoder as
        config.json + model.safetensors, with its tokenizer file) and ELLA/ (the connector: config.json +
        diffusion_pytorch_model.safetensors in the released key layout). Safetensors only."""
        if not safe_serialization:
            raise EllaError("ELLA pipelines save safetensors only (safe_serialization=True); pickles are never written.")
        if kwargs.get("push_to_hub"):
            raise EllaError("push_to_hub is not supported; save locally and upload the folder.")
        folder = Path(save_directory)
        plain = StableDiffusionPipeline(
            vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet.unet, scheduler=self.scheduler,
            safety_checker=self.safety_checker, feature_extractor=self.feature_extractor,
            image_encoder=self.image_encoder, requires_safety_checker=self.config.requires_safety_checker)
        plain.save_pretrained(folder, safe_serialization=True, variant=variant)
        self._save_t5(folder / T5_FOLDER)
        save_connector_folder(self.connector, folder / CONNECTOR_FOLDER, variant)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index |= {"_class_name": type(self).__name__, T5_FOLDER: ["transformers", "T5EncoderModel"],
                  CONNECTOR_FOLDER: ["ella", "Connector"]}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        log.info("ELLA: saved pipeline to %s", folder)

    def _save_t5(self, folder: Path) -> None:
        tokenizer = Path(self.t5.tokenizer.path)
        if tokenizer.name not in TOKENIZER_NAMES:
            raise EllaError(f"Cannot save the T5 tokenizer {tokenizer}: expected a file named one of "
                            f"{', '.join(TOKENIZER_NAMES)}.")
        self.t5.model.save_pretrained(folder, safe_serialization=True)
        shutil.copyfile(tokenizer, folder / tokenizer.name)

    def load_lora_weights(self, *args: object, **kwargs: object) -> None:
        """Refused: LoRA loading does not reach the UNet inside the EllaUNet wrapper."""
        raise EllaError("load_lora_weights is not supported on ELLA pipelines (the UNet sits inside pipe.unet, an "
                        "EllaUNet). Load and fuse the LoRA on a StableDiffusionPipeline first (sd.load_lora_weights(...); "
                        "sd.fuse_lora()), then build the ELLA pipeline from sd.components.")

    def encode_t5(self, texts: str | Sequence[str]) -> torch.Tensor:
        """T5 features of prompts with the connector mask (token weights when the prompt has ComfyUI
        weighting markup such as `(red dress:1.3)`) as an extra last channel: [N, L, d_model + 1]."""
        hook = getattr(self.t5, "_hf_hook", None)  # enable_model_cpu_offload: bring T5 in (it has no forward call)
        if hook is not None:
            hook.pre_forward(self.t5)
        encoded = self.t5.encode(texts, max_length=self.t5_max_length, weighted=self.weighted_prompts)
        mask = encoded.connector_mask[..., None].to(encoded.features.dtype)
        return torch.cat([encoded.features, mask], dim=-1)

    def check_inputs(self, prompt, height, width, callback_steps, negative_prompt=None, prompt_embeds=None,
                     negative_prompt_embeds=None, *args: object, **kwargs: object) -> None:
        """diffusers' checks, except that prompt_embeds and negative_prompt_embeds may differ in token length
        and in form (plain T5 features or with the mask channel): encode_prompt brings them to one."""
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape[0] != negative_prompt_embeds.shape[0]:
                raise EllaError(f"prompt_embeds has {prompt_embeds.shape[0]} rows but negative_prompt_embeds has "
                                f"{negative_prompt_embeds.shape[0]}; give one negative row per prompt row.")
            if negative_prompt is not None:
                raise EllaError("Give negative_prompt or negative_prompt_embeds, not both.")
            negative_prompt_embeds = None  # checked here; the stock check wants equal shapes
        super().check_inputs(prompt, height, width, callback_steps, negative_prompt, prompt_embeds,
                             negative_prompt_embeds, *args, **kwargs)

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      lora_scale=None, clip_skip=None):
        """Prompts (and negative prompts, "" by default) through T5 in one call, one row per image.

        `prompt_embeds` / `negative_prompt_embeds`, if given, are `encode_t5` outputs [B, L, D + 1] or plain T5
        features [B, L, D] (every token attended, as in the reference); lora_scale and clip_skip are CLIP options
        and are ignored."""
        prompt_embeds = self._with_mask(prompt_embeds, "prompt_embeds")
        negative_prompt_embeds = self._with_mask(negative_prompt_embeds, "negative_prompt_embeds")
        negatives = []
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            count = len(prompt_list(prompt)) if prompt_embeds is None else prompt_embeds.shape[0]
            negatives = self._negative_prompts(negative_prompt, count)
        if prompt_embeds is None:
            prompts = prompt_list(prompt)
            both = self.encode_t5(prompts + negatives)
            prompt_embeds, encoded_negatives = both[: len(prompts)], both[len(prompts):]
        else:
            encoded_negatives = self.encode_t5(negatives) if negatives else None
        if negatives:
            negative_prompt_embeds = encoded_negatives
        prompt_embeds = self._per_image(prompt_embeds, num_images_per_prompt, device)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        negative_prompt_embeds = self._per_image(negative_prompt_embeds, num_images_per_prompt, device)
        return self._same_length(prompt_embeds, negative_prompt_embeds)

    def _with_mask(self, embeds: torch.Tensor | None, name: str) -> torch.Tensor | None:
        """`embeds` with the connector mask channel: plain T5 features [B, L, D] get an all-ones mask."""
        if embeds is None:
            return None
        width = self.connector.config.input_dim
        if embeds.ndim != 3 or embeds.shape[-1] not in (width, width + 1):
            raise EllaError(f"{name} has shape {tuple(embeds.shape)}; expected T5 features [batch, tokens, {width}] "
                            f"or pipe.encode_t5(...) output [batch, tokens, {width + 1}] (features + mask channel).")
        if embeds.shape[-1] == width + 1:
            return embeds
        return torch.cat([embeds, embeds.new_ones(*embeds.shape[:2], 1)], dim=-1)

    @staticmethod
    def _negative_prompts(negative_prompt: str | Sequence[str] | None, count: int) -> list[str]:
        negatives = prompt_list("" if negative_prompt is None else negative_prompt)
        if len(negatives) == 1:
            return negatives * count
        if len(negatives) != count:
            raise EllaError(f"{len(negatives)} negative prompts given for {count} prompts; give one, or one per prompt.")
        return negatives

    def _per_image(self, embeds: torch.Tensor, num_images_per_prompt: int, device: torch.device) -> torch.Tensor:
        return embeds.to(device=device, dtype=self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)

    def _same_length(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad prompt and negative features to one token length with masked-out (all-zero) tokens."""
        if a.shape[1] == b.shape[1]:
            return a, b
        length = max(a.shape[1], b.shape[1])
        return tuple(torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1])) for x in (a, b))


class EllaFixedDiffusionPipeline(_EllaPipeline):
    """ELLA for Stable Diffusion 1.x with T5 prompts padded or cut to 128 tokens, as ELLA was trained."""

    t5_max_length = FIXED_LENGTH


class EllaFlexDiffusionPipeline(_EllaPipeline):
    """ELLA for Stable Diffusion 1.x with each prompt read at its own T5 length (up to 512 tokens)."""

    t5_max_length = None


_SD_PARTS = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}


def _check_pipeline_folder(folder: Path, roots: Roots, variant: str | None, passed: Collection[str] = ()) -> None:
    """Refuse a folder that is not a local diffusers SD folder, naming what is missing, before diffusers reads it;
    every file diffusers will open must resolve inside the folder and be safetensors, and every config of a
    component it will load (all but the `passed` ones) must be within caps and match its weights."""
    if not folder.is_dir():
        raise EllaLoadError(f"{folder}: not a folder; expected a diffusers pipeline folder (model_index.json, unet/, "
                            "vae/, scheduler/), e.g. one written by save_pretrained.")
    index = folder / "model_index.json"
    missing = [] if index.is_file() else ["model_index.json"]
    for part, config in _SD_PARTS.items():
        names = [config] if part == "scheduler" else [config, weights_name(variant)]
        for name in names:
            file = folder / part / name
            if not file.is_file():
                pickled = file.with_suffix(".bin")
                if pickled.exists():
                    raise EllaLoadError(f"{pickled}: pickled weights are not loaded (nothing is unpickled); expected "
                                        f"{file.name}. Convert the folder to safetensors.")
                missing.append(f"{part}/{name}")
            else:
                contained(file, roots)
    if missing:
        raise EllaLoadError(f"{folder}: not a diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
                            "Expected a folder written by save_pretrained (model_index.json, unet/, vae/, scheduler/, "
                            "t5/, ELLA/) or a diffusers SD1.x folder.")
    with fenced(index, "model_index.json"):
        data = json.loads(read_small_text(index, roots, "model_index.json"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    for part in ("safety_checker", "feature_extractor", "image_encoder"):
        entry = data.get(part)
        if isinstance(entry, list) and entry and entry[0] is not None and (folder / part).is_dir():
            for file in (folder / part).iterdir():
                contained(file, roots)
    for index in folder.glob("*/*.safetensors.index*.json"):  # diffusers/transformers prefer an index if present
        shard_files(index, roots)
    check_pipeline_configs(folder, roots, data, variant, passed)


def _load_any_connector(folder: Path, roots: Roots, ella_path: str | os.PathLike | None, variant: str | None,
                        device: torch.device, dtype: torch.dtype) -> Connector:
    """The connector from `ella_path` (a .safetensors file or a connector folder) or the folder's ELLA/."""
    if ella_path is not None:
        ella_path = Path(ella_path).expanduser()
        if ella_path.is_dir():
            return load_connector_folder(ella_path, roots=default_roots(ella_path), variant=variant,
                                         device=device, dtype=dtype)
        return load_connector(ella_path, device=device, dtype=dtype)
    inside = folder / CONNECTOR_FOLDER
    if not inside.is_dir():
        raise EllaLoadError(f"{folder}: no ELLA connector: the folder {CONNECTOR_FOLDER}/ (with {CONFIG_NAME} and "
                            f"{weights_name(variant)}) is missing; pass ella_path= (ella-sd1.5-tsc-t5xl.safetensors).")
    return load_connector_folder(inside, roots=roots, variant=variant, device=device, dtype=dtype)
