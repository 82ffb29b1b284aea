"""Tests of ella.pipelines (the diffusers pipelines) with tiny diffusers components built offline."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from connector_fixtures import TINY, random_connector_state, save_connector
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from open_audit import outside, recorded_opens
from safetensors import safe_open
from safetensors.torch import save_file
from t5_fixtures import make_t5_folder
from tiny_sd import tiny_diffusers_sd

import ella
from ella.connector import ConnectorConfig
from ella.pipelines import EllaFixedDiffusionPipeline, EllaFlexDiffusionPipeline, EllaUNet

ROOT = Path(__file__).resolve().parents[1]
CONNECTOR = ConnectorConfig(width=32, num_latents=8, num_blocks=2, input_dim=32, time_channels=16, time_embed_dim=32)
PROMPTS = ["a cat", "Two red apples and a green pear on a wooden table next to a blue ceramic vase."]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SCHEDULERS = {
    "dpm": lambda: DPMSolverMultistepScheduler(steps_offset=1),
    "ddim": lambda: DDIMScheduler(steps_offset=1, clip_sample=False),
    "euler": lambda: EulerDiscreteScheduler(steps_offset=1),
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny T5 (d_model 32, real tokenizer), a connector of width 32, a tiny UNet and VAE, their files."""
    tmp = tmp_path_factory.mktemp("ella_pipes")
    connector_path = save_connector(tmp / "ella.safetensors", CONNECTOR, seed=0)
    t5_path = make_t5_folder(tmp, "hf")
    unet, vae = tiny_diffusers_sd(CONNECTOR.width)
    return {"tmp": tmp, "connector_path": connector_path, "t5_path": t5_path, "unet": unet, "vae": vae,
            "connector": ella.load_connector(connector_path), "t5": ella.load_t5(t5_path)}


def make_pipe(parts: dict, cls: type = EllaFlexDiffusionPipeline, scheduler: str = "dpm"):
    pipe = cls(vae=parts["vae"], unet=parts["unet"], scheduler=SCHEDULERS[scheduler](), t5=parts["t5"],
               connector=parts["connector"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str | list[str] = PROMPTS, seed: int = 0, **kwargs: object) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def prompt_of_length(t5: ella.T5Encoder, word: str, tokens: int = 128) -> str:
    """A prompt of exactly `tokens` T5 tokens (EOS included)."""
    for repeats in range(1, 2 * tokens):
        text = " ".join([word] * repeats)
        if t5.tokenize(text).token_counts[0] == tokens:
            return text
    raise AssertionError(f"no repetition of {word!r} has {tokens} tokens")


@pytest.mark.parametrize("cls", [EllaFixedDiffusionPipeline, EllaFlexDiffusionPipeline])
def test_images_come_out(parts: dict, cls: type) -> None:
    pipe = make_pipe(parts, cls)
    steps = []

    def on_step_end(pipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        steps.append(tensors["prompt_embeds"].shape)
        return tensors

    out = pipe(PROMPTS, num_inference_steps=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
               callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert len(out.images) == 4 and all(im.size == (16, 16) for im in out.images)
    assert len(steps) == 3 and steps[0][0] == 8  # negative + positive rows, one per image
    assert steps[0][-1] == CONNECTOR.input_dim + 1  # T5 features + the connector mask channel
    latents = generate(pipe, "a dog", output_type="latent", guidance_scale=1.0)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.parametrize(("cls", "scheduler"), [(EllaFlexDiffusionPipeline, "dpm"), (EllaFixedDiffusionPipeline, "ddim"),
                                                (EllaFlexDiffusionPipeline, "euler")])
def test_unet_gets_the_connector_output_of_each_steps_timestep(parts: dict, cls: type, scheduler: str) -> None:
    pipe = make_pipe(parts, cls, scheduler)
    calls = []

    def spy(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        calls.append((args[1].clone(), context.clone()))

    handle = pipe.unet.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        generate(pipe, num_inference_steps=3, num_images_per_prompt=2, guidance_scale=7.0)
    finally:
        handle.remove()
    assert [float(t) for t, _ in calls] == [float(t) for t in pipe.scheduler.timesteps]
    rows = [""] * 4 + [p for p in PROMPTS for _ in range(2)]  # CFG: negatives first, each prompt twice
    alone = {text: parts["t5"].encode([text], max_length=cls.t5_max_length).features for text in set(rows)}
    for t, context in calls:
        assert context.shape == (8, CONNECTOR.num_latents, CONNECTOR.width)
        for row, text in zip(context, rows, strict=True):
            expected = parts["connector"](alone[text], t)[0]
            assert (row - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not torch.allclose(calls[0][1], calls[-1][1])  # the context follows the timestep


def test_fixed_and_flexible_agree_on_a_128_token_prompt(parts: dict) -> None:
    fixed, flex = make_pipe(parts, EllaFixedDiffusionPipeline), make_pipe(parts, EllaFlexDiffusionPipeline)
    prompt, negative = prompt_of_length(parts["t5"], "cat"), prompt_of_length(parts["t5"], "dog")
    a = generate(fixed, prompt, negative_prompt=negative, seed=3)
    b = generate(flex, prompt, negative_prompt=negative, seed=3)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(generate(fixed, "a cat", seed=3), generate(flex, "a cat", seed=3), atol=1e-4)


def test_same_seed_same_images_other_seed_other_images(parts: dict) -> None:
    pipe = make_pipe(parts, EllaFlexDiffusionPipeline)
    first = generate(pipe, seed=7)
    assert np.array_equal(first, generate(pipe, seed=7))
    assert not np.allclose(first, generate(pipe, seed=8), atol=1e-4)


def test_from_pretrained_loads_a_stable_diffusion_folder_without_its_text_encoder(parts: dict) -> None:
    folder = parts["tmp"] / "sd15"
    StableDiffusionPipeline(vae=parts["vae"], text_encoder=None, tokenizer=None, unet=parts["unet"],
                            scheduler=SCHEDULERS["ddim"](), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())  # list a CLIP that is not there: never read
    index |= {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = EllaFixedDiffusionPipeline.from_pretrained(folder, parts["connector_path"], parts["t5_path"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and isinstance(pipe.unet, EllaUNet) and isinstance(pipe.scheduler, DDIMScheduler)
    images = generate(pipe, "a cat", num_images_per_prompt=2)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    again = EllaFlexDiffusionPipeline(**pipe.components)  # components carry the connector inside the EllaUNet
    assert again.connector is pipe.connector and again.unet.unet is pipe.unet.unet


def test_mismatched_parts_and_prompts_raise_clear_errors(parts: dict, tmp_path: Path) -> None:
    narrow = ella.load_connector(save_connector(tmp_path / "tiny.safetensors", TINY))  # reads 24-wide features
    with pytest.raises(ella.EllaError, match="24-wide T5 features"):
        EllaFixedDiffusionPipeline(vae=parts["vae"], unet=parts["unet"], scheduler=SCHEDULERS["ddim"](),
                                   t5=parts["t5"], connector=narrow, safety_checker=None, feature_extractor=None)
    with pytest.raises(ella.EllaError, match="3 negative prompts given for 2 prompts"):
        generate(make_pipe(parts), PROMPTS, negative_prompt=["a", "b", "c"])


def test_import_ella_works_without_diffusers_and_the_pipelines_name_it() -> None:
    code = (
        "import sys\n"
        "import ella\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'diffusers'], 'import ella imported diffusers'\n"
        "sys.modules['diffusers'] = None\n"
        "try:\n"
        "    from ella.pipelines import EllaFixedDiffusionPipeline\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e.name, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.startswith("ModuleNotFoundError diffusers ")
    assert "`diffusers`" in out.stdout and "pip install diffusers" in out.stdout


@pytest.mark.parametrize("cls", [EllaFixedDiffusionPipeline, EllaFlexDiffusionPipeline])
def test_prompt_weights_travel_in_the_mask_channel(parts: dict, cls: type) -> None:
    from ella.pipelines import split_mask
    pipe = make_pipe(parts, cls)
    packed = pipe.encode_t5(["a (red:2) cat on a (mat:0)"])
    assert torch.equal(packed[..., :-1], pipe.encode_t5(["a red cat on a mat"])[..., :-1])
    _, weights = split_mask(packed, CONNECTOR.input_dim)
    assert sorted(set(weights[0].tolist())) == [0.0, 1.0, 2.0]
    plain = generate(pipe, "a red cat")
    assert np.array_equal(generate(pipe, "a (red:1) cat"), plain)
    assert not np.array_equal(generate(pipe, "a (red:4) cat"), plain)
    pipe.weighted_prompts = False  # literal brackets for those who want them
    assert not torch.equal(pipe.encode_t5(["a (red:2) cat"]), pipe.encode_t5(["a red cat"]))


@pytest.mark.parametrize("cls", [EllaFixedDiffusionPipeline, EllaFlexDiffusionPipeline])
def test_prompt_embeds_plain_or_with_the_mask_channel_give_the_prompts_images(parts: dict, cls: type) -> None:
    pipe = make_pipe(parts, cls)
    prompt = "Two red apples and a green pear on a wooden table next to a blue ceramic vase."
    expected = generate(pipe, prompt, seed=5)
    plain = parts["t5"].encode([prompt], max_length=cls.t5_max_length).features  # [1, L, 32]
    packed = pipe.encode_t5([prompt])  # [1, L, 33]
    assert plain.shape[-1] == CONNECTOR.input_dim and packed.shape[-1] == CONNECTOR.input_dim + 1
    for embeds in (plain, packed):
        np.testing.assert_allclose(generate(pipe, None, seed=5, prompt_embeds=embeds), expected, atol=1e-5)
    negative = parts["t5"].encode([""], max_length=cls.t5_max_length).features  # plain, shorter in flexible mode
    both = generate(pipe, None, seed=5, prompt_embeds=packed, negative_prompt_embeds=negative)
    np.testing.assert_allclose(both, expected, atol=1e-5)
    assert not np.allclose(generate(pipe, None, seed=5, prompt_embeds=plain, negative_prompt="a dog"), expected,
                           atol=1e-4)


def test_prompt_embeds_of_the_wrong_width_raise_a_clear_error(parts: dict) -> None:
    pipe = make_pipe(parts, EllaFixedDiffusionPipeline)
    with pytest.raises(ella.EllaError, match=r"prompt_embeds has shape \(1, 128, 31\); expected T5 features"):
        generate(pipe, None, prompt_embeds=torch.zeros(1, 128, 31))
    with pytest.raises(ella.EllaError, match=r"negative_prompt_embeds has shape \(1, 4, 40\)"):
        generate(pipe, None, prompt_embeds=torch.zeros(1, 128, 32), negative_prompt_embeds=torch.zeros(1, 4, 40))
    with pytest.raises(ella.EllaError, match="prompt_embeds has 2 rows but negative_prompt_embeds has 1"):
        generate(pipe, None, prompt_embeds=torch.zeros(2, 128, 32), negative_prompt_embeds=torch.zeros(1, 128, 32))


@pytest.mark.parametrize("cls", [EllaFixedDiffusionPipeline, EllaFlexDiffusionPipeline])
def test_save_pretrained_writes_a_folder_from_pretrained_loads_alone(parts: dict, cls: type, tmp_path: Path) -> None:
    pipe = make_pipe(parts, cls, "ddim")
    expected = generate(pipe, seed=4)
    pipe.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "t5/config.json",
                 "t5/model.safetensors", "t5/tokenizer.json", "ELLA/config.json",
                 "ELLA/diffusion_pytorch_model.safetensors"):
        assert (saved / name).is_file(), name
    assert not list(saved.rglob("*.bin"))
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__ and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    with safe_open(saved / "ELLA/diffusion_pytorch_model.safetensors", "pt") as f:
        assert set(f.keys()) == set(random_connector_state(CONNECTOR))  # the released key layout
    config = json.loads((saved / "ELLA/config.json").read_text())
    assert config | {"_class_name": "ELLA"} == config and config["layers"] == 2 and config["input_dim"] == 32
    loaded = cls.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDIMScheduler) and isinstance(loaded.unet, EllaUNet)
    assert np.array_equal(generate(loaded, seed=4), expected)
    other = (EllaFlexDiffusionPipeline if cls is EllaFixedDiffusionPipeline else EllaFixedDiffusionPipeline)
    twin = other.from_pretrained(saved)  # the twin loads the same folder, in its own token-length mode
    twin.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(twin, seed=4), generate(make_pipe(parts, other, "ddim"), seed=4))


def test_save_pretrained_refuses_pickles(parts: dict, tmp_path: Path) -> None:
    with pytest.raises(ella.EllaError, match="safetensors only"):
        make_pipe(parts).save_pretrained(tmp_path / "x", safe_serialization=False)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def saved(parts: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline folder written by save_pretrained (copy it before changing it)."""
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    make_pipe(parts, EllaFixedDiffusionPipeline, "ddim").save_pretrained(folder)
    return folder


def broken_copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "pipe"
    shutil.copytree(saved, folder)
    return folder


def test_a_folder_that_is_not_a_pipeline_gets_an_error_naming_what_is_missing(saved: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved, tmp_path)
    (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
    (folder / "model_index.json").unlink()
    with pytest.raises(ella.EllaLoadError, match=r"missing model_index.json, unet/diffusion_pytorch_model.safetensors"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ella.EllaLoadError, match="not a folder"):
        EllaFixedDiffusionPipeline.from_pretrained(tmp_path / "nowhere")


def test_a_folder_without_connector_or_t5_names_them(saved: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved, tmp_path)
    shutil.rmtree(folder / "t5")
    with pytest.raises(ella.EllaLoadError, match=r"no T5 encoder: t5/config.json is missing.*t5_path="):
        EllaFixedDiffusionPipeline.from_pretrained(folder)
    shutil.rmtree(folder / "ELLA")
    with pytest.raises(ella.EllaLoadError, match=r"no ELLA connector: the folder ELLA/ .* is missing; pass ella_path="):
        EllaFixedDiffusionPipeline.from_pretrained(folder)


def test_pickled_weights_are_refused_by_name_never_opened(saved: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved, tmp_path)
    weights = folder / "ELLA/diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ella.EllaLoadError, match=r"ELLA/diffusion_pytorch_model.bin: pickled weights are not loaded"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)
    unet = folder / "unet/diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    with pytest.raises(ella.EllaLoadError, match=r"unet/diffusion_pytorch_model.bin: pickled weights are not loaded"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)


def test_a_connector_config_that_disagrees_with_its_weights_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved, tmp_path)
    config_path = folder / "ELLA/config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"layers": 6}))
    with pytest.raises(ella.EllaLoadError, match=r"ELLA/config.json: does not match .*layers 6 \(the weights have 2\)"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)
    config_path.write_text(json.dumps(config | {"heads": "eight"}))
    with pytest.raises(ella.EllaLoadError, match=r"ELLA/config.json: heads is 'eight'"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)
    config_path.write_text("{not json")
    with pytest.raises(ella.EllaLoadError, match=r"ELLA/config.json: cannot read the ELLA connector's config.json"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)


def test_files_linked_from_outside_the_folder_are_not_opened(saved: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    weights = folder / "ELLA/diffusion_pytorch_model.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    with pytest.raises(ella.EllaLoadError, match="outside the model folder"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)
    unet = folder / "unet/diffusion_pytorch_model.safetensors"
    unet.rename(tmp_path / "unet.safetensors")
    unet.symlink_to(tmp_path / "unet.safetensors")
    with pytest.raises(ella.EllaLoadError, match=r"unet/diffusion_pytorch_model.safetensors.*outside the model folder"):
        EllaFixedDiffusionPipeline.from_pretrained(folder)


def test_a_shard_index_whose_entries_lead_out_is_refused_before_anything_is_opened(saved: Path, tmp_path: Path) -> None:
    """diffusers reads unet/diffusion_pytorch_model.safetensors.index.json in preference to the single file."""
    folder = broken_copy(saved, tmp_path)
    escaped = tmp_path / "outside.safetensors"
    (folder / "unet/diffusion_pytorch_model.safetensors").rename(escaped)
    (folder / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"")
    entry = os.path.relpath(escaped, folder / "unet")
    (folder / "unet/diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"conv_in.weight": entry}}))
    with recorded_opens() as opens:
        with pytest.raises(ella.EllaLoadError, match=r"weight_map: .*outside the model folder"):
            EllaFixedDiffusionPipeline.from_pretrained(folder)
    assert not outside(opens, folder)


def write_seed_folder(parts: dict, folder: Path, connector_state: dict[str, torch.Tensor]) -> Path:
    """A folder as the seed's EllaFixedDiffusionPipeline.save_pretrained writes it: a diffusers SD1.5 folder whose
    model_index.json lists its CLIP and an `ELLA` component, and ELLA/ holding the diffusers ModelMixin files of the
    seed's ELLA module (config.json with its __init__ arguments, diffusion_pytorch_model.safetensors whose keys are
    the released layout). The seed saves no T5: it always reads google/flan-t5-xl."""
    StableDiffusionPipeline(vae=parts["vae"], text_encoder=None, tokenizer=None, unet=parts["unet"],
                            scheduler=SCHEDULERS["ddim"](), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "EllaFixedDiffusionPipeline", "ELLA": ["diffusers", "ELLA"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "ELLA").mkdir()
    save_file(connector_state, str(folder / "ELLA/diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = {"_class_name": "ELLA", "_diffusers_version": "0.27.0.dev0", "act_fn": "silu", "heads": 8,
              "input_dim": CONNECTOR.input_dim, "layers": CONNECTOR.num_blocks, "num_latents": CONNECTOR.num_latents,
              "out_dim": None, "time_channel": CONNECTOR.time_channels, "time_embed_dim": CONNECTOR.time_embed_dim,
              "width": CONNECTOR.width}
    (folder / "ELLA/config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.mark.parametrize("cls", [EllaFixedDiffusionPipeline, EllaFlexDiffusionPipeline])
def test_a_folder_in_the_seeds_layout_loads_and_gives_the_three_path_images(parts: dict, cls: type,
                                                                             tmp_path: Path) -> None:
    state = random_connector_state(CONNECTOR, seed=11)
    seed_folder = write_seed_folder(parts, tmp_path / "seed", state)
    save_file(state, str(tmp_path / "same.safetensors"))
    three = cls.from_pretrained(seed_folder, tmp_path / "same.safetensors", parts["t5_path"])
    from_seed = cls.from_pretrained(seed_folder, t5_path=parts["t5_path"])  # the seed saves no T5
    elsewhere = cls.from_pretrained(seed_folder, seed_folder / "ELLA", parts["t5_path"])  # a diffusers ELLA folder
    images = []
    for pipe in (three, from_seed, elsewhere):
        pipe.set_progress_bar_config(disable=True)
        images.append(generate(pipe, seed=2))
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    assert not np.allclose(images[0], generate(make_pipe(parts, cls, "ddim"), seed=2), atol=1e-4)  # other weights
    with pytest.raises(ella.EllaLoadError, match=r"no T5 encoder: t5/config.json is missing"):
        cls.from_pretrained(seed_folder)


def test_model_cpu_offload_installs_hooks_and_gives_the_same_images(parts: dict) -> None:
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs accelerate")
    expected = generate(make_pipe(parts, EllaFixedDiffusionPipeline))
    pipe = make_pipe(parts, EllaFixedDiffusionPipeline)
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(m, "_hf_hook") for m in (pipe.t5, pipe.unet, pipe.vae))
    calls = []
    pipe.t5._hf_hook.pre_forward = lambda module, *a, _f=pipe.t5._hf_hook.pre_forward, **k: calls.append(1) or _f(
        module, *a, **k)
    assert np.array_equal(generate(pipe), expected)
    assert calls  # encode_t5 brought T5 in through its offload hook (T5 has no forward call)


def test_sequential_cpu_offload_gives_the_same_images(parts: dict) -> None:
    """Weights wait on 'meta' and come in layer by layer; T5 and the connector compute where accelerate runs them."""
    pytest.importorskip("accelerate", reason="enable_sequential_cpu_offload needs accelerate")
    expected = generate(make_pipe(parts, EllaFixedDiffusionPipeline))
    own = {name: copy.deepcopy(parts[name]) for name in ("vae", "unet", "t5", "connector")}
    pipe = make_pipe(parts | own, EllaFixedDiffusionPipeline)
    pipe.enable_sequential_cpu_offload(device="cpu")
    for module in (m for component in own.values() for m in component.modules()):
        outer = getattr(module, "_hf_hook", None)
        for hook in getattr(outer, "hooks", (outer,) if outer else ()):
            # diffusers names the CPU "cpu:0", to which .to() copies (a GPU's "cuda:0" matches its tensors, no copy);
            # a copy turns accelerate's reloaded Parameters into plain tensors it cannot park again. Plain "cpu" here.
            hook.execution_device = torch.device("cpu")
    assert pipe.t5.model.shared.weight.device.type == "meta"
    assert pipe.connector.connector.latents.device.type == "meta"
    assert np.array_equal(generate(pipe), expected)


def test_lora_is_refused_clearly(parts: dict) -> None:
    pipe = make_pipe(parts)
    with pytest.raises(ella.EllaError, match="load_lora_weights is not supported.*fuse_lora"):
        pipe.load_lora_weights("some-lora.safetensors")
