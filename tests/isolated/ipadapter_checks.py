"""ELLA with IPAdapter Plus (pinned in upstream.py), run by test_with_ipadapter.py in a process of its own. A random
IPAdapter Plus file for SD1.5 (its key set from the pack's own Resampler), applied before or after Apply ELLA
through IPAdapter Embeds with random image embeddings, or through IPAdapter Advanced with an image and a
random CLIP ViT-L (the smallest image encoder ComfyUI's clip_vision loader detects): at every UNet evaluation
IPAdapter's attention patch runs and the text cross-attention of the patched block is given ELLA's context
for that evaluation's timestep, row by row."""

from __future__ import annotations

import pytest
import torch
from pack_models import IPA, save_ipadapter_plus
from packs import import_pack
from test_nodes_sampling import UNetSpy, encode, env, match_sides, sample  # noqa: F401  (env: the shared fixture)

CLIP_DIM = 64  # width of the image embeddings; the Resampler reads any
PATCHED = "input_blocks.1.1.transformer_blocks.0.attn2"  # the tiny UNet's block IPAdapter patches ("input", 1)


@pytest.fixture(scope="module")
def ipa(env):  # noqa: F811
    import folder_paths
    module = import_pack(IPA, env.models / "custom_nodes")
    (env.models / "ipadapter").mkdir()
    folder_paths.add_model_folder_path("ipadapter", str(env.models / "ipadapter"))
    save_ipadapter_plus(env.models / "ipadapter" / "ip-adapter-plus_tiny.safetensors", image_width=CLIP_DIM)
    save_ipadapter_plus(env.models / "ipadapter" / "ip-adapter-plus_vitl.safetensors", image_width=1024)
    return module.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def clip_vision(env):  # noqa: F811
    import comfy.clip_vision
    from tiny_sd import save_clip_vision_vit_l

    return comfy.clip_vision.load(str(save_clip_vision_vit_l(env.models / "clip-vit-l.safetensors")))


def _ipadapter(model, nodes, clip_vision=None):
    """`model` through IPAdapter Embeds (random embeddings), or IPAdapter Advanced (an image) if `clip_vision`."""
    gen = torch.Generator().manual_seed(12)
    if clip_vision is not None:
        ipadapter = nodes["IPAdapterModelLoader"]().load_ipadapter_model("ip-adapter-plus_vitl.safetensors")[0]
        return nodes["IPAdapterAdvanced"]().apply_ipadapter(model, ipadapter, image=torch.rand(1, 64, 64, 3, generator=gen),
                                                            clip_vision=clip_vision)[0]
    ipadapter = nodes["IPAdapterModelLoader"]().load_ipadapter_model("ip-adapter-plus_tiny.safetensors")[0]
    pos, neg = torch.randn(1, 16, CLIP_DIM, generator=gen), torch.randn(1, 16, CLIP_DIM, generator=gen)
    return nodes["IPAdapterEmbeds"]().apply_ipadapter(model, ipadapter, pos, 1.0, "linear", 0.0, 1.0, neg_embed=neg,
                                                      embeds_scaling="V only")[0]


class PatchSpy:
    """IPAdapter's key/value projections for the patched block (it ran), and the context given to that block's
    own text key projection at each call."""

    def __init__(self, unet, model):
        patch = model.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)]
        layers = patch.kwargs[0]["ipadapter"].ip_layers.to_kvs
        self.ip_calls, self.text_contexts = [], []
        self.handles = [layers["1_to_k_ip"].register_forward_hook(lambda *a: self.ip_calls.append(1)),
                        dict(unet.model.diffusion_model.named_modules())[f"{PATCHED}.to_k"].register_forward_pre_hook(
                            lambda m, args: self.text_contexts.append(args[0].detach().clone()))]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


ORDERS = ["ella then ipadapter", "ipadapter then ella"]
CASES = [(order, clip, False) for order in ORDERS for clip in (False, True)] + [(order, False, True) for order in ORDERS]


@pytest.mark.parametrize(("order", "clip", "image"), CASES,
                         ids=[f"{o}-{'ella+clip' if c else 'ella'}-{'image' if i else 'embeds'}" for o, c, i in CASES])
def test_ipadapter_patch_runs_and_text_attention_sees_ellas_context(env, ipa, request, order, clip, image):  # noqa: F811
    apply = env.pack.nodes.apply.ApplyElla().apply
    vision = request.getfixturevalue("clip_vision") if image else None
    model = _ipadapter(apply(env.unet, env.ella)[0], ipa, vision) if order == "ella then ipadapter" else \
        apply(_ipadapter(env.unet, ipa, vision), env.ella)[0]
    pos = encode(env, "a cat wearing a tiny hat", clip=[[torch.randn(1, 77, 768), {}]] if clip else None)
    neg = encode(env, "")
    with UNetSpy(env.unet) as spy, PatchSpy(env.unet, model) as patch:
        sample(model, pos, neg, "dpmpp_2m", "karras", steps=3)
    assert len(patch.ip_calls) >= len(spy.calls) >= 3  # IPAdapter's patch ran at every evaluation
    assert len(patch.text_contexts) == len(spy.calls)
    for (_, context, _, _), text in zip(spy.calls, patch.text_contexts, strict=True):
        assert torch.equal(text, context)  # the patched block's text attention got the UNet's context...
    assert {name for name, _ in match_sides(env, spy, pos, neg)} == {"pos", "neg"}  # ...which is ELLA's, per row
