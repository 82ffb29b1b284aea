"""Convert workflows made with the official ComfyUI-ELLA pack (TencentQQGYLab) to this pack's nodes.

The mapping is data, `web/official_ella_nodes.json`, shared with the page. A workflow is the UI format
(nodes, links as [id, from, from_slot, to, to_slot, type]); `read_workflow` also takes a PNG whose `workflow`
text chunk holds one. Every other node, link, group and note stays as it was; an official node that cannot
be mapped exactly stays too, beside a Note that says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EllaError, fenced
from .workflow_schema import MAX_WORKFLOW_CHARS, ConversionError, check_workflow, pair, parse_workflow

__all__ = ["MAX_WORKFLOW_CHARS", "ConversionError", "NothingToConvert", "Result", "convert", "load_table",
           "parse_workflow", "read_workflow"]

TABLE_PATH = Path(__file__).resolve().parents[1] / "web" / "official_ella_nodes.json"
MAX_FILE_BYTES = 64 * 1024 * 1024  # a workflow file or PNG larger than this is refused before reading
NOTE_MARK = "ella_conversion"  # property on a kept node and on its Note: both are left alone next time
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class NothingToConvert(ConversionError):
    """The workflow holds no official ComfyUI-ELLA node (or only ones already marked as kept)."""


@dataclass
class Result:
    """The converted workflow and what was done: `converted` lines, `kept` lines (official nodes left as they
    were, each with a Note in the graph)."""

    workflow: dict
    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def load_table(path: Path = TABLE_PATH) -> dict:
    """The mapping table (official node type -> rule)."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_workflow(path: str | os.PathLike) -> dict:
    """The UI-format workflow in a .json file, or in a PNG's `workflow` text chunk."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ConversionError(f"{path}: cannot open ({e.strerror}).") from None
    if size > MAX_FILE_BYTES:
        raise ConversionError(f"{path}: {size} bytes; a workflow or PNG over {MAX_FILE_BYTES} bytes is not read.")
    with open(path, "rb") as f:
        head = f.read(len(PNG_MAGIC))
    if head == PNG_MAGIC:
        text = _png_workflow(path)
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConversionError(f"{path}: neither a PNG nor UTF-8 JSON text.") from None
    return parse_workflow(text, str(path))


def _png_workflow(path: Path) -> str:
    from PIL import Image

    try:
        with fenced(path, "a PNG image"), Image.open(path) as image:
            text = image.info.get("workflow")  # the file is at most MAX_FILE_BYTES; PIL caps compressed chunks
    except EllaError as e:
        raise ConversionError(str(e)) from None
    if text is None:
        raise ConversionError(f"{path}: this PNG holds no workflow (no 'workflow' text chunk). Images saved by "
                              "ComfyUI carry one; images that went through other programs may have lost it.")
    return text if isinstance(text, str) else str(text)


def official_nodes(workflow: dict, table: dict) -> list[dict]:
    """The official ComfyUI-ELLA nodes still to convert (kept ones, marked last time, are not)."""
    return [n for n in workflow["nodes"] if n["type"] in table["official"]
            and NOTE_MARK not in (n.get("properties") or {})]


def convert(workflow: dict, table: dict | None = None, name: str = "workflow") -> Result:
    """A converted copy of `workflow` (named `name` in errors); `workflow` itself is left as it was. Raises
    NothingToConvert when it has no official node left to convert, ConversionError when it cannot be read."""
    table = load_table() if table is None else table
    check_workflow(workflow, name)
    if not official_nodes(workflow, table):
        raise NothingToConvert("no ComfyUI-ELLA nodes to convert in this workflow (it may be converted already).")
    _refuse_loops(workflow, table, name)
    return _Converter(_editable_copy(workflow), table).run()


def _editable_copy(workflow: dict) -> dict:
    """A copy of what the converter changes (the node list, each node's slots and properties), sharing the rest
    (widget values, groups, extra) with `workflow`, which stays as it was."""
    def node_copy(node: dict) -> dict:
        copied = {**node, "inputs": [dict(s) for s in node.get("inputs", [])],
                  "outputs": [{**s, "links": list(s.get("links") or [])} for s in node.get("outputs", [])]}
        if isinstance(node.get("properties"), dict):
            copied["properties"] = dict(node["properties"])
        return copied
    return {**workflow, "nodes": [node_copy(n) for n in workflow["nodes"]], "links": list(workflow.get("links", []))}


def _refuse_loops(workflow: dict, table: dict, name: str) -> None:
    """Refuse a workflow whose links between official nodes form a loop (ComfyUI cannot run one), naming it.
    An iterative depth-first search: each node and link is visited once."""
    official = {n["id"]: n["type"] for n in workflow["nodes"] if n["type"] in table["official"]}
    feeds: dict[int, list[int]] = {}
    for link in workflow.get("links", []):
        if link[1] in official and link[3] in official:
            feeds.setdefault(link[1], []).append(link[3])
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in official:
        if start in state:
            continue
        path, stack = [start], [iter(feeds.get(start, ()))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                loop = path[path.index(nxt):] + [nxt]
                shown = " -> ".join(f"#{nid} {official[nid]}" for nid in loop[:8]) + (" -> ..." if len(loop) > 8 else "")
                raise ConversionError(f"{name}: ComfyUI-ELLA nodes feed each other in a loop ({shown}); ComfyUI "
                                      "cannot run a loop. Remove one of its links and convert again.")
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(feeds.get(nxt, ())))


Source = tuple[int, int]  # (node id, output slot)


class _Converter:
    """One conversion: connections are kept per node and input name while nodes change, and written back at the
    end. `conn[target][input name] = (origin node, origin slot)`."""

    def __init__(self, workflow: dict, table: dict) -> None:
        self.wf, self.table, self.rules = workflow, table, table["official"]
        self.nodes: dict[int, dict] = {n["id"]: n for n in workflow["nodes"]}
        self.result = Result(workflow)
        links = {link[0]: link for link in workflow.get("links", [])}
        self.old_links = {(lk[1], lk[2], lk[3], lk[4]): lk[0] for lk in links.values()}
        self.conn: dict[int, dict[str, Source]] = {nid: {} for nid in self.nodes}
        self.input_types: dict[int, dict[str, str]] = {nid: {} for nid in self.nodes}
        for node in workflow["nodes"]:
            for slot in node.get("inputs", []):
                link = links.get(slot.get("link"))
                if link is not None and link[1] in self.nodes and isinstance(slot.get("name"), str):
                    self.conn[node["id"]][slot["name"]] = (link[1], link[2])
                    self.input_types[node["id"]][slot["name"]] = str(slot.get("type", ""))
        self.redirect: dict[Source, Source | None] = {}  # outputs of removed or changed official slots
        self.shortcuts: dict[Source, Source | None] = {}  # _resolve's answers
        self.todo = official_nodes(workflow, table)
        self.next_id = max([workflow.get("last_node_id") or 0, *self.nodes]) + 1
        # what the official graph says, read before any node changes
        self.original = {nid: dict(inputs) for nid, inputs in self.conn.items()}
        self.types = {nid: n["type"] for nid, n in self.nodes.items()}
        loader = self.rules["T5TextEncoderLoader #ELLA"]
        self.max_lengths = {nid: self._official_values(n, loader).get("max_length") for nid, n in self.nodes.items()
                            if n["type"] == "T5TextEncoderLoader #ELLA"}
        self.kinds: dict[Source, str] = {}  # _kind_of's answers
        self.feeds_encoders = self._set_timesteps_feeding_encoders()
        self.patched: dict[Source, int] = {}  # model source -> the Apply ELLA put on it for Set ELLA Timesteps

    # --- the steps
    def run(self) -> Result:
        for node in sorted(self.todo, key=lambda n: n["type"] == "SetEllaTimesteps"):  # those last: see _apply_on
            rule = self.rules[node["type"]]
            reason = self._unmappable(node, rule)
            if reason:
                self._keep(node, reason)
            elif rule["to"] is None:
                self._remove(node, rule)
            else:
                self._replace(node, rule)
        self._take_patched_models()
        self.wf["nodes"] = [n for n in self.wf["nodes"] if n["id"] in self.nodes]  # removed ones go
        self._write_links()
        return self.result

    def _unmappable(self, node: dict, rule: dict) -> str | None:
        inputs = self.original[node["id"]]
        if rule.get("ella_first"):
            a, b = (self._kind_of(inputs.get(name)) for name in rule["inputs"])
            if (a == "t5") == (b == "t5"):
                return ("it joins two T5 prompts, which has no counterpart here (Conditioning Combine applies two "
                        "ELLA prompts)" if a == "t5" else "neither of its inputs holds a T5 prompt")
        if "embeds" in rule.get("inputs", {}) and rule["to"] == "EllaNodes_TextEncode":
            if self._kind_of(inputs.get("embeds")) == "t5":
                return "its embeds input already holds a T5 prompt, which this node would replace"
        return None

    def _kind_of(self, source: Source | None) -> str:
        """'t5' if the official ELLA_EMBEDS (or conditioning) at `source` holds a T5 prompt, else 'clip' ('none'
        for no source). Memoized and walked with a stack: each output is looked at once per conversion."""
        if source is None:
            return "none"
        kinds, stack, opened = self.kinds, [source], set()
        while stack:
            current = stack[-1]
            if current in kinds:
                stack.pop()
                continue
            found = self._kind_here(current)
            if isinstance(found, str):
                kinds[current] = found
                stack.pop()
                continue
            waiting = [s for s in found if s not in kinds]
            if waiting and current not in opened:  # look at its inputs first, then come back
                opened.add(current)
                stack.extend(waiting)
                continue
            kinds[current] = "t5" if any(kinds.get(s) == "t5" for s in found) else "clip"
            stack.pop()
        return kinds[source]

    def _kind_here(self, source: Source) -> str | list[Source]:
        """What `source` is by itself ('t5' or 'clip'), or the sources its kind follows from."""
        kind = self.types.get(source[0])
        if kind not in self.rules:
            return "clip"
        if kind in ("T5TextEncode #ELLA", "EllaTextEncode") and source[1] == 0:
            return "t5"
        rule = self.rules[kind]
        names = [out[len("input:"):] for out in rule["outputs"] if isinstance(out, str) and out.startswith("input:")]
        names += list(rule.get("inputs", {})) if rule["to"] == "ConditioningConcat" else []
        inputs = self.original[source[0]]
        return [inputs[name] for name in names if inputs.get(name) is not None]

    def _set_timesteps_feeding_encoders(self) -> set[int]:
        """The Set ELLA Timesteps nodes whose ELLA reaches official ELLA Encode / ELLA Text Encode nodes, directly or
        through other Set ELLA Timesteps (in the original graph): walked back from the encoders, once each."""
        found: set[int] = set()
        queue = [nid for nid, kind in self.types.items() if kind in ("EllaEncode", "EllaTextEncode")]
        while queue:
            for source in self.original[queue.pop()].values():
                if source[1] == 0 and self.types.get(source[0]) == "SetEllaTimesteps" and source[0] not in found:
                    found.add(source[0])
                    queue.append(source[0])
        return found

    def _replace(self, node: dict, rule: dict) -> None:
        nid, target = node["id"], self.table["targets"][rule["to"]]
        values = self._official_values(node, rule)
        renames = dict(rule.get("inputs", {}))
        if rule.get("ella_first"):
            first, second = renames
            if self._kind_of(self.original[nid].get(first)) != "t5":
                renames = {first: renames[second], second: renames[first]}
        # widgets turned into inputs (a Primitive node feeding the text) stay linked
        renames.update({theirs: ours for ours, theirs in rule.get("values", {}).items() if isinstance(theirs, str)})
        inputs, types = self.conn[nid], self.input_types[nid]
        for slot, out in enumerate(rule["outputs"]):
            if isinstance(out, int):
                if out != slot:
                    self.redirect[(nid, slot)] = (nid, out)
            elif out.startswith("input:"):
                self.redirect[(nid, slot)] = inputs.get(out[len("input:"):])
        clip_source = inputs.get(rule["clip_text"]["clip"]) if "clip_text" in rule else None
        self.conn[nid] = {renames[name]: src for name, src in inputs.items() if name in renames}
        self.input_types[nid] = {renames[name]: kind for name, kind in types.items() if name in renames}
        new_values = [self._value(node, rule, widget, values) for widget in target["widgets"]]
        if "clip_text" in rule:
            self._clip_text(node, rule["clip_text"], values, rule["outputs"].index("clip_text"), clip_source)
        old_type = node["type"]
        self._retype(node, rule["to"], new_values)
        for name in target["widgets"]:  # widgets the old node had turned into linked inputs
            if name in self.conn[nid]:
                node["inputs"].append({"name": name, "type": self.input_types[nid].get(name, "STRING"),
                                       "widget": {"name": name}, "link": None})
        self.result.converted.append(f"#{nid} {old_type} -> {rule['to']}")

    def _remove(self, node: dict, rule: dict) -> None:
        nid = node["id"]
        for slot, out in enumerate(rule["outputs"]):
            self.redirect[(nid, slot)] = self.conn[nid].get(out[len("input:"):])
        if "apply_ella_on" in rule and self._apply_on(node, rule["apply_ella_on"]):
            return
        del self.conn[nid], self.input_types[nid], self.nodes[nid]
        self.result.converted.append(f"#{nid} {node['type']} removed")

    def _apply_on(self, node: dict, model_input: str) -> bool:
        """A Set ELLA Timesteps whose ELLA reaches an encode node (conditioning made per step range, no Apply
        ELLA) becomes an Apply ELLA on its model; `_take_patched_models` gives the model's users the patched one."""
        nid = node["id"]
        model = self._resolve(self.conn[nid].get(model_input))
        ella = self._resolve(self.redirect.get((nid, 0)))
        if model is None or ella is None or nid not in self.feeds_encoders or model in self.patched:
            return False  # nothing to patch, or already patched (a second Set ELLA Timesteps on that model)
        self.patched[model] = nid
        self._unredirect((nid, 0))
        self.conn[nid] = {"model": model, "ella": ella}
        self.input_types[nid] = {"model": "MODEL", "ella": "ELLA_CONNECTOR"}
        self._retype(node, "EllaNodes_ApplyElla", [])
        self.result.converted.append(f"#{nid} SetEllaTimesteps -> EllaNodes_ApplyElla (on the sampler's model)")
        return True

    def _take_patched_models(self) -> None:
        """Every MODEL input fed by a model that got an Apply ELLA for Set ELLA Timesteps takes the patched one."""
        if not self.patched:
            return
        for target, inputs in self.conn.items():
            if self.nodes[target]["type"] == "EllaNodes_ApplyElla":
                continue
            for name, source in inputs.items():
                resolved = self._resolve(source)
                if resolved in self.patched and self.input_types[target].get(name) == "MODEL":
                    inputs[name] = (self.patched[resolved], 0)

    def _clip_text(self, node: dict, spec: dict, values: dict, out_slot: int, clip: Source | None) -> None:
        """ELLA Text Encode's CLIP part: a CLIP Text Encode on `clip` feeding clip_conditioning."""
        nid = node["id"]
        if clip is None:
            self.redirect[(nid, out_slot)] = None
            if values.get(spec["text"]):
                self.result.converted.append(f"#{nid} EllaTextEncode: text_clip without a clip input was dropped "
                                             "(the official node stopped with an error there)")
            return
        new = self._new_node("CLIPTextEncode", node, [values.get(spec["text"], "")], dy=1)
        self.conn[new["id"]] = {"clip": clip}
        self.input_types[new["id"]] = {"clip": "CLIP"}
        self.conn[nid][spec["into"]] = (new["id"], 0)
        self.input_types[nid][spec["into"]] = "CONDITIONING"
        self.redirect[(nid, out_slot)] = (new["id"], 0)

    def _keep(self, node: dict, reason: str) -> None:
        nid = node["id"]
        title = self.rules[node["type"]]["title"]
        if not isinstance(node.get("properties"), dict):
            node["properties"] = {}
        node["properties"][NOTE_MARK] = f"not converted: {reason}"
        text = (f"ComfyUI-ELLA node #{nid} '{title}' was not converted: {reason}. It is kept as it was; replace it "
                "by hand (see 'Coming from ComfyUI-ELLA' in the ELLA Nodes README).")
        note = self._new_node("Note", node, [text], dy=-1)
        note["properties"] = {NOTE_MARK: nid}
        note["color"], note["bgcolor"] = "#432", "#653"
        self.result.kept.append(f"#{nid} {node['type']}: {reason}")

    # --- helpers
    def _retype(self, node: dict, kind: str, values: list) -> None:
        """`node` becomes a `kind` node with these widget values (its links are written at the end)."""
        target = self.table["targets"][kind]
        node["type"], node["widgets_values"] = kind, values
        node["inputs"] = [{"name": n, "type": t, "link": None} for n, t in target["inputs"]]
        node["outputs"] = [{"name": n, "type": t, "links": [], "slot_index": i}
                           for i, (n, t) in enumerate(target["outputs"])]
        if not isinstance(node.get("properties"), dict):
            node["properties"] = {}
        node["properties"]["Node name for S&R"] = kind

    def _official_values(self, node: dict, rule: dict) -> dict:
        raw = node.get("widgets_values")
        if isinstance(raw, dict):
            return {k: raw[k] for k in rule["widgets"] if k in raw}
        raw = raw if isinstance(raw, list) else []
        return dict(zip(rule["widgets"], raw, strict=False))

    def _value(self, node: dict, rule: dict, widget: str, values: dict) -> Any:
        if widget in ("token_length", "fixed_tokens"):
            length = self._max_length(node, rule.get("token_length_from"))
            if widget == "token_length":
                return "fixed" if length else "flexible"
            return length or 128
        spec = rule.get("values", {}).get(widget)
        if isinstance(spec, str):
            return values.get(spec, "")
        if isinstance(spec, dict):
            value = values.get(spec["from"])
            return spec["map"].get(value, next(iter(spec["map"].values()))) if isinstance(value, str) else "auto"
        return ""

    def _max_length(self, node: dict, input_name: str | None) -> int:
        """The official T5 loader's max_length behind `input_name` (0: flexible)."""
        source = self.original[node["id"]].get(input_name) if input_name else None
        length = self.max_lengths.get(source[0]) if source else None
        return length if isinstance(length, int) and not isinstance(length, bool) and 0 < length <= 512 else 0

    def _resolve(self, source: Source | None) -> Source | None:
        """Where `source` leads once redirects are followed. Each walk leaves shortcuts behind, so long chains of
        removed nodes are walked once, not once per user; a shortcut's end is followed on if it was redirected
        since, and `_unredirect` drops them all."""
        walked, seen = [], set()
        while source is not None and source not in seen:
            seen.add(source)
            jump = self.shortcuts.get(source, source)
            if jump == source and source not in self.redirect:
                break
            walked.append(source)
            source = jump if jump != source else self.redirect[source]
        for step in walked:
            self.shortcuts[step] = source
        return source

    def _unredirect(self, source: Source) -> None:
        self.redirect.pop(source)
        self.shortcuts.clear()

    def _new_node(self, kind: str, near: dict, values: list, dy: int) -> dict:
        pos, size = pair(near.get("pos")) or (0, 0), pair(near.get("size")) or (300, 100)
        node = {"id": self.next_id, "type": kind,
                "pos": [pos[0], pos[1] + (size[1] + 40 if dy > 0 else -140)],
                "size": [size[0], 100], "flags": {}, "order": near.get("order", 0), "mode": near.get("mode", 0),
                "inputs": [], "outputs": [], "properties": {}, "widgets_values": values}
        if kind in self.table["targets"]:
            self._retype(node, kind, values)
        self.next_id += 1
        self.wf["nodes"].append(node)
        self.nodes[node["id"]] = node
        self.conn[node["id"]], self.input_types[node["id"]] = {}, {}
        return node

    def _write_links(self) -> None:
        """Rebuild the links and each node's link fields from the connections; unchanged links keep their id."""
        next_link = max([self.wf.get("last_link_id") or 0, *self.old_links.values()]) + 1
        links, used = [], set()
        for node in self.wf["nodes"]:
            for slot in node.get("outputs", []):
                slot["links"] = []
        for node in self.wf["nodes"]:
            slots = {s.get("name"): (i, s) for i, s in enumerate(node.get("inputs", []))}
            for _, slot in slots.values():
                slot["link"] = None
            for name, source in self.conn[node["id"]].items():
                source = self._resolve(source)
                origin = self.nodes.get(source[0]) if source else None
                outputs = origin.get("outputs", []) if origin else []
                if name not in slots or origin is None or not 0 <= source[1] < len(outputs):
                    continue
                index, slot = slots[name]
                link_id = self.old_links.get((source[0], source[1], node["id"], index))
                if link_id is None or link_id in used:
                    link_id, next_link = next_link, next_link + 1
                used.add(link_id)
                links.append([link_id, source[0], source[1], node["id"], index,
                              outputs[source[1]].get("type", slot.get("type", "*"))])
                slot["link"] = link_id
                outputs[source[1]]["links"].append(link_id)
        links.sort(key=lambda lk: lk[0])
        self.wf["links"] = links
        self.wf["last_link_id"] = max([self.wf.get("last_link_id") or 0, *used])
        self.wf["last_node_id"] = max([self.wf.get("last_node_id") or 0, *self.nodes])
