"""The connector against an independent transcription of the reference math, and its loader's errors."""

from __future__ import annotations

import math
import pickle
import struct

import pytest
import torch
from connector_fixtures import RELEASED, TINY, random_connector_state, save_connector
from safetensors.torch import save_file
from torch import nn

import ella
from ella.connector import ConnectorConfig


class ReferenceConnector(nn.Module):
    """The paper's TSC written plainly with torch.nn.MultiheadAttention (no mask support)."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: ConnectorConfig) -> None:
        super().__init__()
        self.s, self.cfg = state, cfg
        self.mha = nn.ModuleList(nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
                                 for _ in range(cfg.num_blocks))
        for i, m in enumerate(self.mha):
            p = f"connector.perceiver_blocks.{i}.attn."
            m.load_state_dict({"in_proj_weight": state[p + "in_proj_weight"], "in_proj_bias": state[p + "in_proj_bias"],
                               "out_proj.weight": state[p + "out_proj.weight"], "out_proj.bias": state[p + "out_proj.bias"]})

    def lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x @ self.s[name + ".weight"].T + self.s[name + ".bias"]

    def ada(self, name: str, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        emb = self.lin(name + ".linear", torch.nn.functional.silu(t_emb))
        shift, scale = emb.chunk(2, dim=-1)
        norm = nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
        return norm * (1 + scale) + shift

    def forward(self, features: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.cfg.time_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = timesteps[:, None].float() * freqs[None]
        sinus = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        sinus = torch.cat([sinus[:, half:], sinus[:, :half]], dim=-1)  # flip_sin_to_cos
        t_emb = self.lin("time_embedding.linear_2", torch.nn.functional.silu(self.lin("time_embedding.linear_1", sinus)))
        t_emb = t_emb[:, None]  # [B, 1, W]
        latents = self.s["connector.latents"][None] + self.lin("connector.time_aware_linear",
                                                                torch.nn.functional.silu(t_emb))
        x = self.lin("connector.proj_in", features)
        for i, mha in enumerate(self.mha):
            p = f"connector.perceiver_blocks.{i}."
            q = self.ada(p + "ln_1", latents, t_emb)
            kv = torch.cat([q, self.ada(p + "ln_2", x, t_emb)], dim=1)
            latents = latents + mha(q, kv, kv, need_weights=False)[0]
            h = self.ada(p + "ln_ff", latents, t_emb)
            h = self.lin(p + "mlp.c_proj", torch.relu(self.lin(p + "mlp.c_fc", h)) ** 2)
            latents = latents + h
        return latents


@pytest.fixture
def tiny_path(tmp_path):
    return save_connector(tmp_path / "ella-tiny.safetensors", TINY, seed=1)


def test_matches_reference_without_mask(tiny_path):
    model = ella.load_connector(tiny_path)
    ref = ReferenceConnector(random_connector_state(TINY, seed=1), TINY)
    features = torch.randn(3, 11, TINY.input_dim)
    t = torch.tensor([999.0, 500.0, 0.0])
    with torch.no_grad():
        assert torch.allclose(model(features, t), ref(features, t), atol=1e-5, rtol=1e-4)


def test_scalar_timestep_equals_per_row(tiny_path):
    model = ella.load_connector(tiny_path)
    features = torch.randn(2, 5, TINY.input_dim)
    assert torch.equal(model(features, 421.0), model(features, torch.tensor([421.0, 421.0])))
    assert not torch.allclose(model(features, 421.0), model(features, 20.0))


def test_padding_mask_batch_equals_each_prompt_alone(tiny_path):
    model = ella.load_connector(tiny_path)
    lengths = [3, 9, 6]
    prompts = [torch.randn(1, n, TINY.input_dim) for n in lengths]
    padded = torch.zeros(3, 9, TINY.input_dim)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[1]] = p[0]
        mask[i, : p.shape[1]] = True
    t = torch.tensor([10.0, 600.0, 999.0])
    with torch.no_grad():
        batched = model(padded, t, mask)
        for i, p in enumerate(prompts):
            alone = model(p, t[i : i + 1])
            assert (batched[i] - alone[0]).abs().max() <= 1e-5
        unmasked = model(padded, t)
    assert (unmasked[0] - batched[0]).abs().max() > 1e-3  # without a mask padding is attended


def test_all_true_mask_equals_no_mask(tiny_path):
    model = ella.load_connector(tiny_path)
    features = torch.randn(2, 7, TINY.input_dim)
    assert torch.allclose(model(features, 300.0), model(features, 300.0, torch.ones(2, 7)), atol=1e-6)


def test_released_size_loads_strictly_and_runs(tmp_path):
    path = save_connector(tmp_path / "ella-sd1.5-tsc-t5xl.safetensors", RELEASED, dtype=torch.float16)
    model = ella.load_connector(path)
    assert len(model.state_dict()) == 93
    assert sum(p.numel() for p in model.parameters()) == 66_820_608
    assert model.config == ConnectorConfig()
    with torch.no_grad():
        out = model(torch.randn(1, 128, 2048), torch.tensor([999.0]))
    assert out.shape == (1, 64, 768) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", [
    ConnectorConfig(width=64, num_latents=16, num_blocks=3, input_dim=40, time_channels=32, time_embed_dim=48, heads=8),
    ConnectorConfig(width=32, num_latents=4, num_blocks=1, input_dim=16, time_channels=8, time_embed_dim=32,
                    output_dim=24, heads=8),
])
def test_configuration_is_inferred_from_shapes(tmp_path, cfg):
    model = ella.load_connector(save_connector(tmp_path / "v.safetensors", cfg))
    assert model.config == cfg
    assert model(torch.randn(2, 5, cfg.input_dim), 100.0).shape == (2, cfg.num_latents, cfg.out_width)


def test_heads_can_be_given(tmp_path):
    path = save_connector(tmp_path / "v.safetensors", TINY)
    assert ella.load_connector(path, heads=2).config.heads == 2
    with pytest.raises(ella.EllaLoadError, match="cannot use 5 heads"):
        ella.load_connector(path, heads=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_on_cpu_is_close_to_fp32(tiny_path, dtype):
    full = ella.load_connector(tiny_path)
    half = ella.load_connector(tiny_path, dtype=dtype)
    assert half.connector.latents.dtype == dtype
    features = torch.randn(2, 6, TINY.input_dim)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    with torch.no_grad():
        out = half(features, torch.tensor([999.0, 1.0]), mask)
        ref = full(features, torch.tensor([999.0, 1.0]), mask)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


# --- bad files: each error names the file and says what was expected ---------------------------

def _assert_clear(path, *fragments):
    with pytest.raises(ella.EllaLoadError) as info:
        ella.load_connector(path)
    message = str(info.value)
    assert str(path) in message and "ELLA connector" in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_pickle_renamed_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "ella.safetensors"
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"weights": Exploit()}))
    _assert_clear(path, "not a safetensors file")
    assert not marker.exists()


def test_zero_bytes_and_random_bytes(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _assert_clear(empty, "empty")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    _assert_clear(noise, "not a safetensors file")


def test_truncated_file(tmp_path, tiny_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_path.read_bytes()[:-100])
    _assert_clear(cut, "truncated")


def test_header_with_absurd_sizes(tmp_path):
    header = b'{"connector.latents":{"dtype":"F32","shape":[100000000000,768],"data_offsets":[0,8]}}'
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    _assert_clear(path, "corrupt")


@pytest.mark.parametrize("kind,state", [
    ("sd-checkpoint", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
                       "first_stage_model.decoder.conv_in.weight": torch.zeros(2),
                       "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2)}),
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}),
    ("clip", {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
              "text_model.final_layer_norm.weight": torch.zeros(8)}),
])
def test_other_models_are_named_with_missing_and_unexpected_keys(tmp_path, kind, state):
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    message = _assert_clear(path, "missing keys", "unexpected keys")
    assert "connector.latents" in message and next(iter(state)) in message


def test_connector_with_a_missing_block_tensor(tmp_path):
    state = random_connector_state(TINY)
    del state["connector.perceiver_blocks.1.mlp.c_fc.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    _assert_clear(tmp_path / "partial.safetensors", "1 missing keys", "perceiver_blocks.1.mlp.c_fc.bias")


def test_missing_file(tmp_path):
    _assert_clear(tmp_path / "nope.safetensors", "cannot read file")


def test_device_and_dtype_follow_the_weights_and_a_host_may_set_device():
    connector = ella.Connector(TINY)
    assert (connector.device, connector.dtype) == (torch.device("cpu"), torch.float32)
    connector.to(torch.bfloat16)
    assert connector.dtype == torch.bfloat16
    connector.device = torch.device("meta")  # ComfyUI's ModelPatcher records its placement so
    assert connector.device == torch.device("cpu")  # the weights did not move: the answer says where they are
    connector.to("meta")
    assert connector.device == torch.device("meta")


def test_weights_left_on_meta_without_an_offload_hook_are_a_clear_error():
    connector = ella.Connector(TINY).to("meta")
    with pytest.raises(ella.EllaError, match="weights of PerceiverResampler are on the 'meta' device"):
        connector(torch.zeros(1, 3, TINY.input_dim), 500.0)
