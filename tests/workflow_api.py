"""Derive the API-format graph (what POST /prompt takes) from a UI-format workflow file, using the
server's /object_info for the order of widget values, so the shipped UI files are what gets tested."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOT_EXECUTED = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


class MissingNodeType(KeyError):
    """The workflow uses a node type the server does not have (a red node in the UI)."""


def widget_inputs(info: dict) -> list[tuple[str, dict]]:
    """(name, options) of the inputs that are widgets in the UI, in the order the UI stores their values."""
    out = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind = spec[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format graph of `workflow`; raises MissingNodeType for unknown node types."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in NOT_EXECUTED or node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        if node["type"] not in object_info:
            raise MissingNodeType(node["type"])
        inputs: dict[str, object] = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values", []))
        for name, options in widget_inputs(object_info[node["type"]]):
            if not values:
                break
            value = values.pop(0)
            if name not in inputs:
                inputs[name] = value
            if name in ("seed", "noise_seed") or options.get("control_after_generate"):
                values.pop(0)  # the UI's "control after generate" widget
            if options.get("image_upload"):
                values.pop(0) if values else None  # the UI's upload button
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api
