"""Hostile model folders and hostile text against a real ComfyUI server (issue 17): each case ends as a
clear error (or a sound image), and the next valid prompt after it succeeds, so neither the prompt
worker nor the event loop was lost. The server is test_server's; hostile entries are added to its folders."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from connector_fixtures import random_connector_state
from safetensors.torch import save_file
from t5_fixtures import make_t5_folder, real_tokenizer_json
from test_hostile import panicking_tokenizer
from test_server import HOST, T5_NAME, assert_success, derived, pixels, server, t5_folder, with_input  # noqa: F401

from ella.connector import Connector, ConnectorConfig

pytestmark = pytest.mark.skipif(HOST is None or real_tokenizer_json() is None,
                                reason="needs a ComfyUI host and the real T5 tokenizer")


@pytest.fixture(scope="module")
def hostile(server):  # noqa: F811
    """Hostile T5 folders and connector files in the server's model folders (lists are read per prompt)."""
    clip, ella_dir, work = server.work / "models" / "clip", server.work / "models" / "ella", server.work
    authors = t5_folder(server)
    panic = clip / "panic-t5"
    shutil.copytree(authors, panic)
    panicking_tokenizer(panic)
    deep = clip / "deep-config-t5"
    shutil.copytree(authors, deep)
    config = json.loads((deep / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps({**config, "num_layers": 100_000}))
    sharded = make_t5_folder(work / "staging", "hf_sharded")
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    (work / "escaped").mkdir()
    shutil.move(str(sharded / shard), work / "escaped" / shard)
    shutil.move(str(sharded), clip / "index-out-t5")
    entry = os.path.relpath(work / "escaped" / shard, clip / "index-out-t5")
    data["weight_map"] = {k: (entry if v == shard else v) for k, v in data["weight_map"].items()}
    (clip / "index-out-t5" / "model.safetensors.index.json").write_text(json.dumps(data))
    cache = make_t5_folder(work / "staging", "hf_cache")
    shutil.move(str(cache), clip / "models--org--refs-out-t5")
    snapshot = clip / "models--org--refs-out-t5" / "snapshots"
    shutil.copytree(authors, work / "outside-snapshot")
    (snapshot.parent / "refs" / "main").write_text(os.path.relpath(work / "outside-snapshot", snapshot))
    with torch.device("meta"):
        zero = {k: v.shape for k, v in Connector(ConnectorConfig(width=0, num_latents=10_000_000, num_blocks=1,
                                                                  input_dim=32)).state_dict().items()}
    save_file({k: torch.zeros(s) for k, s in zero.items()}, str(ella_dir / "zero-width.safetensors"))
    ints = random_connector_state(ConnectorConfig(width=768, num_latents=64, num_blocks=2, input_dim=32))
    ints["connector.latents"] = ints["connector.latents"].to(torch.int32)
    save_file(ints, str(ella_dir / "int-dtype.safetensors"))
    return server, entry


@pytest.fixture(scope="module")
def graph(hostile):
    srv, _ = hostile
    return derived("ella_text_to_image.json", srv.get("/object_info"))


FAILING = {
    "panicking-tokenizer": ("EllaNodes_LoadT5Encoder", {"t5_name": "panic-t5"}, ["tokenizer.json", "PanicException"]),
    "config-100k-layers": ("EllaNodes_LoadT5Encoder", {"t5_name": "deep-config-t5"},
                           ["config.json does not match the weights", "num_layers 100000"]),
    "index-entry-out": ("EllaNodes_LoadT5Encoder", {"t5_name": "index-out-t5"}, ["weight_map: ", "outside the model"]),
    "refs-main-out": ("EllaNodes_LoadT5Encoder", {"t5_name": "models--org--refs-out-t5"},
                      ["refs/main: ", "outside the model"]),
    "zero-width-connector": ("EllaNodes_LoadEllaModel", {"ella_name": "zero-width.safetensors"},
                             ["zero-width.safetensors", "num_latents 10000000", "width 0"]),
    "integer-connector": ("EllaNodes_LoadEllaModel", {"ella_name": "int-dtype.safetensors"},
                          ["int-dtype.safetensors", "not stored as floating point"]),
    "lone-surrogate": ("EllaNodes_TextEncode", {"text": "a red \ud800 cube"}, ["the prompt: character 7", "surrogate"]),
}


@pytest.mark.parametrize("node, inputs, expected", FAILING.values(), ids=FAILING.keys())
def test_a_hostile_input_is_a_clear_error_and_the_next_prompt_succeeds(hostile, graph, node, inputs, expected):
    srv, _ = hostile
    start = time.monotonic()
    entry = srv.run(with_input(graph, node, **inputs), timeout=120)
    assert "rejected" not in entry, entry
    assert entry["status"]["status_str"] == "error"
    message = json.dumps(entry["status"]["messages"], ensure_ascii=False)
    assert all(part in message for part in expected), message
    assert time.monotonic() - start < 60
    assert_success(srv.run(graph, timeout=120))  # the prompt worker lives on


@pytest.mark.parametrize("text", ["(" * 60_000 + "cube" + ")" * 60_000, "a " + "(" * 500 + "red cube" + ")" * 500],
                         ids=["60k-deep", "500-bare-levels"])
def test_deeply_nested_brackets_give_a_sound_image(hostile, graph, text):
    srv, _ = hostile
    entry = srv.run(with_input(graph, "EllaNodes_TextEncode", text=text), timeout=120)
    assert_success(entry)
    image = pixels(srv.images(entry)[0]).float()
    assert image.std() > 1  # not a black (or flat) image
    assert "nested brackets raise the weight above 10" in srv.log_text()


def post_raw(srv, route: str, data: bytes, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(srv.url + route, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_token_route_refuses_a_lone_surrogate_with_a_400_naming_the_field(hostile):
    srv, _ = hostile
    status, reply = post_raw(srv, "/ella/tokens", b'{"text": "a \\ud800 b", "t5_name": "%s"}' % T5_NAME.encode())
    assert (status, reply["field"]) == (400, "text") and "surrogate" in reply["error"]
    status, reply = post_raw(srv, "/ella/tokens", json.dumps({"text": "(" * 60_000, "t5_name": T5_NAME}).encode())
    assert status == 200 and reply["tokens"] > 0


def test_token_route_survives_a_panicking_tokenizer_and_refuses_huge_ones(hostile):
    srv, _ = hostile
    status, reply = post_raw(srv, "/ella/tokens", json.dumps({"text": "a", "t5_name": "panic-t5"}).encode())
    assert (status, reply["field"]) == (422, "t5_name") and "PanicException" in reply["error"]
    huge = srv.work / "models" / "clip" / "huge-t5"
    shutil.copytree(t5_folder(srv), huge)
    with open(huge / "tokenizer.json", "r+b") as f:
        f.truncate(200 * 2**20)
    status, reply = post_raw(srv, "/ella/tokens", json.dumps({"text": "a", "t5_name": "huge-t5"}).encode())
    assert (status, reply["field"]) == (422, "t5_name") and "too large for a T5 tokenizer" in reply["error"]
    status, reply = post_raw(srv, "/ella/tokens", json.dumps({"text": "a cat", "t5_name": T5_NAME}).encode())
    assert status == 200 and reply["tokens"] > 1


def test_a_flood_of_token_requests_all_get_a_clear_reply_and_the_server_answers_meanwhile(hostile):
    """30 counts at once with an invalid tokenizer.json just under the size cap: each admitted one gets the 422
    naming t5_name, the rest a 503 (none is dropped, none waits forever on another's parse), and /object_info
    answers meanwhile.
    That the failed file is parsed once is test_hostile's test_the_token_counter_reads_a_failed_tokenizer_once."""
    srv, _ = hostile
    flood = srv.work / "models" / "clip" / "flood-t5"
    shutil.copytree(t5_folder(srv), flood)
    with open(flood / "tokenizer.json", "w") as f:  # valid JSON of about 31 MB that is no tokenizer
        f.write('{"version": "1.0", "padding": [' + "0," * 15_000_000 + '0], "model": 5}')
    body = json.dumps({"text": "a red cube " * 2000, "t5_name": "flood-t5"}).encode()
    replies: list[tuple[int, dict]] = []
    threads = [threading.Thread(target=lambda: replies.append(post_raw(srv, "/ella/tokens", body, 120)))
               for _ in range(30)]
    for t in threads:
        t.start()
    assert "EllaNodes_TextEncode" in srv.get("/object_info")
    for t in threads:
        t.join()
    assert len(replies) == 30 and {status for status, _ in replies} <= {422, 503}  # 503: the route's pool is full
    assert all(reply["field"] == "t5_name" and "flood-t5" in reply["error"] for status, reply in replies
               if status == 422)
    assert all(reply["error"].startswith("busy: ") for status, reply in replies if status == 503)
    assert sum(status == 422 for status, _ in replies) >= 2
