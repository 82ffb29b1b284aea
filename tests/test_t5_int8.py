"""T5 with its linear layers in int8 on the CPU (ella.load_t5(storage_dtype="int8"), through torchao): bit for
bit what torchao's own quantized model computes on the same weights, from every layout, load progress, the
load's peak memory, and clear errors (GPU, compute dtype, torchao missing, no int8 kernels)."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch
from t5_fixtures import LAYOUTS, PROMPTS, load_peak_over_weights, make_t5_folder, tiny_t5_config, tiny_t5_state_dict
from test_t5_fp8 import LINEAR, NOT_ALONE
from transformers import T5EncoderModel

from ella.errors import EllaError
from ella.t5 import T5Encoder, load_t5
from ella.t5_int8 import Int8Linear, stored_bytes

torchao_quantization = pytest.importorskip("torchao.quantization", reason="int8 needs torchao (requirements-host.txt)")


def torchao_reference(state: dict, enc: T5Encoder) -> torch.Tensor:
    """Plain transformers T5 in fp32 on `state`, quantized whole by torchao's own quantize_ (every Linear)."""
    model = T5EncoderModel(copy.deepcopy(tiny_t5_config())).eval()
    weights = {k: v.float() for k, v in state.items()}
    model.load_state_dict({**weights, "encoder.embed_tokens.weight": weights["shared.weight"]})
    config = torchao_quantization.Int8DynamicActivationInt8WeightConfig(version=2, set_inductor_config=False)
    torchao_quantization.quantize_(model, config)
    tokens = enc.tokenize(PROMPTS)
    with torch.no_grad():
        return model(input_ids=tokens.input_ids, attention_mask=tokens.mask.long()).last_hidden_state


def test_int8_equals_torchaos_quantized_model_bit_for_bit(hf_folder: Path, state: dict) -> None:
    enc = load_t5(hf_folder, storage_dtype="int8")
    params = dict(enc.model.named_parameters())
    linear = {n: p for n, p in params.items() if n.endswith(LINEAR)}
    assert linear and {p.qdata.dtype for p in linear.values()} == {torch.int8}  # torchao's int8 values
    assert {p.dtype for n, p in params.items() if n not in linear} == {torch.float32}  # embeddings, norms, bias table
    assert enc.storage_dtype == torch.int8 and "stored as torch.int8" in repr(enc)
    features = enc.encode(PROMPTS).features
    assert features.dtype == torch.float32
    assert torch.equal(features, torchao_reference(state, enc))
    # and it is not the fp32 encoder: the weights and activations really were quantized
    assert not torch.equal(features, load_t5(hf_folder).encode(PROMPTS).features)


def test_int8_layers_multiply_signed_int8_without_torchaos_eager_cpu_matmul(
        hf_folder: Path, state: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao 0.18's eager CPU matmul sums every weight's columns again at each call on AVX-512 VNNI CPUs
    without AMX (several times the multiply's own cost); the pack's layers call torch._int_mm themselves."""
    enc = load_t5(hf_folder, storage_dtype="int8")
    want = torchao_reference(state, enc)
    linears = [m for m in enc.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {type(m) for m in linears} == {Int8Linear}

    def not_here(*args: object) -> None:
        raise AssertionError("torchao's eager CPU int8 matmul was called")

    monkeypatch.setattr(importlib.import_module("torchao.kernel.intmm"), "_int_scaled_matmul_cpu", not_here)
    multiplies = []
    real_int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: multiplies.append(a.dtype) or real_int_mm(a, b))
    assert torch.equal(enc.encode(PROMPTS).features, want)
    assert multiplies and set(multiplies) == {torch.int8}  # signed inputs: no unsigned copy, no column sums


@pytest.mark.parametrize("spelling", ["int8", "INT8", "torch.int8", torch.int8])
def test_int8_spellings(hf_folder: Path, spelling) -> None:
    assert load_t5(hf_folder, storage_dtype=spelling).storage_dtype == torch.int8


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in NOT_ALONE])
def test_every_layout_loads_in_int8(tmp_path: Path, hf_folder: Path, layout: str) -> None:
    want = load_t5(hf_folder, storage_dtype="int8").encode(PROMPTS).features
    got = load_t5(make_t5_folder(tmp_path, layout), storage_dtype="int8").encode(PROMPTS).features
    assert torch.equal(got, want)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_a_half_precision_file_is_quantized_from_its_own_values(tmp_path: Path, state: dict, stored) -> None:
    """A 16-bit file's weights, read into float32 one at a time, then quantized: torchao's model on those values."""
    enc = load_t5(make_t5_folder(tmp_path, "single", dtype=stored), storage_dtype="int8")
    assert torch.equal(enc.encode(PROMPTS).features, torchao_reference({k: v.to(stored) for k, v in state.items()}, enc))


def test_load_progress_counts_every_tensor(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    load_t5(make_t5_folder(tmp_path, "hf_sharded"), storage_dtype="int8", progress=lambda d, t: calls.append((d, t)))
    total = len(tiny_t5_state_dict())  # the encoder's tensors, not the shards' decoder ones
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_a_gpu_device_is_refused_naming_cpu(hf_folder: Path) -> None:
    with pytest.raises(EllaError, match="int8 runs on the CPU only .* not on cuda:0: choose device cpu"):
        load_t5(hf_folder, device="cuda:0", storage_dtype="int8")


def test_an_int8_encoder_is_not_moved_to_a_gpu(hf_folder: Path) -> None:
    enc = load_t5(hf_folder, storage_dtype="int8")
    with pytest.raises(EllaError, match="int8 runs on the CPU only .* not on cuda: choose device cpu"):
        enc.to("cuda")
    assert enc.device.type == "cpu"
    assert enc.to("cpu") is enc


def test_a_torchao_without_this_config_is_a_clear_error(hf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another torchao release (other packs install their own) whose config takes other arguments."""
    def other_release(**kwargs: object) -> None:
        raise TypeError("__init__() got an unexpected keyword argument 'version'")

    monkeypatch.setattr(torchao_quantization, "Int8DynamicActivationInt8WeightConfig", other_release)
    with pytest.raises(EllaError, match=r"int8 needs torchao.*TypeError.*pip install torchao==0\.18\.0"):
        load_t5(hf_folder, storage_dtype="int8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, "fp16"])
def test_another_compute_dtype_is_refused(hf_folder: Path, dtype) -> None:
    with pytest.raises(EllaError, match="int8 computes in float32"):
        load_t5(hf_folder, dtype=dtype, storage_dtype="int8")


def test_torchao_missing_is_a_clear_error(hf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(EllaError, match=r"int8 needs torchao.*pip install torchao==0\.18\.0.*or load T5 as fp32"):
        load_t5(hf_folder, storage_dtype="int8")


def test_no_int8_kernels_is_a_clear_error(hf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch or CPU whose int8 matrix multiply fails is found before the weights are read."""
    def missing(*args: object) -> torch.Tensor:
        raise RuntimeError("_int_mm: no kernel for this CPU")

    monkeypatch.setattr(torch, "_int_mm", missing)
    calls = []
    with pytest.raises(EllaError, match="cannot run int8 matrix kernels .*no kernel for this CPU.*load T5 as fp32"):
        load_t5(hf_folder, storage_dtype="int8", progress=lambda d, t: calls.append(d))
    assert not calls


def test_nan_in_the_weights_is_named_as_damage(tmp_path: Path, state: dict) -> None:
    name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    bad = dict(state, **{name: state[name].clone()})
    bad[name][0, 0] = float("nan")
    enc = load_t5(make_t5_folder(tmp_path, "hf", state_dict=bad), storage_dtype="int8")
    with pytest.raises(EllaError, match="non-finite features") as err:
        enc.encode(PROMPTS)
    assert "damaged" in str(err.value) and name in str(err.value)


def test_stored_bytes_count_int8_values_and_scales(hf_folder: Path) -> None:
    enc = load_t5(hf_folder, storage_dtype="int8")
    wo = enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.element_size() == 4  # what the quantized tensor reports: its compute dtype
    assert stored_bytes(wo) == wo.numel() + sum(t.numel() * t.element_size() for t in (wo.scale, wo.zero_point))


def test_loading_int8_peak_memory_stays_near_the_stored_weights(tmp_path: Path) -> None:
    """A 325 MB fp32 T5 (156 MB as stored: 57 MB of int8 linear weights and their scales, 99 MB of fp32
    embedding) loaded in a fresh process: peak RSS above the imports' baseline within 1.5x the stored
    weights (one fp32 weight being quantized, read buffers, allocator slack: about 1.35x here). The fp32 linear
    layers kept on the side while quantizing would reach 2.4x; the heap's holes left in use, 2.5x."""
    config = tiny_t5_config(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=8)
    folder = make_t5_folder(tmp_path, "hf", config=config)
    check = "enc.model.encoder.block[0].layer[0].SelfAttention.q.weight.qdata.dtype == torch.int8"
    assert load_peak_over_weights(folder, "storage_dtype='int8'", check) <= 1.5
