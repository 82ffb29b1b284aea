"""Check a diffusers pipeline folder's component configs against their weights before anything is built.

diffusers and transformers build each model from its config file first and load the weights afterwards,
initialising whatever the weights lack: a `unet/config.json` asking for 100,000 layers beside 2 MB of weights
makes them build, and fill, 100,000 layers. So before `from_pretrained` reads the folder, every component it
would load is checked here, as T5 and the ELLA connector are checked against their weights:

1. model_index.json must name the expected class for each component (no UNet built from the scheduler's folder);
2. every config value that scales memory must be a whole number within a cap (or a short list of them), and no
   other whole number may be absurd; the UNet's transformer-layer count as a whole is capped too;
3. each model is then built on the meta device (nothing allocated; the caps bound its size) and its tensor names
   and shapes must be those the safetensors headers of its weights list: a config describing more, or other,
   tensors than the file holds is refused.

Every error is an EllaLoadError naming the file and the key or tensors at fault.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .containment import Roots, contained
from .errors import EllaLoadError, fenced
from .safetensors_io import read_header
from .t5_files import read_small_text, shard_files

__all__ = ["Cap", "check_pipeline_configs"]

log = logging.getLogger("ELLA")


@dataclass(frozen=True)
class Cap:
    """The whole numbers a config key may hold: `low` to `high`, alone or, up to `depth` lists deep, in lists of
    at most `length` entries; null too where `optional`."""

    high: int
    low: int = 1
    depth: int = 0
    length: int = 8
    optional: bool = False
    listed: bool = False  # a list is required (`depth` 1)

    def describe(self) -> str:
        text = f"a whole number from {self.low} to {self.high}"
        if self.listed:
            return f"a list of 1 to {self.length} whole numbers from {self.low} to {self.high}"
        if self.depth:
            text += f" (or a list of up to {self.length} of them{', or of such lists' if self.depth > 1 else ''})"
        return text + (", or null" if self.optional else "")


GENERIC_LIMIT = 65536  # any other whole number in a config: no setting of these models needs more
BLOCKS = 8  # down (and up) blocks of a UNet or VAE
TRANSFORMER_LAYER_BUDGET = 512  # UNet transformer layers, counted generously (SDXL counts 160, for its 70)

_UNET_CAPS = {
    "sample_size": Cap(512, depth=1, length=2, optional=True),
    "in_channels": Cap(256), "out_channels": Cap(256),
    "block_out_channels": Cap(8192, depth=1, length=BLOCKS, listed=True),
    "layers_per_block": Cap(16, depth=1, length=BLOCKS),
    "transformer_layers_per_block": Cap(32, depth=2, length=BLOCKS),
    "reverse_transformer_layers_per_block": Cap(32, depth=2, length=BLOCKS, optional=True),
    "cross_attention_dim": Cap(16384, depth=1, length=BLOCKS),
    "attention_head_dim": Cap(4096, depth=1, length=BLOCKS, optional=True),
    "num_attention_heads": Cap(4096, depth=1, length=BLOCKS, optional=True),
    "norm_num_groups": Cap(1024, optional=True),
    "encoder_hid_dim": Cap(16384, optional=True),
    "addition_time_embed_dim": Cap(16384, optional=True),
    "addition_embed_type_num_heads": Cap(4096),
    "num_class_embeds": Cap(GENERIC_LIMIT, optional=True),
    "time_embedding_dim": Cap(16384, optional=True),
    "time_cond_proj_dim": Cap(16384, optional=True),
    "projection_class_embeddings_input_dim": Cap(GENERIC_LIMIT, optional=True),
    "conv_in_kernel": Cap(15), "conv_out_kernel": Cap(15),
}
_VAE_CAPS = {
    "sample_size": Cap(4096, depth=1, length=2),
    "in_channels": Cap(256), "out_channels": Cap(256), "latent_channels": Cap(256),
    "block_out_channels": Cap(8192, depth=1, length=BLOCKS, listed=True),
    "layers_per_block": Cap(16),
    "norm_num_groups": Cap(1024),
}
_CLIP_CAPS = {  # transformers CLIP configs (safety checker, image encoder), top level and nested
    "hidden_size": Cap(16384), "intermediate_size": Cap(GENERIC_LIMIT), "projection_dim": Cap(16384),
    "num_hidden_layers": Cap(64), "num_attention_heads": Cap(256), "num_channels": Cap(16),
    "image_size": Cap(4096), "patch_size": Cap(1024), "vocab_size": Cap(1_000_000),
    "max_position_embeddings": Cap(GENERIC_LIMIT),
}
_SCHEDULER_CAPS = {"num_train_timesteps": Cap(100_000)}
_BLOCK_LISTS = ("down_block_types", "up_block_types")
_CLIP_NESTED = ("vision_config", "text_config", "vision_config_dict", "text_config_dict")
_PROCESSOR_LIMIT = 4096  # image sizes in a preprocessor config: the safety checker resizes every image to them


@dataclass(frozen=True)
class _Model:
    """A model component: its accepted model_index.json entries, config file, caps and weights file stem."""

    classes: tuple[tuple[str, str], ...]
    caps: dict[str, Cap]
    stem: str  # weights: <stem>[.variant].safetensors or the shard index <stem>.safetensors.index[.variant].json
    config: str = "config.json"


_MODELS = {
    "unet": _Model((("diffusers", "UNet2DConditionModel"),), _UNET_CAPS, "diffusion_pytorch_model"),
    "vae": _Model((("diffusers", "AutoencoderKL"),), _VAE_CAPS, "diffusion_pytorch_model"),
    "safety_checker": _Model((("stable_diffusion", "StableDiffusionSafetyChecker"),
                              ("diffusers", "StableDiffusionSafetyChecker")), _CLIP_CAPS, "model"),
    "image_encoder": _Model((("transformers", "CLIPVisionModelWithProjection"),), _CLIP_CAPS, "model"),
}
_PROCESSORS = {("transformers", name) for name in ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPFeatureExtractor")}
_COMPONENTS = (*_MODELS, "scheduler", "feature_extractor")  # text_encoder and tokenizer are never loaded


def check_pipeline_configs(folder: Path, roots: Roots, index: dict, variant: str | None,
                           passed: Collection[str] = ()) -> None:
    """Check every component StableDiffusionPipeline.from_pretrained would load from `folder` (those listed in
    model_index.json `index`, other than `passed` ones and text_encoder/tokenizer) before it reads any of them."""
    for name, entry in index.items():
        if name in passed or name not in _COMPONENTS or not _loaded(folder, name, entry):
            continue
        with fenced(folder / name, f"the pipeline's {name}"):  # e.g. a RecursionError from a config nested deep
            _check_component(folder, name, entry, roots, variant)


def _check_component(folder: Path, name: str, entry: list, roots: Roots, variant: str | None) -> None:
    part = folder / name
    if name in _MODELS:
        _check_class(folder, name, entry, _MODELS[name].classes)
        _check_model(part, name, _MODELS[name], roots, variant)
    elif name == "scheduler":
        _check_scheduler_class(folder, entry)
        _check_scheduler(part / "scheduler_config.json", _read_config(part / "scheduler_config.json", roots))
    else:  # feature_extractor
        _check_class(folder, name, entry, tuple(sorted(_PROCESSORS)))
        path = part / "preprocessor_config.json"
        _check_generic(path, _read_config(path, roots), {}, _PROCESSOR_LIMIT)


def _loaded(folder: Path, name: str, entry: object) -> bool:
    """Whether diffusers loads a component's model_index.json entry: [library, class] is loaded, [null, null] is
    not; anything else is refused."""
    if isinstance(entry, list) and len(entry) == 2 and entry[0] is None:
        return False
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
        return True
    raise EllaLoadError(f"{folder / 'model_index.json'}: {name} is {_show(entry)}; expected [library, class name], "
                        'e.g. ["diffusers", "UNet2DConditionModel"], or [null, null].')


def _check_class(folder: Path, name: str, entry: list, accepted: tuple[tuple[str, str], ...]) -> None:
    if tuple(entry) not in accepted:
        wanted = " or ".join(json.dumps(list(a)) for a in accepted)
        raise EllaLoadError(f"{folder / 'model_index.json'}: {name} is {_show(entry)}; expected {wanted}.")


def _check_scheduler_class(folder: Path, entry: list) -> None:
    import diffusers
    scheduler = None
    if entry[0] == "diffusers" and entry[1].endswith("Scheduler"):
        try:
            scheduler = getattr(diffusers, entry[1], None)
        except Exception:  # noqa: BLE001  (a lazily imported scheduler whose optional dependency is missing)
            scheduler = None
    if not (isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)):
        raise EllaLoadError(f"{folder / 'model_index.json'}: scheduler is {_show(entry)}; expected "
                            '["diffusers", "<a diffusers scheduler class>"], e.g. ["diffusers", "DDIMScheduler"].')


def _read_config(path: Path, roots: Roots) -> dict:
    if not path.is_file():
        raise EllaLoadError(f"{path}: missing; model_index.json lists {path.parent.name}, which needs it.")
    with fenced(path, path.name):
        data = json.loads(read_small_text(path, roots, path.name))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    return data


def _check_model(part: Path, name: str, model: _Model, roots: Roots, variant: str | None) -> None:
    config_path = part / model.config
    config = _read_config(config_path, roots)
    _check_generic(config_path, config, model.caps, GENERIC_LIMIT)
    if name == "unet":
        _check_unet_layers(config_path, config)
    for key in _BLOCK_LISTS:
        if key in config:
            _check_names(config_path, key, config[key])
    label, weights = _weight_shapes(part, model.stem, variant, roots)
    built = _build_on_meta(config_path, name, config)
    _compare(config_path, label, built, weights, strict=name in ("unet", "vae"))
    log.debug("ELLA: %s matches %s", config_path, label)


def _check_generic(path: Path, config: dict, caps: dict[str, Cap], limit: int, prefix: str = "") -> None:
    """`caps` for their keys (here and in nested CLIP configs); every other whole number within +-`limit`."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key in caps:
            _check_value(path, name, value, caps[key])
        elif isinstance(value, dict):
            _check_generic(path, value, caps if key in _CLIP_NESTED else {}, limit, f"{name}.")
        else:
            for number in _numbers(value):
                if abs(number) > limit:
                    raise EllaLoadError(f"{path}: {name} is {_show(value)}; expected whole numbers of at most "
                                        f"{limit} (no setting of this model needs more).")


def _numbers(value: object) -> Iterator[int]:
    if _whole(value):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(path: Path, key: str, value: object, cap: Cap) -> None:
    if value is None and cap.optional:
        return
    if not _within(value, cap, cap.depth) or (cap.listed and not isinstance(value, list)):
        raise EllaLoadError(f"{path}: {key} is {_show(value)}; expected {cap.describe()}.")


def _within(value: object, cap: Cap, depth: int) -> bool:
    if isinstance(value, list):
        return depth > 0 and 1 <= len(value) <= cap.length and all(_within(v, cap, depth - 1) for v in value)
    return _whole(value) and cap.low <= value <= cap.high


def _check_names(path: Path, key: str, value: object) -> None:
    if not (isinstance(value, list) and 1 <= len(value) <= BLOCKS
            and all(isinstance(v, str) and len(v) <= 64 for v in value)):
        raise EllaLoadError(f"{path}: {key} is {_show(value)}; expected a list of 1 to {BLOCKS} block type names.")


def _check_unet_layers(path: Path, config: dict) -> None:
    """Cap the UNet's transformer layers as a whole (what building it, even on meta, costs), counted generously:
    every block cross-attending, with the most layers any block has, down and up (one resnet more) and mid."""
    blocks = len(config.get("block_out_channels", [0] * 4))
    layers = max(_numbers(config.get("layers_per_block", 2)), default=1)
    depth = max(_numbers([config.get("transformer_layers_per_block", 1),
                          config.get("reverse_transformer_layers_per_block") or []]), default=1)
    count = blocks * (2 * layers + 1) * depth + depth
    if count > TRANSFORMER_LAYER_BUDGET:
        raise EllaLoadError(
            f"{path}: block_out_channels ({blocks} blocks), layers_per_block ({layers}) and "
            f"transformer_layers_per_block ({depth}) describe up to {count} transformer layers (every block counted "
            f"as attending); expected at most {TRANSFORMER_LAYER_BUDGET} (Stable Diffusion XL counts 160).")


def _check_scheduler(path: Path, config: dict) -> None:
    _check_generic(path, config, _SCHEDULER_CAPS, GENERIC_LIMIT)
    betas = config.get("trained_betas")
    steps = config.get("num_train_timesteps", 1000)
    if betas is not None and not (isinstance(betas, list) and len(betas) == steps
                                  and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise EllaLoadError(f"{path}: trained_betas is {_show(betas)}; expected null or a list of "
                            f"num_train_timesteps ({_show(steps)}) numbers.")


def _variant(name: str, variant: str | None) -> str:
    """diffusers' and transformers' variant file name: the variant before the last suffix."""
    if not variant:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def _weight_shapes(part: Path, stem: str, variant: str | None,
                   roots: Roots) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The weights file the loader reads (the shard index, if there is one) and every tensor's shape from the
    safetensors headers; no tensor data is read."""
    index = part / _variant(f"{stem}.safetensors.index.json", variant)
    single = part / _variant(f"{stem}.safetensors", variant)
    if index.is_file():
        label, files = index, shard_files(index, roots)
    elif single.is_file():
        label, files = single, [contained(single, roots)]
    else:
        raise EllaLoadError(f"{part}: no weights: {single.name} is missing (only safetensors weights are loaded).")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        header = read_header(file, expected=f"the safetensors weights of {part.name}")
        shapes |= {key: info.shape for key, info in header.items()}
    return label, shapes


def _build_on_meta(path: Path, name: str, config: dict) -> torch.nn.Module:
    """The component built from `config` on the meta device: its tensors' names and shapes, no storage."""
    with fenced(path, f"{path.name} as the config of the pipeline's {name}"), torch.device("meta"):
        return _BUILDERS[name](config)


def _diffusers_model(class_name: str) -> Callable[[dict], torch.nn.Module]:
    def build(config: dict) -> torch.nn.Module:
        import diffusers
        return getattr(diffusers, class_name).from_config(config)
    return build


def _safety_checker(config: dict) -> torch.nn.Module:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    return StableDiffusionSafetyChecker(CLIPConfig.from_dict(config))


def _image_encoder(config: dict) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config))


_BUILDERS: dict[str, Callable[[dict], torch.nn.Module]] = {
    "unet": _diffusers_model("UNet2DConditionModel"), "vae": _diffusers_model("AutoencoderKL"),
    "safety_checker": _safety_checker, "image_encoder": _image_encoder,
}


def _compare(config_path: Path, label: Path, model: torch.nn.Module, weights: dict[str, tuple[int, ...]],
             strict: bool) -> None:
    """The model's tensors must all be in the weights with the same shapes; with `strict`, the weights may hold
    no others (diffusers' renames of old attention-block names applied first)."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if strict:  # diffusers models: what diffusers renames on load
        weights = model._fix_state_dict_keys_on_load(dict(weights))
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected] if strict else []
    shapes = [f"{k} {expected[k]} (the weights have {weights[k]})" for k in expected
              if k in weights and tuple(weights[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors it describes are not in the weights ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the weights are not in it ({_few(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} tensors differ in shape: {_few(shapes)}")
    if problems:
        raise EllaLoadError(f"{config_path}: does not match the weights {label}: {'; '.join(problems)}. The config "
                            "and the weights belong to different models; use the config saved with the weights.")


def _few(items: list[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (f" and {len(items) - count} more" if len(items) > count else "")


def _show(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, (set, tuple)) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
