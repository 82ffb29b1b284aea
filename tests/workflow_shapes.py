"""Hostile official-format workflows for the converter's tests: graph shapes that make naive walks loop, recurse
or blow up, and one-wrong-field mutations of a sound workflow."""

from __future__ import annotations

import copy
import json

import official_graphs as og

EMBEDS = "ELLA_EMBEDS"


def self_fed_combine() -> dict:
    """About 1 KB: an ELLA Combine Embeds whose second input is its own output."""
    g = og.Graph()
    t5 = g.add("T5TextEncoderLoader #ELLA", [og.T5_NAME, 0, "auto"], outputs=[("T5_TEXT_ENCODER", "T5_TEXT_ENCODER")])
    enc = g.add("T5TextEncode #ELLA", ["a cat"], {"text_encoder": (t5, 0, "T5_TEXT_ENCODER")},
                outputs=[(EMBEDS, EMBEDS)])
    both = g.add("EllaCombineEmbeds", [], {"embeds": (enc, 0, EMBEDS)}, outputs=[(EMBEDS, EMBEDS)],
                 optional=(("embeds_add", EMBEDS),))
    link = len(g.links) + 1
    g.links.append([link, both, 0, both, 1, EMBEDS])
    g.nodes[both - 1]["inputs"][1]["link"] = link
    g.nodes[both - 1]["outputs"][0]["links"].append(link)
    return g.workflow()


def doubling_combines(count: int) -> dict:
    """A chain of ELLA Combine Embeds, each fed by the previous one on both inputs: a walk that follows both inputs
    of every node again does 2**count steps."""
    g = og.Graph()
    b = og._base(g)
    last = og._t5_encode(g, b, "a cat")
    for _ in range(count):
        last = (g.add("EllaCombineEmbeds", [], {"embeds": last, "embeds_add": last}, outputs=[(EMBEDS, EMBEDS)]),
                0, EMBEDS)
    ap = og._apply(g, b, b["ella"], last, og._t5_encode(g, b, ""))
    og._sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def set_timesteps_chain(count: int) -> dict:
    """`count` Set ELLA Timesteps in a row, the last feeding ELLA Encode nodes (a deep recursion for a naive walk)."""
    g = og.Graph()
    b = og._base(g)
    ella = b["ella"]
    for _ in range(count):
        ella = (g.add("SetEllaTimesteps", ["normal", og.STEPS, 1.0], {"model": b["model"], "ella": ella},
                      outputs=[("ELLA", "ELLA")], optional=(("sigmas", "SIGMAS"),)), 0, "ELLA")
    conds = [g.add("EllaEncode", [], {"ella": ella, "embeds": og._t5_encode(g, b, text)},
                   outputs=[("CONDITIONING", "CONDITIONING")]) for text in (og.PROMPT, "")]
    og._sample_and_save(g, b, b["model"], (conds[0], 0, "CONDITIONING"), (conds[1], 0, "CONDITIONING"))
    return g.workflow()


def wide_fan_in(leaves: int) -> dict:
    """One T5 loader feeding `leaves` T5 prompts, joined pairwise by CLIP-and-ELLA combines into one tree."""
    g = og.Graph()
    b = og._base(g)
    clip = (g.add("CLIPTextEncode", ["chibi"], {"clip": b["clip"]}, outputs=[("CONDITIONING", "CONDITIONING")]),
            0, "CONDITIONING")
    level = [og._t5_encode(g, b, f"prompt {i}") for i in range(leaves)]
    while len(level) > 1:
        level = [(g.add("CombineClipEllaEmbeds", [], {"cond": clip, "embeds": level[i]}, outputs=[(EMBEDS, EMBEDS)]),
                  0, EMBEDS) if i + 1 == len(level) else
                 (g.add("EllaCombineEmbeds", [], {"embeds": level[i], "embeds_add": level[i + 1]},
                        outputs=[(EMBEDS, EMBEDS)]), 0, EMBEDS)
                 for i in range(0, len(level), 2)]
    ap = og._apply(g, b, b["ella"], level[0], og._t5_encode(g, b, ""))
    og._sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def nested(depth: int) -> dict:
    """A sound workflow whose first node's widgets_values holds arrays nested `depth` deep."""
    wf = og.text_to_image()
    value: list = []
    for _ in range(depth):
        value = [value]
    wf["nodes"][0]["widgets_values"] = value
    return wf


def _node(wf: dict, kind: str) -> dict:
    return next(n for n in wf["nodes"] if n["type"] == kind)


def _set(path: str, value: object):
    """A mutation setting `path` (keys and indexes, '/'-separated; a leading node type picks that node)."""
    def mutate(wf: dict) -> None:
        parts = path.split("/")
        target = _node(wf, parts.pop(0)) if parts[0] not in wf else wf
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        target[int(last) if isinstance(target, list) else last] = value
    return mutate


# name -> (mutation of og.text_to_image(), words the error must hold)
ONE_WRONG_FIELD = {
    "input link a list": (_set("KSampler/inputs/0/link", [1, 2]), "inputs[0].link: expected a whole number"),
    "input name a list": (_set("KSampler/inputs/0/name", ["model"]), "inputs[0].name: expected a string"),
    "properties a number": (_set("KSampler/properties", 5), ".properties: expected an object, got int 5"),
    "last_node_id a string": (_set("last_node_id", "12"), "last_node_id: expected a whole number"),
    "last_link_id a list": (_set("last_link_id", [3]), "last_link_id: expected a whole number"),
    "pos of strings": (_set("EllaApply/pos", ["1", "2"]), ".pos: expected two numbers"),
    "pos of nulls": (_set("EllaApply/pos", [None, None]), ".pos: expected two numbers"),
    "size of one number": (_set("EllaApply/size", [300]), ".size: expected two numbers"),
    "node id a string": (_set("KSampler/id", "7"), ".id: expected a whole number"),
    "node id true": (_set("KSampler/id", True), ".id: expected a whole number"),
    "node type empty": (_set("KSampler/type", ""), ".type: expected the node type's name"),
    "inputs an object": (_set("KSampler/inputs", {"model": 1}), ".inputs: expected a list"),
    "input slot a string": (_set("KSampler/inputs/0", "model"), "inputs[0]: expected an object"),
    "output links of strings": (_set("ELLALoader/outputs/0/links", ["1"]), "outputs[0].links: expected a list"),
    "widgets_values a number": (_set("ELLALoader/widgets_values", 3), ".widgets_values: expected a list"),
    "order a string": (_set("KSampler/order", "first"), ".order: expected a whole number"),
    "link too short": (_set("links/0", [1, 2, 0]), "links[0] must be [id, from node"),
    "link slot negative": (_set("links/0/2", -1), "its from slot is int -1"),
    "link id a float": (_set("links/0/0", 1.5), "its id is float 1.5"),
    "link id twice": (_set("links/1/0", 1), "link id 1 appears twice"),
    "node id twice": (lambda wf: wf["nodes"][1].__setitem__("id", wf["nodes"][0]["id"]), "appears twice"),
    "node not an object": (_set("nodes/2", [1, 2]), "nodes[2]: expected an object"),
}


def one_wrong_field(name: str) -> dict:
    wf = copy.deepcopy(og.text_to_image())
    ONE_WRONG_FIELD[name][0](wf)
    return wf


def size_of(wf: dict) -> int:
    return len(json.dumps(wf))
