"""Pipeline folders whose component configs are absurd, or disagree with their weights, are refused before anything
is built (ella.pipeline_configs, run by the pipelines' from_pretrained): diffusers and transformers build a model
from its config before loading the weights, so a `layers_per_block: 100000` beside 2 MB of weights used to grow
memory by ~90 MiB/s until the process was killed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from connector_fixtures import save_connector
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import load_file, save_file
from t5_fixtures import make_t5_folder
from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import ella
from ella.connector import ConnectorConfig
from ella.pipelines import EllaFixedDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
CONNECTOR = ConnectorConfig(width=32, num_latents=8, num_blocks=2, input_dim=32, time_channels=16, time_embed_dim=32)
VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8, "projection_dim": 16}
TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 99, "max_position_embeddings": 16, "projection_dim": 16}


def tiny_sd(folder: Path) -> Path:
    """A tiny diffusers SD1.x folder with every component StableDiffusionPipeline loads: UNet (1 resnet per block,
    widths 32/64), VAE, DDIM scheduler, a safety checker with its feature extractor, and an image encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONNECTOR.width, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))
    StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                            safety_checker=checker, feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
                            image_encoder=encoder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD folder (copy it before changing it)."""
    return tiny_sd(tmp_path_factory.mktemp("configs") / "sd")


def changed(source: Path, folder: Path, file: str, changes: dict[str, object]) -> Path:
    """A copy of `source` at `folder` whose JSON `file` has `changes` (dotted keys reach into nested objects)."""
    shutil.copytree(source, folder)
    path = folder / file
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = data
        for parent in parents:
            node = node[parent]
        node[key] = value
    path.write_text(json.dumps(data))
    return folder


def case(file: str, key: str, value: object, *, also: dict | None = None, names: str | None = None, tag: str = ""):
    """One folder whose `file` sets `key` to `value` (and `also`); the error must name the file and `names`
    (default: "<key> is")."""
    ident = f"{file.split('/')[0]}-{key}" + "".join(f"-{k}" for k in also or ()) + (f"-{tag}" if tag else "")
    match = rf"{file}: " + (names or rf"{key} is ")
    return pytest.param(file, {key: value, **(also or {})}, match, id=ident)


BIG = 10**9
# Each config key that scales memory, at an absurd value: one row per key (list forms and wrong types for a few).
ABSURD = [
    case("unet/config.json", "layers_per_block", 100000),
    case("unet/config.json", "layers_per_block", [1, 100000], tag="list"),
    case("unet/config.json", "block_out_channels", [32, BIG]),
    case("unet/config.json", "block_out_channels", [32] * 1000, tag="long"),
    case("unet/config.json", "down_block_types", ["CrossAttnDownBlock2D"] * 1000),
    case("unet/config.json", "up_block_types", ["CrossAttnUpBlock2D"] * 1000),
    case("unet/config.json", "transformer_layers_per_block", 100000),
    case("unet/config.json", "reverse_transformer_layers_per_block", [[100000], [1]]),
    case("unet/config.json", "cross_attention_dim", BIG),
    case("unet/config.json", "attention_head_dim", BIG),
    case("unet/config.json", "num_attention_heads", [BIG, 8]),
    case("unet/config.json", "in_channels", BIG),
    case("unet/config.json", "out_channels", BIG),
    case("unet/config.json", "sample_size", 10**6),
    case("unet/config.json", "norm_num_groups", BIG),
    case("unet/config.json", "time_embedding_dim", BIG),
    case("unet/config.json", "time_cond_proj_dim", BIG),
    case("unet/config.json", "num_class_embeds", 10**12),
    case("unet/config.json", "projection_class_embeddings_input_dim", BIG),
    case("unet/config.json", "encoder_hid_dim", BIG),
    case("unet/config.json", "addition_time_embed_dim", BIG),
    case("unet/config.json", "addition_embed_type_num_heads", BIG),
    case("unet/config.json", "conv_in_kernel", 100001),
    case("unet/config.json", "conv_out_kernel", 100001),
    case("unet/config.json", "layers_per_block", "100000", tag="text"),
    case("unet/config.json", "downsample_padding", BIG),  # any other whole number: the generic cap
    case("unet/config.json", "transformer_layers_per_block", 32, also={"layers_per_block": 16},
         names=r"block_out_channels \(2 blocks\), layers_per_block \(16\) and transformer_layers_per_block \(32\) "
               r"describe up to 2144 transformer layers"),
    case("vae/config.json", "layers_per_block", 100000),
    case("vae/config.json", "block_out_channels", [32, BIG]),
    case("vae/config.json", "down_block_types", ["DownEncoderBlock2D"] * 1000),
    case("vae/config.json", "up_block_types", ["UpDecoderBlock2D"] * 1000),
    case("vae/config.json", "latent_channels", BIG),
    case("vae/config.json", "in_channels", BIG),
    case("vae/config.json", "out_channels", BIG),
    case("vae/config.json", "sample_size", BIG),
    case("vae/config.json", "norm_num_groups", BIG),
    case("scheduler/scheduler_config.json", "num_train_timesteps", 10**12),
    case("scheduler/scheduler_config.json", "steps_offset", 10**12),
    case("scheduler/scheduler_config.json", "trained_betas", [0.1] * 5, names=r"trained_betas is .*num_train_timesteps"),
    case("safety_checker/config.json", "vision_config.num_hidden_layers", 100000),
    case("safety_checker/config.json", "vision_config.hidden_size", BIG),
    case("safety_checker/config.json", "vision_config.image_size", BIG),
    case("safety_checker/config.json", "projection_dim", BIG),
    case("image_encoder/config.json", "num_hidden_layers", 100000),
    case("image_encoder/config.json", "intermediate_size", BIG),
    case("feature_extractor/preprocessor_config.json", "crop_size.height", 10**6),
]

_RUNNER = """
import json, resource, sys
import ella
from ella.pipelines import EllaFixedDiffusionPipeline
status = open('/proc/self/status').read()
data_kb = int(status.split('VmData:')[1].split()[0])
# a regression fails fast with MemoryError instead of growing until the machine kills something
resource.setrlimit(resource.RLIMIT_DATA, ((data_kb << 10) + (1 << 30), resource.getrlimit(resource.RLIMIT_DATA)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for ident, folder in json.loads(sys.argv[1]):
    try:
        EllaFixedDiffusionPipeline.from_pretrained(folder)
        message = 'loaded'
    except ella.EllaLoadError as e:
        message = str(e)
    except BaseException as e:
        message = f'{type(e).__name__}: {e}'
    out[ident] = message
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({'cases': out, 'peak_growth_mib': growth}))
"""


@pytest.fixture(scope="module")
def absurd_results(sd_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every ABSURD folder loaded in one child process, whose data memory is capped at 1 GiB above what it holds
    after imports; each case's error message, and how far the peak resident memory grew."""
    tmp = tmp_path_factory.mktemp("absurd")
    folders = [(p.id, str(changed(sd_folder, tmp / p.id, *p.values[:2]))) for p in ABSURD]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(folders)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("file", "changes", "match"), ABSURD)
def test_an_absurd_config_value_is_refused_naming_file_and_key(absurd_results: dict, file: str,
                                                                       changes: dict, match: str,
                                                                       request: pytest.FixtureRequest) -> None:
    ident = request.node.callspec.id
    message = absurd_results["cases"][ident]
    assert re.search(match, message), message


def test_absurd_folders_are_refused_without_building_anything(absurd_results: dict) -> None:
    """All the folders above, one after another in one process: the peak memory hardly moves."""
    assert absurd_results["peak_growth_mib"] < 150, absurd_results["peak_growth_mib"]


MISMATCHED = [  # values within the caps that describe other tensors than the weights hold
    case("unet/config.json", "layers_per_block", 2, names=r"does not match the weights .*unet/diffusion_pytorch_model"
         r"\.safetensors: \d+ tensors it describes are not in the weights \(down_blocks\.0\.attentions\.1\."),
    case("unet/config.json", "block_out_channels", [32, 128],
         names=r"does not match .*tensors differ in shape: .*\(the weights have \(64,"),
    case("unet/config.json", "cross_attention_dim", 64,
         names=r"does not match .*differ in shape: .*attn2\.to_k\.weight \(32, 64\) \(the weights have \(32, 32\)\)"),
    case("unet/config.json", "down_block_types", ["DownBlock2D", "DownBlock2D"],
         names=r"does not match .*tensors of the weights are not in it \(down_blocks\.0\.attentions\.0\."),
    case("vae/config.json", "latent_channels", 8, names=r"does not match .*vae/diffusion_pytorch_model.*differ in shape"),
    case("vae/config.json", "layers_per_block", 2, names=r"does not match .*tensors it describes are not in the weights"),
    case("safety_checker/config.json", "vision_config.num_hidden_layers", 3,
         names=r"does not match the weights .*safety_checker/model\.safetensors: \d+ tensors it describes"),
    case("image_encoder/config.json", "hidden_size", 64, names=r"does not match .*differ in shape"),
    case("model_index.json", "unet", ["diffusers", "UNet2DModel"],
         names=r"unet is \[\"diffusers\", \"UNet2DModel\"\]; expected \[\"diffusers\", \"UNet2DConditionModel\"\]"),
    case("model_index.json", "scheduler", ["diffusers", "UNet2DConditionModel"], names=r"scheduler is .*a diffusers "
         "scheduler class"),
    case("model_index.json", "safety_checker", ["transformers", "CLIPTextModel"], names="safety_checker is"),
    case("model_index.json", "vae", "xy", names=r"vae is \"xy\"; expected \[library, class name\]"),
    case("scheduler/scheduler_config.json", "trained_betas", "linear", names=r"trained_betas is \"linear\""),
]


@pytest.mark.parametrize(("file", "changes", "match"), MISMATCHED)
def test_a_config_that_disagrees_with_its_weights_or_class_is_refused(sd_folder: Path, tmp_path: Path, file: str,
                                                                      changes: dict, match: str) -> None:
    folder = changed(sd_folder, tmp_path / "sd", file, changes)
    with pytest.raises(ella.EllaLoadError, match=match):
        EllaFixedDiffusionPipeline.from_pretrained(folder)


def test_every_component_of_a_sound_folder_loads(sd_folder: Path, tmp_path: Path) -> None:
    """The tiny folder passes the checks with its safety checker, feature extractor and image encoder, and with old
    VAE attention names (query/key/value/proj_attn, which diffusers renames on load); components passed in are not
    read at all."""
    folder = changed(sd_folder, tmp_path / "sd", "model_index.json", {})
    weights = folder / "vae/diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(weights)
    for new, name in old.items():
        for suffix in ("weight", "bias"):
            state[f"encoder.mid_block.attentions.0.{name}.{suffix}"] = state.pop(
                f"encoder.mid_block.attentions.0.{new}.{suffix}")
    save_file(state, str(weights))
    connector, t5 = save_connector(tmp_path / "ella.safetensors", CONNECTOR), make_t5_folder(tmp_path, "hf")
    pipe = EllaFixedDiffusionPipeline.from_pretrained(folder, connector, t5)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert isinstance(pipe.feature_extractor, CLIPImageProcessor)
    config = folder / "safety_checker/config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"projection_dim": 10**9}))
    pipe = EllaFixedDiffusionPipeline.from_pretrained(folder, connector, t5, safety_checker=None,
                                                      requires_safety_checker=False)
    assert pipe.safety_checker is None


def test_a_variant_folder_is_checked_against_its_variant_weights(tmp_path: Path) -> None:
    folder = tiny_sd(tmp_path / "sd")
    StableDiffusionPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None).save_pretrained(
        tmp_path / "fp16", variant="fp16")
    variant = tmp_path / "fp16"
    assert (variant / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (variant / "safety_checker/model.fp16.safetensors").is_file()
    connector, t5 = save_connector(tmp_path / "ella.safetensors", CONNECTOR), make_t5_folder(tmp_path, "hf")
    pipe = EllaFixedDiffusionPipeline.from_pretrained(variant, connector, t5, variant="fp16")
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    config = variant / "unet/config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"layers_per_block": 2}))
    with pytest.raises(ella.EllaLoadError, match=r"unet/config.json: does not match the weights "
                                                 r".*unet/diffusion_pytorch_model\.fp16\.safetensors: "):
        EllaFixedDiffusionPipeline.from_pretrained(variant, connector, t5, variant="fp16")
