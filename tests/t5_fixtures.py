"""Tiny random T5 encoders written to disk in every layout users have (for tests only).

API for other test files:
    tiny_t5_config(**overrides) -> T5Config
    tiny_t5_state_dict(config=None, *, seed=0, decoder=False, embed_keys=("shared.weight",)) -> dict
    make_t5_folder(tmp_path, layout="hf", ...) -> Path   (layouts: see LAYOUTS)
    write_t5_tokenizer(folder, kind="json")              (kind: "json", "spiece", "both")
    real_tokenizer_json() -> Path | None                 (the real T5 vocabulary, when present)
    reference_features(state_dict, config, input_ids, attention_mask) -> Tensor
    load_peak_over_weights(folder, load_kwargs, check="") -> float   (a load's peak RSS in a fresh process)

The real T5 tokenizer.json (32,100 tokens) ships in tests/data/t5_tokenizer ($ELLA_T5_TOKENIZER_DIR names
another folder); where a folder without it is named, a small stand-in T5-style vocabulary is written instead.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

SHIPPED_TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "t5_tokenizer"  # see its README.md
REAL_TOKENIZER_DIR = Path(os.environ.get("ELLA_T5_TOKENIZER_DIR") or SHIPPED_TOKENIZER_DIR)
AUTHORS_FOLDER = "models--google--flan-t5-xl--text_encoder"
HF_CACHE_FOLDER = "models--google--flan-t5-tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"

# layout -> what make_t5_folder returns
LAYOUTS = {
    "hf": "folder with config.json, model.safetensors (shared + encoder), tokenizer.json",
    "hf_sharded": "folder with config.json, model.safetensors.index.json and 2 shards holding decoder + lm_head too",
    "hf_cache": "the models--org--name folder of a Hugging Face cache (refs/main, snapshots/, blobs/)",
    "hf_cache_snapshot": "the snapshots/<rev> folder inside that cache",
    "authors": f"the ELLA authors' folder {AUTHORS_FOLDER} (config, weights, spiece.model, tokenizer.json, ...)",
    "single": "an encoder-only .safetensors file with tokenizer.json beside it",
    "single_bare": "an encoder-only .safetensors file alone in its folder (no tokenizer)",
    "single_stack": "an encoder-only file with bare stack keys (block.N..., embed_tokens.weight), tokenizer beside",
    "single_prefixed": "an encoder-only file whose keys carry a prefix (text_encoders.t5xl.transformer.)",
    "pytorch_bin": "folder with config.json, pytorch_model.bin (pickle) and tokenizer.json, no safetensors",
}

PROMPTS = [
    "a cat",
    "A photograph of an astronaut riding a horse on the moon, detailed, 8k",
    "Two red apples and a green pear on a wooden table next to a blue ceramic vase.",
]


def real_tokenizer_json() -> Path | None:
    """The real T5 tokenizer.json (tests/data/t5_tokenizer unless $ELLA_T5_TOKENIZER_DIR names another folder)."""
    path = REAL_TOKENIZER_DIR / "tokenizer.json"
    return path if path.is_file() else None


def tiny_t5_config(**overrides: object) -> T5Config:
    """A tiny FLAN-T5-shaped config (gated-gelu) with the real vocabulary size, so the real tokenizer fits."""
    values: dict[str, object] = dict(
        vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    values.update(overrides)
    return T5Config(**values)


def tiny_t5_state_dict(
    config: T5Config | None = None,
    *,
    seed: int = 0,
    decoder: bool = False,
    embed_keys: tuple[str, ...] = ("shared.weight",),
) -> dict[str, torch.Tensor]:
    """Random fp32 weights named as transformers saves them; decoder/lm_head tensors too when `decoder`."""
    config = config or tiny_t5_config()
    torch.manual_seed(seed)
    state = _detached(T5EncoderModel(copy.deepcopy(config)))
    if decoder:  # same encoder whatever the layout; decoder and lm_head from their own seed
        torch.manual_seed(seed + 1)
        full = _detached(T5ForConditionalGeneration(copy.deepcopy(config)))
        state.update({k: v for k, v in full.items() if k.startswith(("decoder.", "lm_head."))})
    embed = state.pop("shared.weight")
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(key, None)
    for key in embed_keys:
        state[key] = embed.clone()
    return state


def _detached(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def reference_features(
    state: dict[str, torch.Tensor], config: T5Config, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Features computed the plain transformers way (an fp32 T5EncoderModel), for comparisons."""
    model = T5EncoderModel(copy.deepcopy(config)).eval()
    embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    encoder_state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    model.load_state_dict({**encoder_state, "shared.weight": embed, "encoder.embed_tokens.weight": embed})
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state


def load_peak_over_weights(folder: Path, load_kwargs: str, check: str = "") -> float:
    """In a fresh process (imports of torch, transformers, torchao if present, and ella done first):
    `ella.load_t5(folder, <load_kwargs>)`, then its peak RSS above the imports' baseline over the bytes its
    parameters really hold. `check` is a Python expression about `enc` that must hold."""
    code = (
        "import sys, importlib.util, torch, transformers, ella\n"
        "if importlib.util.find_spec('torchao'): import torchao.quantization\n"
        "from ella.t5_int8 import stored_bytes\n"
        "status = lambda key: int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := current RSS\n"
        "base = status('VmRSS')\n"
        f"enc = ella.load_t5(sys.argv[1], {load_kwargs})\n"
        "weights = sum(stored_bytes(p) for p in enc.model.parameters())\n"
        f"assert {check or 'True'}\n"
        "print((status('VmHWM') - base) / weights)\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(folder)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def make_t5_folder(
    tmp_path: Path,
    layout: str = "hf",
    *,
    config: T5Config | None = None,
    seed: int = 0,
    tokenizer: str | None = "json",
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random T5 encoder in `layout` under tmp_path and return the path a user would pick."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    config = config or tiny_t5_config()
    if state_dict is None:
        embed_keys = ("shared.weight", "encoder.embed_tokens.weight") if layout == "authors" else ("shared.weight",)
        state_dict = tiny_t5_state_dict(config, seed=seed, decoder=layout == "hf_sharded", embed_keys=embed_keys)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    root = _fresh(tmp_path / layout)
    if layout in ("hf", "authors", "pytorch_bin"):
        folder = root / AUTHORS_FOLDER if layout == "authors" else root / "flan-t5-tiny"
        _write_hf_folder(folder, config, state_dict, "both" if layout == "authors" else tokenizer,
                         pickle=layout == "pytorch_bin")
        return folder
    if layout == "hf_sharded":
        folder = root / "flan-t5-tiny-sharded"
        _write_config(folder, config)
        _write_shards(folder, state_dict)
        _write_tokenizer_if(folder, tokenizer)
        return folder
    if layout in ("hf_cache", "hf_cache_snapshot"):
        return _write_hf_cache(root, config, state_dict, tokenizer, snapshot=layout == "hf_cache_snapshot")
    return _write_single(root, layout, state_dict, tokenizer)


def _fresh(path: Path) -> Path:
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def _write_config(folder: Path, config: T5Config, architecture: str = "T5ForConditionalGeneration") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = json.loads(config.to_json_string())
    data["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")


def _write_tokenizer_if(folder: Path, kind: str | None) -> None:
    if kind is not None:
        write_t5_tokenizer(folder, kind)


def _write_hf_folder(folder: Path, config: T5Config, state: dict[str, torch.Tensor], tokenizer: str | None,
                     *, pickle: bool) -> None:
    _write_config(folder, config, "T5EncoderModel")
    if pickle:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer_if(folder, tokenizer)


def _write_shards(folder: Path, state: dict[str, torch.Tensor]) -> None:
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _write_hf_cache(root: Path, config: T5Config, state: dict[str, torch.Tensor], tokenizer: str | None,
                    *, snapshot: bool) -> Path:
    """HF hub cache: files live in blobs/ and snapshots/<rev>/ holds symlinks; refs/main names the revision."""
    cache = root / "hub" / HF_CACHE_FOLDER
    staging = root / "staging"
    _write_config(staging, config)
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer_if(staging, tokenizer)
    (cache / "blobs").mkdir(parents=True)
    snap = cache / "snapshots" / REVISION
    snap.mkdir(parents=True)
    for file in staging.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = cache / "blobs" / digest
        shutil.move(str(file), blob)
        (snap / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    staging.rmdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(REVISION, encoding="utf-8")
    stale = cache / "snapshots" / ("f" * 40)  # a newer-looking stale snapshot that refs/main does not name
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"not weights")
    return snap if snapshot else cache


def _write_single(root: Path, layout: str, state: dict[str, torch.Tensor], tokenizer: str | None) -> Path:
    encoder = {k: v for k, v in state.items() if k.startswith(("shared.", "encoder."))}
    if layout == "single_stack":
        encoder = {("embed_tokens.weight" if k == "shared.weight" else k.removeprefix("encoder.")): v
                   for k, v in encoder.items()}
    elif layout == "single_prefixed":
        encoder = {"text_encoders.t5xl.transformer." + k: v for k, v in encoder.items()}
    path = root / "flan_t5_tiny_encoder.safetensors"
    save_file(encoder, str(path), metadata={"format": "pt"})
    if layout != "single_bare":
        _write_tokenizer_if(root, tokenizer)
    return path


def write_t5_tokenizer(folder: Path, kind: str = "json") -> None:
    """Write tokenizer.json ("json"), spiece.model ("spiece") or both plus the small config files ("both")."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("json", "both"):
        real = real_tokenizer_json()
        if real is not None:
            shutil.copyfile(real, folder / "tokenizer.json")
        else:
            _fallback_tokenizer().save(str(folder / "tokenizer.json"))
    if kind in ("spiece", "both"):
        write_spiece_model(folder / "spiece.model")
    if kind == "both":
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (REAL_TOKENIZER_DIR / name).is_file():
                shutil.copyfile(REAL_TOKENIZER_DIR / name, folder / name)
    if kind not in ("json", "spiece", "both"):
        raise ValueError(f"unknown tokenizer kind {kind!r}")


_FALLBACK_WORDS = ("a", "the", "of", "and", "on", "cat", "dog", "red", "blue", "photo", "horse", "moon", "word")


def _unigram_vocab() -> tuple[list[tuple[str, float]], bytes]:
    """(pieces, precompiled charsmap) of the real T5 vocabulary (no extra_ids), or of a small stand-in."""
    real = real_tokenizer_json()
    if real is not None:
        data = json.loads(real.read_text(encoding="utf-8"))
        vocab = [(p, float(s)) for p, s in data["model"]["vocab"] if not p.startswith("<extra_id_")]
        charsmap = next(n["precompiled_charsmap"] for n in data["normalizer"]["normalizers"] if n["type"] == "Precompiled")
        return vocab, base64.b64decode(charsmap)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -4.0) for w in _FALLBACK_WORDS] + [(c, -8.0) for c in chars]
    return vocab, b""


def _fallback_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab, _ = _unigram_vocab()
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tok


def write_spiece_model(path: Path) -> None:
    """Write a SentencePiece unigram model (protobuf written by hand) with T5's vocabulary and special ids."""
    vocab, charsmap = _unigram_vocab()
    types = {"<pad>": 3, "</s>": 3, "<unk>": 2}  # CONTROL, CONTROL, UNKNOWN; others NORMAL (1)
    out = bytearray()
    for piece, score in vocab:
        msg = _pb_bytes(1, piece.encode("utf-8")) + _pb_float(2, score) + _pb_int(3, types.get(piece, 1))
        out += _pb_bytes(1, msg)
    trainer = (_pb_int(3, 1) + _pb_int(4, len(vocab)) + _pb_int(35, 0) + _pb_int(40, 2) + _pb_int(41, -1)
               + _pb_int(42, 1) + _pb_int(43, 0))
    out += _pb_bytes(2, trainer)
    name = b"nmt_nfkc" if charsmap else b"identity"
    normalizer = _pb_bytes(1, name) + (_pb_bytes(2, charsmap) if charsmap else b"")
    normalizer += _pb_int(3, 1) + _pb_int(4, 1) + _pb_int(5, 1)
    out += _pb_bytes(3, normalizer)
    path.write_bytes(bytes(out))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data
