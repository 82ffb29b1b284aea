"""Tests of the T5 encoder loader and encoder (ella/t5.py, t5_files.py, t5_tokenizer.py) on tiny random T5s."""

from __future__ import annotations

import logging
import pickle
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from t5_fixtures import (
    AUTHORS_FOLDER,
    LAYOUTS,
    PROMPTS,
    load_peak_over_weights,
    make_t5_folder,
    real_tokenizer_json,
    reference_features,
    tiny_t5_config,
    tiny_t5_state_dict,
    write_t5_tokenizer,
)
from transformers import T5EncoderModel

from ella.errors import EllaError, EllaLoadError
from ella.t5 import T5_MAX_TOKENS, EncodedPrompts, T5Encoder, _clamp_fp16, infer_t5_config, load_t5, resolve_dtype
from ella.t5_tokenizer import load_t5_tokenizer

needs_real_tokenizer = pytest.mark.skipif(real_tokenizer_json() is None, reason="real T5 tokenizer.json not present")
LONG_PROMPT = "a red cat " * 200  # 801 tokens with the real vocabulary (4 per repeat + EOS)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in these tests may reach the network (no hub downloads at run time)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def encoder(hf_folder: Path) -> T5Encoder:
    return load_t5(hf_folder)


# ---------------------------------------------------------------- layouts


def _reference(encoder: T5Encoder, state: dict[str, torch.Tensor]) -> torch.Tensor:
    tokens = encoder.tokenize(PROMPTS)
    return reference_features(state, tiny_t5_config(), tokens.input_ids, tokens.mask)


# layouts that do not load alone, each tested on its own: a bare single file needs its tokenizer given
# (test_single_file_with_explicit_tokenizer_folder_or_file); pickled weights are refused
# (test_pytorch_bin_only_is_refused_without_unpickling). Every other layout, new ones too, runs below.
NOT_ALONE = {"single_bare", "pytorch_bin"}


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in NOT_ALONE])
def test_every_layout_gives_the_reference_features(tmp_path: Path, layout: str, state: dict) -> None:
    enc = load_t5(make_t5_folder(tmp_path, layout))
    out = enc.encode(PROMPTS)
    assert out.features.shape == (3, max(out.token_counts), 32)
    torch.testing.assert_close(out.features, _reference(enc, state), atol=1e-6, rtol=0)


def test_single_file_with_explicit_tokenizer_folder_or_file(tmp_path: Path, encoder: T5Encoder) -> None:
    path = make_t5_folder(tmp_path, "single_bare")
    tok_dir = tmp_path / "tok"
    write_t5_tokenizer(tok_dir, "json")
    expected = encoder.encode(PROMPTS).features
    for tok in (tok_dir, tok_dir / "tokenizer.json"):
        enc = load_t5(path, tokenizer=tok)
        assert enc.tokenizer.path == tok_dir / "tokenizer.json"
        torch.testing.assert_close(enc.encode(PROMPTS).features, expected, atol=0, rtol=0)


def test_other_entry_points_of_a_folder(hf_folder: Path, encoder: T5Encoder, tmp_path: Path) -> None:
    """config.json, the index file and model.safetensors itself (config then inferred from shapes)."""
    expected = encoder.encode(PROMPTS).features
    sharded = make_t5_folder(tmp_path, "hf_sharded")
    for path in (hf_folder / "config.json", hf_folder / "model.safetensors", sharded / "model.safetensors.index.json"):
        torch.testing.assert_close(load_t5(path).encode(PROMPTS).features, expected, atol=1e-6, rtol=0)


def test_hf_cache_follows_refs_main(tmp_path: Path) -> None:
    cache = make_t5_folder(tmp_path, "hf_cache")  # also holds a newer, broken snapshot not named by refs/main
    enc = load_t5(cache)
    assert enc.tokenizer.path.parent.name == (cache / "refs" / "main").read_text()


def test_embedding_under_either_key(tmp_path: Path, encoder: T5Encoder) -> None:
    sd = tiny_t5_state_dict(seed=0, embed_keys=("encoder.embed_tokens.weight",))
    enc = load_t5(make_t5_folder(tmp_path, "hf", state_dict=sd))
    torch.testing.assert_close(enc.encode(PROMPTS).features, encoder.encode(PROMPTS).features, atol=0, rtol=0)
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight  # tied: one tensor


def test_spiece_only_folder_matches_tokenizer_json(tmp_path: Path, encoder: T5Encoder) -> None:
    enc = load_t5(make_t5_folder(tmp_path, "hf", tokenizer="spiece"))
    assert enc.tokenizer.path.name == "spiece.model"
    assert enc.tokenize(PROMPTS).input_ids.tolist() == encoder.tokenize(PROMPTS).input_ids.tolist()


def test_authors_folder_prefers_tokenizer_json(tmp_path: Path) -> None:
    folder = make_t5_folder(tmp_path, "authors")
    assert folder.name == AUTHORS_FOLDER and (folder / "spiece.model").is_file()
    assert load_t5(folder).tokenizer.path.name == "tokenizer.json"


def test_inferred_config_matches_flan_t5_xl_shapes() -> None:
    heads, d_kv, d_model, d_ff = 32, 64, 2048, 5120
    shapes = {"shared.weight": (32128, d_model),
              "encoder.block.0.layer.0.SelfAttention.q.weight": (heads * d_kv, d_model),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, heads),
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (d_ff, d_model),
              "encoder.block.23.layer.1.layer_norm.weight": (d_model,)}
    c = infer_t5_config(shapes)
    assert (c.vocab_size, c.d_model, c.num_heads, c.d_kv, c.d_ff, c.num_layers) == (32128, 2048, 32, 64, 5120, 24)
    assert c.is_gated_act and c.dense_act_fn == "gelu_new" and c.relative_attention_num_buckets == 32


def test_non_gated_single_file(tmp_path: Path) -> None:
    config = tiny_t5_config(feed_forward_proj="relu", num_layers=3, d_ff=48)
    sd = tiny_t5_state_dict(config, seed=3)
    enc = load_t5(make_t5_folder(tmp_path, "single", config=config, state_dict=sd))
    assert (enc.config.is_gated_act, enc.config.num_layers, enc.config.d_ff) == (False, 3, 48)
    tokens = enc.tokenize(PROMPTS)
    torch.testing.assert_close(enc.encode(PROMPTS).features,
                               reference_features(sd, config, tokens.input_ids, tokens.mask), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- tokenization


@needs_real_tokenizer
def test_tokenization_matches_transformers_t5_tokenizer(encoder: T5Encoder) -> None:
    from transformers import T5TokenizerFast

    hf = T5TokenizerFast(tokenizer_file=str(real_tokenizer_json()))
    texts = [*PROMPTS, "", "Café naïve résumé — “quotes”, 3:45pm!", "  spaces   inside  "]
    tokens = encoder.tokenize(texts)
    for i, text in enumerate(texts):
        ids = tokens.input_ids[i][tokens.mask[i]].tolist()
        assert ids == hf(text).input_ids
        assert ids[-1] == 1 and tokens.token_counts[i] == len(ids)
    assert (encoder.tokenizer.eos_id, encoder.tokenizer.pad_id) == (1, 0)
    assert tokens.input_ids[~tokens.mask].eq(0).all()
    hf_fixed = hf(texts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    fixed = encoder.tokenize(texts, max_length=12)
    assert fixed.input_ids.tolist() == hf_fixed.input_ids.tolist()
    assert fixed.mask.long().tolist() == hf_fixed.attention_mask.tolist()


def test_load_t5_tokenizer_from_every_kind_of_path(tmp_path: Path, hf_folder: Path, encoder: T5Encoder) -> None:
    single = make_t5_folder(tmp_path, "single")
    tok_only = tmp_path / "tok"
    write_t5_tokenizer(tok_only, "spiece")
    expected = encoder.tokenize(PROMPTS).input_ids.tolist()
    for path in (hf_folder, hf_folder / "tokenizer.json", single, tok_only, tok_only / "spiece.model"):
        assert load_t5_tokenizer(path).tokenize(PROMPTS).input_ids.tolist() == expected


def test_tokenize_needs_no_model(encoder: T5Encoder) -> None:
    tokens = encoder.tokenize("a cat", max_length=8)
    assert tokens.input_ids.shape == (1, 8) and tokens.input_ids.dtype == torch.long
    assert tokens.token_counts == [int(tokens.mask.sum())] and tokens.fixed_length == 8


# ---------------------------------------------------------------- modes, masks, truncation


def test_flexible_mode(encoder: T5Encoder) -> None:
    out = encoder.encode(PROMPTS)
    assert isinstance(out, EncodedPrompts) and out.fixed_length is None
    longest = max(out.token_counts)
    assert out.features.shape == (3, longest, 32) and out.mask.shape == (3, longest)
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == out.token_counts
    assert out.truncated == [False] * 3
    assert torch.equal(out.connector_mask, out.mask)
    single = encoder.encode("a cat")
    assert single.features.shape == (1, single.token_counts[0], 32) and single.mask.all()


def test_fixed_mode(encoder: T5Encoder) -> None:
    out = encoder.encode(PROMPTS, max_length=128)
    assert out.features.shape == (3, 128, 32) and out.fixed_length == 128
    assert out.mask.sum(1).tolist() == out.token_counts and out.truncated == [False] * 3
    assert out.connector_mask.all() and out.connector_mask.shape == (3, 128)
    assert torch.isfinite(out.features).all()


def test_fixed_mode_truncates_quietly_below_512(encoder: T5Encoder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ELLA")
    out = encoder.encode(["a cat", "a red cat " * 50], max_length=16)
    assert out.features.shape == (2, 16, 32) and out.truncated == [False, True]
    assert out.token_counts[1] > 16 and out.mask[1].all()
    assert encoder.tokenize("a red cat " * 50, max_length=16).input_ids[0, -1] == 1  # EOS kept at the end
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@needs_real_tokenizer
def test_over_512_tokens_is_capped_with_a_warning(encoder: T5Encoder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ELLA")
    out = encoder.encode(["a cat", LONG_PROMPT])
    assert out.token_counts == [4, 801] and out.truncated == [False, True]
    assert out.features.shape == (2, T5_MAX_TOKENS, 32) and out.mask.sum(1).tolist() == [4, 512]
    (record,) = [r for r in caplog.records if r.name == "ELLA"]
    assert record.levelno == logging.WARNING and "289 tokens were dropped" in record.getMessage()
    assert "prompt 2 of 2" in record.getMessage()
    assert encoder.tokenize(LONG_PROMPT).input_ids[0, -1] == 1  # EOS kept at the end
    caplog.clear()
    fixed = encoder.encode(LONG_PROMPT, max_length=128)
    assert fixed.features.shape == (1, 128, 32) and fixed.truncated == [True]
    assert "673 tokens were dropped" in caplog.records[0].getMessage()


def test_bad_arguments(encoder: T5Encoder) -> None:
    for bad in (0, 513, 1.5, True):
        with pytest.raises(EllaError, match="max_length"):
            encoder.encode("a cat", max_length=bad)
    with pytest.raises(EllaError, match="No prompt"):
        encoder.encode([])
    with pytest.raises(EllaError, match="strings"):
        encoder.encode(["a", None])  # type: ignore[list-item]


def test_batch_equals_each_prompt_alone(encoder: T5Encoder) -> None:
    texts = [*PROMPTS, "", "a cat"]
    batch = encoder.encode(texts)
    for i, text in enumerate(texts):
        alone = encoder.encode(text)
        n = batch.token_counts[i]
        assert alone.features.shape[1] == n
        assert (batch.features[i, :n] - alone.features[0]).abs().max() <= 1e-5
    fixed = encoder.encode(texts, max_length=32)
    for i, text in enumerate(texts):
        assert (fixed.features[i] - encoder.encode(text, max_length=32).features[0]).abs().max() <= 1e-5


# ---------------------------------------------------------------- dtypes and devices


def test_default_dtype_and_device(encoder: T5Encoder) -> None:
    assert encoder.dtype == torch.float32 and encoder.model.shared.weight.dtype == torch.float32
    assert encoder.device == torch.device("cpu") and encoder.encode("a").features.device.type == "cpu"
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(EllaError, match="Unsupported T5 dtype"):
        resolve_dtype(torch.int8, torch.device("cpu"))


def test_bf16_on_cpu(hf_folder: Path, encoder: T5Encoder) -> None:
    enc = load_t5(hf_folder, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    out = enc.encode(PROMPTS)
    assert out.features.dtype == torch.bfloat16
    torch.testing.assert_close(out.features.float(), encoder.encode(PROMPTS).features, atol=0.1, rtol=0.05)


def test_fp16_on_cpu_loads_and_encodes(hf_folder: Path, encoder: T5Encoder) -> None:
    enc = load_t5(hf_folder, dtype="fp16")
    out = enc.encode(PROMPTS)
    assert out.features.dtype == torch.float16
    torch.testing.assert_close(out.features.float(), encoder.encode(PROMPTS).features, atol=0.02, rtol=0.01)


def test_device_is_a_settable_attribute_and_to_moves(hf_folder: Path) -> None:
    enc = load_t5(hf_folder, device=torch.device("cpu"))
    enc.device = torch.device("cpu")  # ComfyUI's ModelPatcher does this on the module it manages
    enc.model_lowvram = False  # ... and sets bookkeeping attributes like this one
    assert enc.to("cpu") is enc and enc.device == torch.device("cpu")
    assert enc.to(torch.bfloat16).dtype == torch.bfloat16 and enc.encode("a").features.dtype == torch.bfloat16
    enc.to("meta")
    assert enc.device.type == "meta" and all(p.is_meta for p in enc.model.parameters())
    assert not any(p.requires_grad for p in enc.parameters())


def _scaled(state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for key in out:
        for part, factor in scales.items():
            if key.startswith("encoder.block.0.") and key.endswith(f"DenseReluDense.{part}.weight"):
                out[key] = out[key] * factor
    return out


def test_fp16_overflow_is_clamped_to_finite_features(tmp_path: Path, state: dict) -> None:
    folder = make_t5_folder(tmp_path, "hf", state_dict=_scaled(state, {"wo": 1e5}))
    enc = load_t5(folder, dtype=torch.float16)
    infs: list[int] = []
    enc.model.encoder.block[0].layer[-1].register_forward_hook(lambda m, a, o: infs.append(int(o.isinf().sum())))
    out = enc.encode(PROMPTS)
    assert infs[0] > 0, "the scaled weights should overflow fp16 inside block 0"
    assert torch.isfinite(out.features).all()


def test_fp16_nan_raises_a_clear_error(tmp_path: Path, state: dict) -> None:
    folder = make_t5_folder(tmp_path, "hf", state_dict=_scaled(state, {"wi_0": 1e3, "wi_1": 1e3}))
    assert torch.isfinite(load_t5(folder).encode(PROMPTS).features).all()  # fine in fp32
    with pytest.raises(EllaError, match=r"non-finite features \(inf/NaN\) in float16 .* bfloat16 or float32") as err:
        load_t5(folder, dtype=torch.float16).encode(PROMPTS)
    assert str(folder) in str(err.value)


def test_fp16_clamp_hook_is_per_instance_and_clamps() -> None:
    from transformers.models.t5.modeling_t5 import T5Block

    fmax = torch.finfo(torch.float16).max
    hidden = torch.tensor([[1.0, float("inf"), -float("inf")]], dtype=torch.float16)
    clamped, bias, cross = _clamp_fp16(torch.nn.Identity(), (), (hidden, "bias", None))
    assert torch.isfinite(clamped).all() and clamped[0, 1] == fmax - 1000 and clamped[0, 0] == 1
    assert (bias, cross) == ("bias", None)
    assert _clamp_fp16(torch.nn.Identity(), (), (hidden.float(),)) is None  # other dtypes untouched
    assert "_clamp_fp16" not in repr(T5Block.forward) and "_clamp_fp16" not in repr(T5EncoderModel.forward)
    fresh = T5EncoderModel(tiny_t5_config())
    assert all(not b._forward_hooks for b in fresh.encoder.block)  # no global patching


def test_clamp_hooks_registered_on_loaded_blocks(encoder: T5Encoder) -> None:
    for block in encoder.model.encoder.block:
        assert _clamp_fp16 in block._forward_hooks.values()


# ---------------------------------------------------------------- memory


def test_loading_peak_memory_stays_near_the_weights_in_the_target_dtype(tmp_path: Path) -> None:
    """A 460 MB fp32 T5 loaded as bf16 in a fresh process: peak RSS above the imports' baseline must stay
    within 1.25x the bf16 weights (a memory map of the source, a full fp32 copy or a random fp32 init
    would each add at least 100 MB)."""
    config = tiny_t5_config(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=8)
    folder = make_t5_folder(tmp_path, "hf", config=config)
    check = "{p.dtype for p in enc.model.parameters()} == {torch.bfloat16}"
    assert load_peak_over_weights(folder, "dtype=torch.bfloat16", check) <= 1.25


# ---------------------------------------------------------------- errors


def test_missing_tokenizer_says_where_it_looked(tmp_path: Path) -> None:
    path = make_t5_folder(tmp_path, "single_bare")
    with pytest.raises(EllaLoadError) as err:
        load_t5(path)
    msg = str(err.value)
    assert str(path) in msg and str(path.parent / "tokenizer.json") in msg and str(path.parent / "spiece.model") in msg
    assert "tokenizer path" in msg and "flan-t5-xl" in msg
    folder = make_t5_folder(tmp_path, "hf", tokenizer=None)
    msg = str(pytest.raises(EllaLoadError, load_t5, folder).value)
    for place in (folder, folder / "tokenizer", folder.parent / "tokenizer"):
        assert str(place / "tokenizer.json") in msg and str(place / "spiece.model") in msg


def test_explicit_tokenizer_path_errors(tmp_path: Path) -> None:
    path = make_t5_folder(tmp_path, "single_bare")
    with pytest.raises(EllaLoadError, match="tokenizer path does not exist"):
        load_t5(path, tokenizer=tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EllaLoadError, match=str(empty / "tokenizer.json")):
        load_t5(path, tokenizer=empty)


def test_non_t5_tokenizer_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    path = make_t5_folder(tmp_path, "single_bare")
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "cat": 1}, unk_token="<|endoftext|>")).save(
        str(path.parent / "tokenizer.json"))
    with pytest.raises(EllaLoadError, match=r"tokenizer\.json: not a T5 tokenizer"):
        load_t5(path)


def test_pytorch_bin_only_is_refused_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")
    folder = make_t5_folder(tmp_path, "pytorch_bin")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for path in (folder, folder / "pytorch_model.bin"):
        msg = str(pytest.raises(EllaLoadError, load_t5, path).value)
        assert "pytorch_model.bin" in msg and "only .safetensors" in msg


@pytest.mark.parametrize(("keys", "hint"), [
    ({"text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8)}, "CLIP"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "Stable Diffusion"),
    ({"connector.latents": (64, 8), "time_embedding.linear_1.weight": (8, 4)}, "ELLA connector"),
])
def test_non_t5_file_is_refused(tmp_path: Path, keys: dict, hint: str) -> None:
    path = tmp_path / "other_model.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    write_t5_tokenizer(tmp_path)
    msg = str(pytest.raises(EllaLoadError, load_t5, path).value)
    assert str(path) in msg and "not a T5 encoder" in msg and hint in msg and "flan-t5-xl" in msg


def test_missing_keys(tmp_path: Path, state: dict) -> None:
    sd = {k: v for k, v in state.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    folder = make_t5_folder(tmp_path, "hf", state_dict=sd)
    msg = str(pytest.raises(EllaLoadError, load_t5, folder).value)
    assert str(folder / "model.safetensors") in msg and "1 missing" in msg
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in msg and "T5 encoder" in msg
    single = make_t5_folder(tmp_path, "single", state_dict={k: v for k, v in state.items()
                                                            if k != "encoder.final_layer_norm.weight"})
    msg = str(pytest.raises(EllaLoadError, load_t5, single).value)
    assert single.name in msg and "encoder.final_layer_norm.weight" in msg
    no_bias = {k: v for k, v in state.items() if "relative_attention_bias" not in k}
    msg = str(pytest.raises(EllaLoadError, load_t5, make_t5_folder(tmp_path, "single", state_dict=no_bias)).value)
    assert "relative_attention_bias" in msg and "missing" in msg


def test_unexpected_keys(tmp_path: Path, state: dict) -> None:
    sd = {**state, "encoder.block.0.layer.0.SelfAttention.extra.weight": torch.zeros(2, 2)}
    folder = make_t5_folder(tmp_path, "hf", state_dict=sd)
    msg = str(pytest.raises(EllaLoadError, load_t5, folder).value)
    assert "model.safetensors" in msg and "1 unexpected" in msg and "SelfAttention.extra.weight" in msg


def test_config_and_weights_disagree(tmp_path: Path, state: dict) -> None:
    folder = make_t5_folder(tmp_path, "hf", config=tiny_t5_config(d_ff=128), state_dict=state)
    msg = str(pytest.raises(EllaLoadError, load_t5, folder).value)
    assert "model.safetensors" in msg and "config.json does not match the weights" in msg and "d_ff 128" in msg


def test_truncated_file(tmp_path: Path) -> None:
    path = make_t5_folder(tmp_path, "single")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    msg = str(pytest.raises(EllaLoadError, load_t5, path).value)
    assert str(path) in msg and "truncated" in msg


def test_missing_shard(tmp_path: Path) -> None:
    folder = make_t5_folder(tmp_path, "hf_sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    msg = str(pytest.raises(EllaLoadError, load_t5, folder).value)
    assert "model.safetensors.index.json" in msg and "model-00002-of-00002.safetensors" in msg


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(EllaLoadError, match="no such file or folder"):
        load_t5(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EllaLoadError, match="no T5 weights found"):
        load_t5(empty)
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(empty / name))
    with pytest.raises(EllaLoadError, match="several .safetensors files"):
        load_t5(empty)
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(EllaLoadError, match="not a .safetensors file"):
        load_t5(empty / "notes.txt")
    with pytest.raises(EllaError, match="Unknown device"):
        load_t5(empty, device="nodevice")
