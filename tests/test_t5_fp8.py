"""T5 with its linear layers stored in fp8 (ella.load_t5(storage_dtype=...)): exact against a
dequantize-then-compute reference, the same from an fp8 file as from an fp16 one, every layout, load
progress, memory, and clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from t5_fixtures import LAYOUTS, PROMPTS, load_peak_over_weights, make_t5_folder, tiny_t5_config, tiny_t5_state_dict
from transformers import T5EncoderModel

import ella
from ella.errors import EllaError
from ella.t5 import T5Encoder, load_t5

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
LINEAR = ("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")
NOT_ALONE = {"single_bare", "pytorch_bin"}  # as in test_t5.py: each needs more than a path


def to_fp8(weight: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """What storing in fp8 means: saturate at the format's range, then round."""
    limit = torch.finfo(storage).max
    return weight.float().clamp(-limit, limit).to(storage)


def dequantized_reference(state: dict, storage: torch.dtype, compute: torch.dtype, enc: T5Encoder) -> torch.Tensor:
    """Plain transformers T5 in `compute`, its linear weights rounded through `storage` and cast back up."""
    weights = {k: (to_fp8(v, storage) if k.endswith(LINEAR) else v).to(compute) for k, v in state.items()}
    model = T5EncoderModel(copy.deepcopy(tiny_t5_config())).to(compute).eval()
    model.load_state_dict({**weights, "encoder.embed_tokens.weight": weights["shared.weight"]})
    tokens = enc.tokenize(PROMPTS)
    with torch.no_grad():
        return model(input_ids=tokens.input_ids, attention_mask=tokens.mask.long()).last_hidden_state


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("storage", FP8)
def test_fp8_equals_dequantize_then_compute(hf_folder: Path, state: dict, storage, compute) -> None:
    enc = load_t5(hf_folder, dtype=compute, storage_dtype=storage)
    stored = {n: p.dtype for n, p in enc.model.named_parameters()}
    assert {d for n, d in stored.items() if n.endswith(LINEAR)} == {storage}
    assert {d for n, d in stored.items() if not n.endswith(LINEAR)} == {compute}  # embeddings, norms, bias table
    features = enc.encode(PROMPTS).features
    assert features.dtype == compute
    assert torch.equal(features, dequantized_reference(state, storage, compute, enc))
    # and it is not the full-precision encoder: the weights really were rounded
    assert not torch.equal(features, load_t5(hf_folder, dtype=compute).encode(PROMPTS).features)


@pytest.mark.parametrize("spelling", ["fp8_e4m3fn", "float8_e4m3fn", "torch.float8_e4m3fn", torch.float8_e4m3fn])
def test_storage_spellings(hf_folder: Path, spelling) -> None:
    enc = load_t5(hf_folder, storage_dtype=spelling)
    assert enc.storage_dtype == torch.float8_e4m3fn and enc.dtype == torch.float32
    assert "stored as torch.float8_e4m3fn" in repr(enc)


def _fp8_file(state: dict, storage: torch.dtype, path: Path) -> Path:
    """An encoder-only file as a converter writes it: linear weights in fp8 (from fp16), the rest fp16."""
    half = {k: v.half() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: to_fp8(v, storage) if k.endswith(LINEAR) else v for k, v in half.items()}, str(path))
    (path.parent / "tokenizer.json").write_bytes((make_t5_folder(path.parent.parent, "hf") / "tokenizer.json")
                                                 .read_bytes())
    return path


@pytest.mark.parametrize("storage", FP8)
def test_an_fp8_file_equals_the_fp16_file_stored_in_fp8(tmp_path: Path, state: dict, storage) -> None:
    fp16_file = make_t5_folder(tmp_path / "a", "single", dtype=torch.float16)
    fp8_file = _fp8_file(state, storage, tmp_path / "b" / "flan-t5-fp8.safetensors")
    assert b'"F8_E4M3"' in fp8_file.read_bytes()[:4096] or b'"F8_E5M2"' in fp8_file.read_bytes()[:4096]
    for compute in (torch.float32, torch.float16):
        a = load_t5(fp16_file, dtype=compute, storage_dtype=storage)
        b = load_t5(fp8_file, dtype=compute, storage_dtype=storage)
        for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
            assert p.dtype == q.dtype and torch.equal(p.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(a.encode(PROMPTS).features, b.encode(PROMPTS).features)
    # an fp8 file loaded without fp8 storage: its values, cast up
    full = load_t5(fp8_file, dtype=torch.float32)
    assert torch.equal(full.model.encoder.block[0].layer[0].SelfAttention.q.weight,
                       to_fp8(state["encoder.block.0.layer.0.SelfAttention.q.weight"].half(), storage).float())


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in NOT_ALONE])
def test_every_layout_loads_in_fp8(tmp_path: Path, hf_folder: Path, layout: str) -> None:
    want = load_t5(hf_folder, storage_dtype="fp8_e4m3fn").encode(PROMPTS).features
    got = load_t5(make_t5_folder(tmp_path, layout), storage_dtype="fp8_e4m3fn").encode(PROMPTS).features
    assert torch.equal(got, want)


@pytest.mark.parametrize("storage", FP8)
def test_weights_beyond_the_fp8_range_saturate(tmp_path: Path, state: dict, storage) -> None:
    key = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    big = dict(state, **{key: state[key] * 1e6})  # far beyond both formats' range (448, 57344)
    enc = load_t5(make_t5_folder(tmp_path, "hf", state_dict=big), storage_dtype=storage)
    wo = enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.float()
    assert torch.isfinite(wo).all() and wo.abs().max() == torch.finfo(storage).max
    assert torch.isfinite(enc.encode(PROMPTS).features).all()


def test_load_progress_counts_every_tensor(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    load_t5(make_t5_folder(tmp_path, "hf_sharded"), storage_dtype="fp8_e5m2", progress=lambda d, t: calls.append((d, t)))
    total = len(tiny_t5_state_dict())  # the encoder's tensors, not the shards' decoder ones
    assert calls == [(i, total) for i in range(1, total + 1)]


@pytest.mark.parametrize(("storage", "message"), [
    ("int4", "Unsupported T5 storage dtype 'int4'"),
    ("fp4", "use fp8_e4m3fn, fp8_e5m2 or int8"),
    (torch.float16, "Unsupported T5 storage dtype torch.float16"),
])
def test_bad_storage_dtype_is_a_clear_error(hf_folder: Path, storage, message: str) -> None:
    with pytest.raises(EllaError, match=message):
        load_t5(hf_folder, storage_dtype=storage)


def test_a_torch_without_fp8_is_a_clear_error(hf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "float8_e5m2")
    with pytest.raises(EllaError, match=r"needs torch.float8_e5m2, which torch .* lacks; update torch"):
        load_t5(hf_folder, storage_dtype="fp8_e5m2")


def test_an_unknown_feed_forward_is_refused(hf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transformers version with another feed-forward class would round activations to fp8: refused."""
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    from ella import t5_fp8
    monkeypatch.delitem(t5_fp8._SWAPS, T5DenseGatedActDense)
    with pytest.raises(EllaError, match="does not know this transformers version's T5 feed-forward"):
        load_t5(hf_folder, storage_dtype="fp8_e4m3fn")


def test_library_api_exports() -> None:
    assert ella.load_t5 is load_t5 and callable(ella.t5.resolve_storage)


def test_loading_fp8_peak_memory_stays_near_the_stored_weights(tmp_path: Path) -> None:
    """A 460 MB fp32 T5 (169 MB as stored: 103 MB of fp8 linear weights, 66 MB of bf16 embedding) loaded in
    a fresh process: peak RSS above the imports' baseline within 1.5x the stored weights (about 55 MB of
    read buffers and allocator slack here). A bf16 copy of the linear layers on the side would reach 2.2x,
    an fp32 one 3.4x."""
    config = tiny_t5_config(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=8)
    folder = make_t5_folder(tmp_path, "hf", config=config)
    check = "torch.float8_e4m3fn in {p.dtype for p in enc.model.parameters()}"
    assert load_peak_over_weights(folder, "dtype=torch.bfloat16, storage_dtype='fp8_e4m3fn'", check) <= 1.5


@pytest.mark.parametrize(("storage", "bad", "compute"), [
    (torch.float8_e4m3fn, float("nan"), torch.float16), (torch.float8_e4m3fn, float("nan"), torch.float32),
    (torch.float8_e5m2, float("nan"), torch.float16), (torch.float8_e5m2, float("inf"), torch.float32)])
def test_inf_or_nan_in_the_stored_weights_is_named_as_damage(tmp_path: Path, state: dict, storage, bad,
                                                             compute) -> None:
    """An fp8 file holding NaN (or Inf, which e5m2 stores) is damaged whatever the compute dtype: the error names
    the tensor and never advises another dtype (that advice is only for a true fp16 overflow)."""
    path = _fp8_file(state, storage, tmp_path / "t5" / "flan-t5-fp8.safetensors")
    from safetensors.torch import load_file
    weights = load_file(str(path))
    name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    weights[name][0, 0] = torch.tensor(bad).to(storage)
    save_file(weights, str(path))
    with pytest.raises(EllaError, match="non-finite features") as err:
        load_t5(path, dtype=compute, storage_dtype=storage).encode(PROMPTS)
    message = str(err.value)
    assert "damaged" in message and name in message and str(path) in message
    assert "bfloat16" not in message and "overflowed" not in message
