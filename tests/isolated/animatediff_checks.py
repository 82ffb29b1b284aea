"""ELLA with AnimateDiff-Evolved (pinned in upstream.py), run by test_with_animatediff.py in a process of its own
(the pack patches ComfyUI when it is imported and when it samples). A random-weight AnimateDiff v2 motion
module on an SD1.5-layout UNet, ADE's sliding context windows shorter than the frame count: at every UNet
call every row's context is connector(its prompt, that call's timestep), in every window."""

from __future__ import annotations

import pytest
import torch
from pack_models import ADE, save_motion_module
from packs import import_pack
from test_nodes_sampling import CONNECTOR, Env, UNetSpy, encode, match_frame_rows, match_sides, sample

FRAMES, LENGTH, OVERLAP = 3, 2, 1  # ADE's static windows: frames 0-1 and 1-2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from comfy_host import boot, comfyui_root
    from connector_fixtures import save_connector
    from t5_fixtures import make_t5_folder
    from tiny_sd import random_sd15

    pack = boot(comfyui_root())
    import folder_paths
    base = tmp_path_factory.mktemp("models")
    folder_paths.models_dir = str(base)  # ADE makes its model folders under models_dir: keep the host clean
    ade = import_pack(ADE, tmp_path_factory.mktemp("custom_nodes"))
    for kind in ("ella", "text_encoders", "animatediff_models"):
        (base / kind).mkdir(exist_ok=True)
    save_connector(base / "ella" / "ella-tiny.safetensors", CONNECTOR, seed=3)
    t5_name = make_t5_folder(base / "text_encoders", "hf").relative_to(base / "text_encoders").as_posix()
    folder_paths.add_model_folder_path("ella", str(base / "ella"))
    folder_paths.add_model_folder_path("clip", str(base / "text_encoders"))
    folder_paths.add_model_folder_path("animatediff_models", str(base / "animatediff_models"))
    save_motion_module(base / "animatediff_models" / "mm-tiny-v2.safetensors")
    unet = random_sd15(tiny=False, dtype=torch.float32)  # ADE injects into SD1.5's 4-level block layout
    n = pack.nodes
    ella = n.loaders.LoadEllaModel().load("ella-tiny.safetensors")[0]
    t5 = n.loaders.LoadT5Encoder().load(t5_name, "auto")[0]
    return Env(pack, unet, ella, t5, base), ade.NODE_CLASS_MAPPINGS


def _animated(model, ade_nodes):
    """`model` through ADE's Gen2 nodes: Load AnimateDiff Model -> Apply -> Use Evolved Sampling with
    Context Options (Standard Static) shorter than the frames."""
    motion = ade_nodes["ADE_LoadAnimateDiffModel"]().load_motion_model("mm-tiny-v2.safetensors")[0]
    m_models = ade_nodes["ADE_ApplyAnimateDiffModelSimple"]().apply_motion_model(motion)[0]
    context = ade_nodes["ADE_StandardStaticContextOptions"]().create_options(LENGTH, OVERLAP)[0]
    return ade_nodes["ADE_UseEvolvedSampling"]().use_evolved_sampling(model, "autoselect", m_models, context)[0], motion


class MotionSpy:
    """Counts the motion module's forward calls (it ran) and the frames it saw per call."""

    def __init__(self, motion):
        self.frames = []
        block = motion.model.down_blocks[0].motion_modules[0]
        self.handle = block.register_forward_pre_hook(lambda m, args: self.frames.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _windows(spy):
    sizes = [c.shape[0] // len(sides) for _, c, sides, _ in spy.calls]
    assert sizes and max(sizes) == LENGTH < FRAMES, sizes  # ADE split the frames into windows
    return sizes


@pytest.mark.parametrize("order", ["ella then ade", "ade then ella"])
@pytest.mark.parametrize("clip", [False, True], ids=["ella", "ella+clip"])
def test_every_window_gets_each_rows_own_context(env, order, clip):
    env, ade_nodes = env
    apply = env.pack.nodes.apply.ApplyElla().apply
    if order == "ella then ade":
        model, motion = _animated(apply(env.unet, env.ella)[0], ade_nodes)
    else:
        animated, motion = _animated(env.unet, ade_nodes)
        model = apply(animated, env.ella)[0]
    pos = encode(env, "a kite rising over a beach", clip=[[torch.randn(1, 77, 768), {}]] if clip else None)
    neg = encode(env, "")
    with UNetSpy(env.unet) as spy, MotionSpy(motion) as mm:
        sample(model, pos, neg, "euler", "normal", steps=2, batch=FRAMES)
    _windows(spy)
    assert mm.frames  # the motion module ran inside the UNet
    seen = match_sides(env, spy, pos, neg)
    assert len({t for _, t in seen}) == 2  # both steps, each at its own timestep


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The full-size CLIP-L text model of a random tiny SD1.5 checkpoint, as Load Checkpoint gives it."""
    import comfy.sd
    from tiny_sd import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-sd15.safetensors")
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False)[1]


def test_prompt_scheduling_as_ellas_clip_part_stays_per_frame(env, clip):
    """ADE's Prompt Scheduling encodes with CLIP only (it cannot carry an ELLA prompt); its output as ELLA Text
    Encode's clip_conditioning has a CLIP row per frame, and each window's rows get ELLA's tokens for that
    timestep followed by their own frame's scheduled CLIP tokens."""
    env, ade_nodes = env
    schedule = '"0": "a kite on the sand", "2": "a kite high in the clouds"'
    scheduled = ade_nodes["ADE_PromptScheduling"]().create_schedule(schedule, clip, max_length=FRAMES)[0]
    frames_clip = scheduled[0][0]
    assert frames_clip.shape[0] == FRAMES  # frame 1 is interpolated between the two prompts
    model, _ = _animated(env.pack.nodes.apply.ApplyElla().apply(env.unet, env.ella)[0], ade_nodes)
    pos = encode(env, "a kite rising over a beach", clip=scheduled)
    neg = encode(env, "")
    with UNetSpy(env.unet) as spy:
        sample(model, pos, neg, steps=2, batch=FRAMES)
    covered = match_frame_rows(env, spy, pos, neg, frames_clip)
    assert covered == set(range(FRAMES))
    _windows(spy)
