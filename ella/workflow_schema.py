"""The UI workflow format as the official-workflow converter reads it, checked before any work.

A workflow comes from a stranger: its text is measured before it is parsed (characters, and an upper bound on
its JSON values), its structure is walked without recursion (depth, value count), and every field the converter
reads is checked for type and range, so a malformed file gets one clear error naming the field and what was
expected, never a traceback later.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import EllaError

MAX_WORKFLOW_CHARS = 16 * 1024 * 1024
MAX_VALUES = 1_000_000  # JSON values (objects, arrays, numbers, strings...) in one workflow
MAX_DEPTH = 64  # nesting of objects and arrays; saved workflows use fewer than 10
MAX_NODES = 10_000
MAX_LINKS = 50_000
MAX_SLOTS = 1_000  # inputs or outputs of one node
MAX_ID = 2**53  # ids are JavaScript numbers in the page: beyond this they lose precision


class ConversionError(EllaError):
    """The input cannot be converted; the message says what was expected."""


def parse_workflow(text: str, name: str = "workflow") -> dict:
    """`text` as a UI-format workflow, measured before parsing and checked field by field after."""
    if len(text) > MAX_WORKFLOW_CHARS:
        raise ConversionError(f"{name}: {len(text)} characters; a workflow over {MAX_WORKFLOW_CHARS} is not read.")
    # every JSON value but the first follows a ',' or opens after '[' / '{' / ':': an upper bound, counted in C
    bound = text.count(",") + text.count("[") + text.count("{") + text.count(":") + 1
    if bound > 2 * MAX_VALUES:
        raise ConversionError(f"{name}: about {bound // 2} JSON values or more; a workflow of over {MAX_VALUES} "
                              "values is not read.")
    try:
        workflow = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"{name}: not valid JSON ({str(e)[:200]}).") from None
    check_workflow(workflow, name)
    return workflow


def check_workflow(workflow: Any, name: str = "workflow") -> None:
    """Raise ConversionError naming the first field of `workflow` the converter could not read."""
    if not isinstance(workflow, dict):
        raise ConversionError(f"{name}: a workflow is a JSON object with 'nodes' and 'links'; "
                              f"got {type(workflow).__name__}.")
    if "nodes" not in workflow and workflow and all(isinstance(v, dict) and "class_type" in v
                                                    for v in workflow.values()):
        raise ConversionError(f"{name}: this is an API-format prompt; save the workflow itself (Workflow > Save, "
                              "or Export) and convert that.")
    _check_structure(workflow, name)
    nodes, links = workflow.get("nodes"), workflow.get("links", [])
    if not isinstance(nodes, list) or not isinstance(links, list):
        raise ConversionError(f"{name}: 'nodes' and 'links' must be lists.")
    if len(nodes) > MAX_NODES or len(links) > MAX_LINKS:
        raise ConversionError(f"{name}: {len(nodes)} nodes and {len(links)} links; at most {MAX_NODES} nodes and "
                              f"{MAX_LINKS} links are read.")
    for key in ("last_node_id", "last_link_id"):
        _id_or_none(workflow.get(key), f"{name}: {key}")
    ids: set[int] = set()
    for i, node in enumerate(nodes):
        where = f"{name}: nodes[{i}]"
        if not isinstance(node, dict):
            raise ConversionError(f"{where}: expected an object, got {_kind(node)}.")
        _check_node(node, where)
        if node["id"] in ids:
            raise ConversionError(f"{where}: node id {node['id']} appears twice; ids must be unique.")
        ids.add(node["id"])
    link_ids: set[int] = set()
    for i, link in enumerate(links):
        _check_link(link, f"{name}: links[{i}]")
        if link[0] in link_ids:
            raise ConversionError(f"{name}: links[{i}]: link id {link[0]} appears twice; ids must be unique.")
        link_ids.add(link[0])


def _check_structure(value: Any, name: str) -> None:
    """Depth and value count, walked with a stack (no recursion for deep input to exhaust)."""
    stack, count = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConversionError(f"{name}: more than {MAX_VALUES} JSON values; a workflow that large is not read.")
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ConversionError(f"{name}: objects or arrays nested more than {MAX_DEPTH} deep; a saved "
                                      "workflow nests far less.")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def _check_node(node: dict, where: str) -> None:
    _id(node.get("id"), f"{where}.id")
    where = f"{where} (id {node['id']})"
    if not isinstance(node.get("type"), str) or not node["type"]:
        raise ConversionError(f"{where}.type: expected the node type's name, got {_kind(node.get('type'))}.")
    for key in ("inputs", "outputs"):
        slots = node.get(key, [])
        if not isinstance(slots, list) or len(slots) > MAX_SLOTS:
            raise ConversionError(f"{where}.{key}: expected a list of at most {MAX_SLOTS} slots, got {_kind(slots)}.")
        for j, slot in enumerate(slots):
            _check_slot(slot, f"{where}.{key}[{j}]", key == "inputs")
    for key in ("properties", "flags"):
        if node.get(key) is not None and not isinstance(node[key], dict):
            raise ConversionError(f"{where}.{key}: expected an object, got {_kind(node[key])}.")
    if node.get("widgets_values") is not None and not isinstance(node["widgets_values"], list | dict):
        raise ConversionError(f"{where}.widgets_values: expected a list (or an object), "
                              f"got {_kind(node['widgets_values'])}.")
    for key in ("pos", "size"):
        if key in node and pair(node[key]) is None:
            raise ConversionError(f"{where}.{key}: expected two numbers [x, y], got {_kind(node[key])}.")
    for key in ("order", "mode"):
        if node.get(key) is not None and not _is_int(node[key]):
            raise ConversionError(f"{where}.{key}: expected a whole number, got {_kind(node[key])}.")
    for key in ("title", "color", "bgcolor"):
        if node.get(key) is not None and not isinstance(node[key], str):
            raise ConversionError(f"{where}.{key}: expected a string, got {_kind(node[key])}.")


def _check_slot(slot: Any, where: str, is_input: bool) -> None:
    if not isinstance(slot, dict):
        raise ConversionError(f"{where}: expected an object, got {_kind(slot)}.")
    if not isinstance(slot.get("name", ""), str):
        raise ConversionError(f"{where}.name: expected a string, got {_kind(slot['name'])}.")
    if not isinstance(slot.get("type", ""), str | int) or isinstance(slot.get("type"), bool):
        raise ConversionError(f"{where}.type: expected a type name, got {_kind(slot['type'])}.")
    if is_input:
        _id_or_none(slot.get("link"), f"{where}.link")
        if slot.get("widget") is not None and not isinstance(slot["widget"], dict):
            raise ConversionError(f"{where}.widget: expected an object, got {_kind(slot['widget'])}.")
        return
    links = slot.get("links")
    if links is not None and not (isinstance(links, list) and all(_is_int(v) for v in links)):
        raise ConversionError(f"{where}.links: expected a list of link ids or null, got {_kind(links)}.")
    if slot.get("slot_index") is not None and not _is_int(slot["slot_index"]):
        raise ConversionError(f"{where}.slot_index: expected a whole number, got {_kind(slot['slot_index'])}.")


def _check_link(link: Any, where: str) -> None:
    shape = "[id, from node, from slot, to node, to slot, type]"
    if not (isinstance(link, list) and 5 <= len(link) <= 6):
        raise ConversionError(f"{where} must be {shape}; got {_kind(link)}.")
    for value, what in zip(link[:5], ("id", "from node", "from slot", "to node", "to slot"), strict=True):
        if not _is_int(value) or not (0 <= value <= MAX_SLOTS if "slot" in what else abs(value) <= MAX_ID):
            raise ConversionError(f"{where} must be {shape}; its {what} is {_kind(value)}.")
    if len(link) == 6 and (not isinstance(link[5], str | int) or isinstance(link[5], bool)):
        raise ConversionError(f"{where} must be {shape}; its type is {_kind(link[5])}.")


def pair(value: Any) -> tuple[float, float] | None:
    """[x, y] (or the {"0": x, "1": y} that older pages saved) as two finite numbers, else None."""
    if isinstance(value, dict) and set(value) == {"0", "1"}:
        value = [value["0"], value["1"]]
    if not (isinstance(value, list) and len(value) == 2):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < 1e12 for v in value):
        return None
    return value[0], value[1]


def _id(value: Any, where: str) -> None:
    if not _is_int(value) or abs(value) > MAX_ID:
        raise ConversionError(f"{where}: expected a whole number up to {MAX_ID}, got {_kind(value)}.")


def _id_or_none(value: Any, where: str) -> None:
    if value is not None:
        _id(value, where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any, limit: int = 60) -> str:
    """A stranger's value for a message: its type and a cut repr."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[:limit - 3] + '...'}"
