"""The T5 encoder that reads ELLA prompts: loading from every layout, and encoding.

`load_t5` builds transformers' `T5EncoderModel` on the meta device and fills it
with tensors read one at a time straight into the target dtype, so loading
never holds a second full-precision copy. With `storage_dtype` (fp8), the linear layers' weights are
stored in 8 bits and cast to the compute dtype layer by layer at each call (ella/t5_fp8.py); with int8 (CPU
only), each is quantized by torchao as it is read and multiplied with int8 kernels (ella/t5_int8.py). Key
names are mapped from the transformers layout (`shared.`, `encoder.`), any prefix in front of it, or a
bare encoder stack (`block.N...`); decoder and lm_head weights are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel

from .containment import Roots, default_roots
from .devices import compute_device
from .errors import EllaError, EllaLoadError, fenced
from .safetensors_io import TensorInfo, load_tensors, read_header
from .t5_files import WeightFiles, find_tokenizer, find_weights, read_small_text
from .t5_fp8 import linear_weight_names, resolve_storage, store_linears_in_fp8
from .t5_int8 import Int8Quantizer, check_int8_setup, stored_parts, use_int8_linears
from .t5_tokenizer import T5_MAX_TOKENS, T5PromptTokenizer, TokenizedPrompts, read_tokenizer_file

__all__ = [
    "T5_MAX_TOKENS", "EncodedPrompts", "T5Encoder", "TokenizedPrompts", "infer_t5_config", "load_t5",
    "resolve_dtype", "resolve_storage",
]

log = logging.getLogger("ELLA")

EXPECTED = "a T5 encoder such as google/flan-t5-xl (safetensors)"
_PROBE = "block.0.layer.0.SelfAttention.q.weight"
_EMBED = "shared.weight"
_TIED = "encoder.embed_tokens.weight"
_IGNORED = ("decoder.", "lm_head.")
_FLOAT_STORAGE = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_LAYERS = 128
_CHECKED_FIELDS = ("num_layers", "d_model", "num_heads", "d_kv", "d_ff", "vocab_size",
                   "relative_attention_num_buckets", "is_gated_act")
_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_HINTS = {
    "model.diffusion_model.": "this looks like a Stable Diffusion checkpoint",
    "text_model.": "this looks like a CLIP text encoder",
    "connector.": "this looks like the ELLA connector (ella-sd1.5-tsc-t5xl.safetensors), not T5",
    "time_embedding.": "this looks like the ELLA connector (ella-sd1.5-tsc-t5xl.safetensors), not T5",
}


@dataclass
class EncodedPrompts:
    """T5 features of a batch of prompts with their masks and token bookkeeping."""

    features: torch.Tensor  # [B, L, d_model], on the encoder's device, in its dtype
    mask: torch.Tensor  # [B, L] bool, True = real token (EOS included)
    token_counts: list[int]  # tokens per prompt before truncation, EOS included
    truncated: list[bool]
    fixed_length: int | None  # N in fixed mode, None in flexible mode
    weights: torch.Tensor | None = None  # [B, L] float32 token weights from prompt markup; None = all 1

    @property
    def connector_mask(self) -> torch.Tensor:
        """What the ELLA connector attends to: every token in fixed mode (as trained), real tokens otherwise.
        Bool without weights; with weights, float weights (0 = not attended) that the connector reads as log(w)."""
        mask = torch.ones_like(self.mask) if self.fixed_length is not None else self.mask
        if self.weights is None:
            return mask
        return mask.to(torch.float32) * self.weights.to(mask.device)


class T5Encoder(torch.nn.Module):
    """A T5 encoder with its tokenizer; `encode` turns prompts into ELLA's T5 features.

    An nn.Module with plain, settable `device` and `dtype` attributes, so ComfyUI's ModelPatcher can
    manage it (it sets `module.device`; the transformers model in `.model` has a read-only `device`).
    """

    def __init__(self, model: T5EncoderModel, tokenizer: T5PromptTokenizer, path: Path, dtype: torch.dtype,
                 storage_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config: T5Config = model.config
        self.path = path
        self.dtype = dtype  # the compute dtype (embeddings, norms, every layer's output)
        self.storage_dtype = storage_dtype or dtype  # the linear layers' weights
        self.device = model.shared.weight.device

    def extra_repr(self) -> str:
        c = self.config
        stored = f", linear weights stored as {self.storage_dtype}" if self.storage_dtype != self.dtype else ""
        return f"path={str(self.path)!r}, layers={c.num_layers}, d_model={c.d_model}, dtype={self.dtype}{stored}"

    def to(self, *args: object, **kwargs: object) -> T5Encoder:
        """nn.Module.to that keeps `device` and `dtype` in step with the weights; returns self. int8 weights
        stay on the CPU (a move elsewhere is refused, naming cpu)."""
        if self.storage_dtype == torch.int8:
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                check_int8_setup(device, self.dtype)
        super().to(*args, **kwargs)
        self.device = self.model.shared.weight.device
        self.dtype = self.model.shared.weight.dtype
        return self

    def tokenize(self, texts: str | Sequence[str], max_length: int | None = None,
                 weighted: bool = False) -> TokenizedPrompts:
        """Token ids, mask and counts of prompts, without running the model."""
        return self.tokenizer.tokenize(texts, max_length, weighted)

    def encode(self, texts: str | Sequence[str], max_length: int | None = None,
               weighted: bool = False, interrupt: Callable[[], None] | None = None) -> EncodedPrompts:
        """Encode prompts: flexible mode (max_length None) or fixed mode (pad/truncate to max_length).
        weighted=True reads ComfyUI weighting markup, `(red dress:1.3)`: T5 sees the text without it and
        `connector_mask` carries each token's weight. `interrupt` is called before each encoder block;
        whatever it raises stops the encode (a host's interrupt check)."""
        tokens = self.tokenize(texts, max_length, weighted)
        device = compute_device(self.model.shared, self.model.shared.weight)  # whatever moved the weights
        mask = tokens.mask.to(device)
        hooks = [] if interrupt is None else [
            block.register_forward_pre_hook(lambda *_: interrupt()) for block in self.model.encoder.block]
        try:
            with torch.no_grad():
                out = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask.long())
        finally:
            for hook in hooks:
                hook.remove()
        features = out.last_hidden_state
        self._check_finite(features)
        return EncodedPrompts(features, mask, tokens.token_counts, tokens.truncated, tokens.fixed_length,
                              tokens.weights)

    def _check_finite(self, features: torch.Tensor) -> None:
        bad = (~torch.isfinite(features)).flatten(1).any(1)
        if not bad.any():
            return
        rows = ", ".join(str(i + 1) for i in bad.nonzero().flatten().tolist())
        dtype = str(features.dtype).removeprefix("torch.")
        damaged = self.non_finite_weights()
        if damaged:
            advice = (f"the stored weights hold inf/NaN ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}): "
                      "the file is damaged, download it again (another dtype will not help)")
        elif dtype == "float16":
            advice = "T5 overflowed in float16; load T5 as bfloat16 or float32"
        else:
            advice = "the T5 weights may be damaged; download them again"
        raise EllaError(f"{self.path}: T5 produced non-finite features (inf/NaN) in {dtype} for prompt(s) {rows}; {advice}.")

    def non_finite_weights(self) -> list[str]:
        """Names of the weights holding inf or NaN as stored (fp8 and int8 scales included); read only after a
        failed encode."""
        names = []
        with torch.no_grad():
            for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
                if any(p.is_floating_point() and not p.is_meta and not torch.isfinite(_widened(p)).all()
                       for p in stored_parts(name, tensor).values()):
                    names.append(name)
        return names


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in a dtype torch.isfinite takes on every device (8-bit floats are cast up)."""
    return tensor.half() if tensor.element_size() == 1 else tensor


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The load dtype: None means float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.lower().removeprefix("torch."), dtype)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise EllaError(f"Unsupported T5 dtype {dtype!r}; use float16, bfloat16 or float32 (or None for the default).")
    return dtype


def load_t5(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    storage_dtype: torch.dtype | str | None = None,
    roots: Roots | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> T5Encoder:
    """Load a T5 encoder (e.g. FLAN-T5-XL) and its tokenizer from a folder, HF cache folder or single file.

    `dtype` is the compute dtype (None: fp16 on CUDA, fp32 elsewhere); `storage_dtype` "fp8_e4m3fn" or
    "fp8_e5m2" (or the torch dtypes) stores the linear layers' weights in 8 bits, cast per layer at each
    call; "int8" (CPU and float32 only; needs torchao) quantizes them to int8 as they are read and runs
    int8 matrix kernels. Embeddings and norms stay in `dtype`. `progress(done, total)` is called after
    each tensor read.
    Every file opened must lie inside `roots` (default: the folder of `path`, the places a tokenizer is
    looked for beside it, and the folder of `tokenizer`); the config
    is checked against the weights' headers before any module is built."""
    start = time.perf_counter()
    device = _device(device)
    dtype = resolve_dtype(dtype, device)
    storage = resolve_storage(storage_dtype)
    if storage == torch.int8:
        check_int8_setup(device, dtype)
    weights = find_weights(path, roots)
    sources = _collect_sources(weights)
    tok = read_tokenizer_file(find_tokenizer(tokenizer, weights, roots))
    inferred = infer_t5_config({name: src.info.shape for name, src in sources.items()}, label=weights.label)
    config = inferred
    if weights.config:
        config = _read_config(weights.config, default_roots(path) if roots is None else roots)
        _check_config(weights.config, config, inferred, weights.label)
    with torch.device("meta"):
        model = T5EncoderModel(_encoder_config(config))
    _check_keys(weights.label, sources, model)
    _check_vocab(tok, config, weights.label)
    dtypes = dict.fromkeys(sources, dtype)
    convert: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if storage == torch.int8:  # read in float32 (dtype), quantized as soon as each is read
        convert = dict.fromkeys(linear_weight_names(model), Int8Quantizer())
        use_int8_linears(model)
    elif storage is not None:
        store_linears_in_fp8(model)
        dtypes.update(dict.fromkeys(linear_weight_names(model), storage))
    _load_weights(model, sources, dtypes, device, progress, convert)
    _register_fp16_clamp(model)
    encoder = T5Encoder(model, tok, Path(path), dtype, storage)
    encoder.eval().requires_grad_(False)
    log.info("ELLA: loaded T5 encoder %s (%d layers, d_model %d) as %s%s on %s in %.1f s", weights.label,
             config.num_layers, config.d_model, dtype, f" (linear weights in {storage})" if storage else "",
             device, time.perf_counter() - start)
    return encoder


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EllaError(f"Unknown device {device!r} ({e}).") from None


@dataclass(frozen=True)
class _Source:
    """Where one encoder tensor lives: file, key in that file, header info."""

    file: Path
    key: str
    info: TensorInfo


def _collect_sources(weights: WeightFiles) -> dict[str, _Source]:
    """Map each encoder tensor's transformers name to where it lives; reject non-T5 files."""
    headers = {f: read_header(f, expected=EXPECTED) for f in weights.files}
    keys = [k for h in headers.values() for k in h]
    root = _find_root(keys)
    if root is None:
        raise _not_t5(weights.label, keys)
    sources: dict[str, _Source] = {}
    for file, header in headers.items():
        for key, info in header.items():
            name = _canonical(key, *root)
            if name is not None:
                if info.dtype not in _FLOAT_STORAGE:
                    raise EllaLoadError(f"{file}: tensor {key!r} is stored as {info.dtype}; expected floating-point "
                                        f"weights (F32, F16, BF16 or F8) of {EXPECTED}.")
                sources.setdefault(name, _Source(file, key, info))
    if _EMBED not in sources and _TIED in sources:
        sources[_EMBED] = sources[_TIED]
    sources.pop(_TIED, None)
    return sources


def _find_root(keys: list[str]) -> tuple[str, bool] | None:
    """(prefix, bare_stack): the prefix in front of transformers' names, and whether `encoder.` is absent."""
    for key in sorted(keys):
        if key.endswith("encoder." + _PROBE):
            return key[: -len("encoder." + _PROBE)], False
    for key in sorted(keys):
        if key.endswith(_PROBE) and not key.endswith("decoder." + _PROBE):
            return key[: -len(_PROBE)], True
    return None


def _canonical(key: str, prefix: str, bare_stack: bool) -> str | None:
    """Transformers' T5EncoderModel name for a file key; None for keys to ignore (decoder, lm_head, others)."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    if bare_stack and rest != _EMBED:
        rest = _EMBED if rest == "embed_tokens.weight" else "encoder." + rest
    return None if rest.startswith(_IGNORED) else rest


def _not_t5(label: Path, keys: list[str]) -> EllaLoadError:
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    hint = next((h for p, h in _HINTS.items() if any(k.startswith(p) or f".{p}" in k for k in keys)), "")
    return EllaLoadError(
        f"{label}: not a T5 encoder{' (' + hint + ')' if hint else ''}. Expected {EXPECTED}, with keys like "
        f"encoder.{_PROBE} and shared.weight; found keys like {sample}."
    )


def infer_t5_config(shapes: dict[str, tuple[int, ...]], *, label: Path | str = "weights") -> T5Config:
    """Infer a T5 encoder config from transformers-named tensor shapes."""
    need = [_EMBED, "encoder." + _PROBE, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise _key_error(label, missing, [], None)
    if len(shapes[_EMBED]) != 2 or len(shapes[need[2]]) != 2 or len(shapes[need[1]]) != 2:
        raise EllaLoadError(f"{label}: {_EMBED}, {need[1]} and {need[2]} must be matrices; expected {EXPECTED}.")
    vocab, d_model = shapes[_EMBED]
    buckets, heads = shapes[need[2]]
    inner = shapes[need[1]][0]
    if min(vocab, d_model, buckets, heads, inner) < 1 or inner % heads:
        raise EllaLoadError(f"{label}: tensor shapes {list(shapes[_EMBED])}, {list(shapes[need[2]])}, "
                            f"{list(shapes[need[1]])} do not describe a T5 encoder; expected {EXPECTED}.")
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes
    d_ff_key = ff + ("wi_0.weight" if gated else "wi.weight")
    if d_ff_key not in shapes or not shapes[d_ff_key]:
        raise _key_error(label, [d_ff_key], [], None)
    layers = _layer_count(shapes, label)
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=shapes[d_ff_key][0], num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
    )


def _layer_count(shapes: dict[str, tuple[int, ...]], label: Path | str) -> int:
    """1 + the highest encoder block number in the weights, at most MAX_LAYERS: a key such as
    `encoder.block.99999999.…` must never make a model of that depth (missing blocks are named later, by
    the key check)."""
    found = {k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}
    numbers = {int(i) for i in found if i.isascii() and i.isdigit() and len(i) <= 4}
    if found != {str(i) for i in numbers} or not numbers or max(numbers) >= MAX_LAYERS:
        shown = sorted(found, key=lambda i: (len(i), i))[-3:]
        raise EllaLoadError(f"{label}: encoder blocks numbered {', '.join(repr(i) for i in shown)} …; expected "
                            f"blocks numbered 0 to at most {MAX_LAYERS - 1} (FLAN-T5-XL has 0 to 23), as in {EXPECTED}.")
    return 1 + max(numbers)


def _read_config(path: Path, roots: Roots) -> T5Config:
    with fenced(path, "config.json (download it again)"):
        data = json.loads(read_small_text(path, roots, "config.json"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    model_type = data.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise EllaLoadError(f"{path}: config.json describes a {model_type!r} model; expected {EXPECTED}.")
    with fenced(path, "config.json as a T5 config"):
        return T5Config.from_dict(data)


def _check_config(path: Path, config: T5Config, inferred: T5Config, label: Path) -> None:
    """config.json must describe the weights' own shapes (read from their headers) before anything is built:
    a config asking for more layers, wider layers or another vocabulary than the weights hold is refused."""
    wrong = [f"{f} {getattr(config, f, None)!r} (the weights have {getattr(inferred, f)!r})"
             for f in _CHECKED_FIELDS if getattr(config, f, None) != getattr(inferred, f)]
    if wrong:
        raise EllaLoadError(f"{path}: config.json does not match the weights {label}: {'; '.join(wrong)}. "
                            "The config.json and the weights belong to different models; download them together.")


def _encoder_config(config: T5Config) -> T5Config:
    config.is_decoder = False
    config.is_encoder_decoder = False
    config.use_cache = False
    return config


def _check_keys(label: Path, sources: dict[str, _Source], model: T5EncoderModel) -> None:
    """Compare the file's encoder tensors with the model's: names first, then shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != _TIED}
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(sources[k].key for k in set(sources) - set(expected))
    if missing or unexpected:
        raise _key_error(label, missing, unexpected, model.config)
    wrong = [f"{sources[k].key} {list(sources[k].info.shape)} (expected {list(s)})"
             for k, s in expected.items() if tuple(sources[k].info.shape) != s]
    if wrong:
        raise EllaLoadError(
            f"{label}: tensor shapes do not match the T5 config ({_describe(model.config)}): "
            f"{'; '.join(wrong[:3])}. The config.json and the weights belong to different models."
        )


def _key_error(label: Path | str, missing: list[str], unexpected: list[str], config: T5Config | None) -> EllaLoadError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
    shape = f" ({_describe(config)})" if config is not None else ""
    return EllaLoadError(
        f"{label}: does not match a T5 encoder{shape}: {'; '.join(parts)}. Expected {EXPECTED}; "
        "the file may be incomplete, damaged, or another model."
    )


def _describe(config: T5Config) -> str:
    return (f"{config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads, "
            f"d_kv {config.d_kv}, d_ff {config.d_ff}, vocab {config.vocab_size}")


def _check_vocab(tok: T5PromptTokenizer, config: T5Config, label: Path) -> None:
    if tok.vocab_size > config.vocab_size:
        raise EllaLoadError(
            f"{tok.path}: tokenizer has {tok.vocab_size} tokens but the T5 weights {label} have only "
            f"{config.vocab_size} embeddings; the tokenizer belongs to another model."
        )


def _load_weights(model: T5EncoderModel, sources: dict[str, _Source], dtypes: dict[str, torch.dtype],
                  device: torch.device, progress: Callable[[int, int], None] | None,
                  convert: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Read tensors one at a time, each cast to its dtype in `dtypes` on reading (and passed through its
    function in `convert`, if any, at once), then assign them into the meta model; `progress(done, total)`
    after each tensor."""
    by_file: dict[Path, list[str]] = {}
    for name, src in sources.items():
        by_file.setdefault(src.file, []).append(name)
    done, total = 0, len(sources)

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        keyed = {sources[n].key: dtypes[n] for n in names}
        converters = {sources[n].key: convert[n] for n in names if n in convert}
        loaded = load_tensors(file, dtype=keyed, device=device, keys=list(keyed), expected=EXPECTED, on_tensor=tick,
                              convert=converters)
        for name in names:
            state[name] = loaded.pop(sources[name].key)
    model.load_state_dict(state, strict=False, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # tie: one tensor, moved once
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EllaLoadError(f"T5 tensors left unloaded: {', '.join(left[:3])}")


def _clamp_fp16(module: torch.nn.Module, args: tuple, output: tuple | torch.Tensor) -> tuple | torch.Tensor | None:
    """Forward hook on a T5 block: clamp fp16 hidden states that overflowed, as transformers' T5 does."""
    hidden = output[0] if isinstance(output, tuple) else output
    if hidden.dtype != torch.float16:
        return None
    fmax = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(hidden).any(), fmax - 1000, fmax).to(hidden.dtype)
    hidden = torch.clamp(hidden, min=-limit, max=limit)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _register_fp16_clamp(model: T5EncoderModel) -> None:
    """Clamp fp16 overflow after every block of this model instance only (no global patching).

    transformers 5.24's T5Block still clamps fp16 inf itself; the hook keeps that behaviour if a
    version drops it, and is a no-op on top of it (clamping twice is the same as once).
    """
    for block in model.encoder.block:
        block.register_forward_hook(_clamp_fp16)
