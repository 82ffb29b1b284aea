"""Hostile workflows against the official-workflow converter (library and script): every walk over the graph is
linear and survives loops, and every malformed field gets a clear error naming it (exit 2 from the script, never a
traceback). The route's side is test_route_limits.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import workflow_shapes as shapes
from comfy_host import ROOT

from ella import official_workflow as ow
from ella import workflow_schema

SCRIPT = ROOT / "scripts" / "convert_official_workflow.py"


def script(source, target) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(source), str(target)], capture_output=True, text=True,
                          timeout=300)  # a guard against a hang, not a timing target


def assert_consistent(wf: dict) -> None:
    """Every link joins existing nodes, and both ends list it."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, origin, slot, target, target_slot, _ in wf["links"]:
        assert link_id in nodes[origin]["outputs"][slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """How many times the converter looks at one output to learn whether it holds a T5 prompt."""
    calls = [0]
    original = ow._Converter._kind_here

    def counted(self, source):
        calls[0] += 1
        return original(self, source)
    monkeypatch.setattr(ow._Converter, "_kind_here", counted)
    return calls


def test_a_node_fed_by_its_own_output_is_refused_naming_the_loop(tmp_path):
    wf = shapes.self_fed_combine()
    assert shapes.size_of(wf) < 2048
    with pytest.raises(ow.ConversionError, match=r"loop \(#3 EllaCombineEmbeds -> #3 EllaCombineEmbeds\)"):
        ow.convert(wf)
    (tmp_path / "loop.json").write_text(json.dumps(wf))
    done = script(tmp_path / "loop.json", tmp_path / "out.json")
    assert done.returncode == 2 and "loop.json" in done.stderr and "Traceback" not in done.stderr


def test_a_loop_through_several_official_nodes_is_refused():
    wf = shapes.doubling_combines(3)
    first, last = [n for n in wf["nodes"] if n["type"] == "EllaCombineEmbeds"][::2]
    link = next(lk for lk in wf["links"] if lk[3] == first["id"] and lk[4] == 1)
    link[1] = last["id"]  # the first combine's second input now comes from the last one
    with pytest.raises(ow.ConversionError, match=f"#{first['id']} EllaCombineEmbeds -> .* -> #{first['id']} "):
        ow.convert(wf)


def test_doubling_chains_are_walked_once_per_output(steps, tmp_path):
    """40 combines each fed twice by the previous one: 2**40 steps for a walk without memory."""
    wf = shapes.doubling_combines(40)
    result = ow.convert(wf)
    assert len(result.kept) == 40  # each joins two T5 prompts: kept with a Note
    assert steps[0] <= 2 * len(wf["nodes"])
    assert_consistent(result.workflow)
    (tmp_path / "chain.json").write_text(json.dumps(shapes.doubling_combines(3000)))
    done = script(tmp_path / "chain.json", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3000 node(s) could not be converted" in done.stdout


def test_thousands_of_set_ella_timesteps_in_a_row_convert_without_recursion():
    wf = shapes.set_timesteps_chain(5000)
    result = ow.convert(wf)
    types = [n["type"] for n in result.workflow["nodes"]]
    assert types.count("EllaNodes_ApplyElla") == 1 and "SetEllaTimesteps" not in types
    (sampler,) = [n for n in result.workflow["nodes"] if n["type"] == "KSampler"]
    model_link = next(s["link"] for s in sampler["inputs"] if s["name"] == "model")
    origin = next(lk[1] for lk in result.workflow["links"] if lk[0] == model_link)
    assert next(n["type"] for n in result.workflow["nodes"] if n["id"] == origin) == "EllaNodes_ApplyElla"
    assert_consistent(result.workflow)


def test_wide_fan_in_and_out_convert(steps):
    wf = shapes.wide_fan_in(2048)
    result = ow.convert(wf)
    assert steps[0] <= 2 * len(wf["nodes"])
    types = [n["type"] for n in result.workflow["nodes"]]
    assert types.count("EllaNodes_TextEncode") == 2049
    assert_consistent(result.workflow)


@pytest.mark.parametrize("depth", [300, 100_000])
def test_deep_nesting_is_a_clear_error(tmp_path, depth):
    text = json.dumps(shapes.nested(300)) if depth == 300 else \
        json.dumps(shapes.nested(1)).replace("[[]]", "[" * depth + "]" * depth)
    with pytest.raises(ow.ConversionError, match="nested more than 64 deep|not valid JSON"):
        ow.parse_workflow(text, "deep.json")
    (tmp_path / "deep.json").write_text(text)
    done = script(tmp_path / "deep.json", tmp_path / "out.json")
    assert done.returncode == 2 and "deep.json" in done.stderr and "Traceback" not in done.stderr
    if depth == 300:  # a workflow object built in Python is walked without recursion too
        with pytest.raises(ow.ConversionError, match="nested more than 64 deep"):
            ow.convert(shapes.nested(50_000))


@pytest.mark.parametrize("name", list(shapes.ONE_WRONG_FIELD))
def test_one_wrong_field_is_named(tmp_path, name):
    wf = shapes.one_wrong_field(name)
    words = shapes.ONE_WRONG_FIELD[name][1]
    with pytest.raises(ow.ConversionError, match="^bad.json: .*" + __import__("re").escape(words)):
        ow.convert(wf, name="bad.json")
    (tmp_path / "bad.json").write_text(json.dumps(wf))
    done = script(tmp_path / "bad.json", tmp_path / "out.json")
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and str(tmp_path / "bad.json") in done.stderr and "Traceback" not in done.stderr


def test_the_input_workflow_is_left_as_it_was():
    wf = shapes.doubling_combines(5)
    before = json.dumps(wf, sort_keys=True)
    ow.convert(wf)
    assert json.dumps(wf, sort_keys=True) == before


def test_structure_is_counted_before_parsing(monkeypatch):
    monkeypatch.setattr(workflow_schema, "MAX_VALUES", 100)
    text = json.dumps(shapes.doubling_combines(2))
    with pytest.raises(ow.ConversionError, match="JSON values"):
        ow.parse_workflow(text, "many.json")
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed before the count"))
    with pytest.raises(ow.ConversionError, match="JSON values or more"):
        ow.parse_workflow(text, "many.json")


def test_older_pages_pos_objects_are_read():
    wf = shapes.doubling_combines(2)
    for node in wf["nodes"]:
        node["pos"] = {"0": node["pos"][0], "1": node["pos"][1]}
    result = ow.convert(wf)
    notes = [n for n in result.workflow["nodes"] if n["type"] == "Note"]
    assert notes and all(isinstance(v, int | float) for n in notes for v in n["pos"])
