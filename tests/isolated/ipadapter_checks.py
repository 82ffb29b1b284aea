"""ELLA with IPAdapter Plus (../shared/packs), run by test_with_ipadapter.py in a process of its own. A random
IPAdapter Plus file for SD1.5 (its key set from the pack's own Resampler), applied through IPAdapter Embeds
with random image embeddings (so no CLIP vision model is needed), before or after Apply ELLA: at every UNet
evaluation IPAdapter's attention patch runs and the text cross-attention of the patched block is given ELLA's
context for that evaluation's timestep, row by row."""

from __future__ import annotations

import sys

import pytest
import torch
from packs import import_pack
from safetensors.torch import save_file
from test_nodes_sampling import UNetSpy, encode, env, match_sides, sample  # noqa: F401  (env: the shared fixture)

IPA = "ComfyUI_IPAdapter_plus"
CLIP_DIM = 64  # width of the image embeddings; the Resampler reads any
PATCHED = "input_blocks.1.1.transformer_blocks.0.attn2"  # the tiny UNet's block IPAdapter patches ("input", 1)
# SD1.5's 16 cross-attentions in IPAdapter's order (input 1,2,4,5,7,8; output 3..11; middle): their widths
WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


@pytest.fixture(scope="module")
def ipa(env):  # noqa: F811
    import folder_paths
    module = import_pack(IPA, env.models / "custom_nodes")
    (env.models / "ipadapter").mkdir()
    folder_paths.add_model_folder_path("ipadapter", str(env.models / "ipadapter"))
    resampler = sys.modules[f"{IPA}.image_proj_models"].Resampler
    with torch.device("meta"):  # the shapes IPAdapter Plus builds for SD1.5 (dim 768, 16 queries)
        shapes = {k: v.shape for k, v in resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16,
                                                   embedding_dim=CLIP_DIM, output_dim=768, ff_mult=4).state_dict().items()}
    gen = torch.Generator().manual_seed(11)
    state = {f"image_proj.{k}": torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    for i, width in enumerate(WIDTHS):
        for kind in ("k", "v"):
            state[f"ip_adapter.{2 * i + 1}.to_{kind}_ip.weight"] = torch.randn(width, 768, generator=gen) * 0.05
    save_file(state, str(env.models / "ipadapter" / "ip-adapter-plus_tiny.safetensors"))
    return module.NODE_CLASS_MAPPINGS


def _ipadapter(model, nodes):
    ipadapter = nodes["IPAdapterModelLoader"]().load_ipadapter_model("ip-adapter-plus_tiny.safetensors")[0]
    gen = torch.Generator().manual_seed(12)
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


@pytest.mark.parametrize("order", ["ella then ipadapter", "ipadapter then ella"])
@pytest.mark.parametrize("clip", [False, True], ids=["ella", "ella+clip"])
def test_ipadapter_patch_runs_and_text_attention_sees_ellas_context(env, ipa, order, clip):  # noqa: F811
    apply = env.pack.nodes.apply.ApplyElla().apply
    model = _ipadapter(apply(env.unet, env.ella)[0], ipa) if order == "ella then ipadapter" else \
        apply(_ipadapter(env.unet, ipa), env.ella)[0]
    pos = encode(env, "a cat wearing a tiny hat", clip=[[torch.randn(1, 77, 768), {}]] if clip else None)
    neg = encode(env, "")
    with UNetSpy(env.unet) as spy, PatchSpy(env.unet, model) as patch:
        sample(model, pos, neg, "dpmpp_2m", "karras", steps=3)
    assert len(patch.ip_calls) >= len(spy.calls) >= 3  # IPAdapter's patch ran at every evaluation
    assert len(patch.text_contexts) == len(spy.calls)
    for (_, context, _, _), text in zip(spy.calls, patch.text_contexts, strict=True):
        assert torch.equal(text, context)  # the patched block's text attention got the UNet's context...
    assert {name for name, _ in match_sides(env, spy, pos, neg)} == {"pos", "neg"}  # ...which is ELLA's, per row
