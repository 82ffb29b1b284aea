"""Workflows in the official ComfyUI-ELLA pack's format (UI format 0.4), written here for the tests: one per
kind of graph its examples show, with its node ids, input names and widget layouts. Small sizes and 2 steps,
with the model names the server tests provide."""

from __future__ import annotations

CHECKPOINT, ELLA_FILE = "v1-5-pruned-emaonly.safetensors", "ella-sd1.5-tsc-t5xl.safetensors"
T5_NAME, CONTROLNET, LORA = "models--google--flan-t5-xl--text_encoder", "control_v11p_sd15_canny.safetensors", \
    "tiny_lora.safetensors"
PROMPT = "a large green crocodile in a knitted orange sweater lying on the grass, a small red hat on its head"
SIZE, STEPS = 128, 2


class Graph:
    """Builds a UI-format workflow: `add` returns the node id; inputs are {name: (node, slot, type)}."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, kind: str, widgets: list | None = None, inputs: dict | None = None,
            outputs: list[tuple[str, str]] = (), optional: tuple[tuple[str, str], ...] = ()) -> int:
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": kind, "pos": [nid * 40, nid * 30], "size": [300, 100], "flags": {},
                "order": nid, "mode": 0, "inputs": [], "outputs": [], "properties": {"Node name for S&R": kind},
                "widgets_values": list(widgets or [])}
        for name, (origin, slot, kind_) in (inputs or {}).items():
            link = len(self.links) + 1
            self.links.append([link, origin, slot, nid, len(node["inputs"]), kind_])
            node["inputs"].append({"name": name, "type": kind_, "link": link})
            self.nodes[origin - 1]["outputs"][slot]["links"].append(link)
        for name, kind_ in optional:  # unlinked optional inputs, as the UI saves them
            node["inputs"].append({"name": name, "type": kind_, "link": None})
        node["outputs"] = [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)]
        self.nodes.append(node)
        return nid

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [{"title": "prompts", "bounding": [0, 0, 500, 400]}],
                "config": {}, "extra": {}, "version": 0.4}


def _base(g: Graph, lora: bool = False) -> dict:
    """Checkpoint (+ LoRA), ELLA and T5 loaders, an empty latent: {name: (node, slot, type)}."""
    ckpt = g.add("CheckpointLoaderSimple", [CHECKPOINT],
                 outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    model, clip = (ckpt, 0, "MODEL"), (ckpt, 1, "CLIP")
    if lora:
        lo = g.add("LoraLoader", [LORA, 1.0, 1.0], {"model": model, "clip": clip},
                   outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP")])
        model, clip = (lo, 0, "MODEL"), (lo, 1, "CLIP")
    ella = g.add("ELLALoader", [ELLA_FILE], outputs=[("ELLA", "ELLA")])
    t5 = g.add("T5TextEncoderLoader #ELLA", [T5_NAME, 0, "auto"], outputs=[("T5_TEXT_ENCODER", "T5_TEXT_ENCODER")])
    latent = g.add("EmptyLatentImage", [SIZE, SIZE, 1], outputs=[("LATENT", "LATENT")])
    return {"model": model, "clip": clip, "vae": (ckpt, 2, "VAE"), "ella": (ella, 0, "ELLA"),
            "t5": (t5, 0, "T5_TEXT_ENCODER"), "latent": (latent, 0, "LATENT")}


def _t5_encode(g: Graph, b: dict, text: str, embeds: tuple | None = None) -> tuple:
    inputs = {"text_encoder": b["t5"]} | ({"embeds": embeds} if embeds else {})
    nid = g.add("T5TextEncode #ELLA", [text], inputs, outputs=[("ELLA_EMBEDS", "ELLA_EMBEDS")],
                optional=() if embeds else (("embeds", "ELLA_EMBEDS"),))
    return (nid, 0, "ELLA_EMBEDS")


def _timesteps(g: Graph, b: dict, sigmas: tuple | None = None) -> tuple:
    inputs = {"model": b["model"], "ella": b["ella"]} | ({"sigmas": sigmas} if sigmas else {})
    nid = g.add("SetEllaTimesteps", ["normal", STEPS, 1.0], inputs, outputs=[("ELLA", "ELLA")],
                optional=() if sigmas else (("sigmas", "SIGMAS"),))
    return (nid, 0, "ELLA")


def _sample_and_save(g: Graph, b: dict, model: tuple, positive: tuple, negative: tuple) -> None:
    ks = g.add("KSampler", [7, "fixed", STEPS, 8.0, "euler", "normal", 1.0],
               {"model": model, "positive": positive, "negative": negative, "latent_image": b["latent"]},
               outputs=[("LATENT", "LATENT")])
    _save(g, b, (ks, 0, "LATENT"))


def _save(g: Graph, b: dict, latent: tuple) -> None:
    dec = g.add("VAEDecode", [], {"samples": latent, "vae": b["vae"]}, outputs=[("IMAGE", "IMAGE")])
    g.add("SaveImage", ["official"], {"images": (dec, 0, "IMAGE")})


def _apply(g: Graph, b: dict, ella: tuple, positive: tuple, negative: tuple, sigmas: tuple | None = None) -> int:
    inputs = {"model": b["model"], "ella": ella, "positive": positive, "negative": negative}
    return g.add("EllaApply", [], inputs | ({"sigmas": sigmas} if sigmas else {}),
                 outputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                 optional=() if sigmas else (("sigmas", "SIGMAS"),))


def text_to_image() -> dict:
    """Apply ELLA with sigmas from a BasicScheduler (the pack's main example)."""
    g = Graph()
    b = _base(g)
    sched = g.add("BasicScheduler", ["normal", STEPS, 1.0], {"model": b["model"]}, outputs=[("SIGMAS", "SIGMAS")])
    ap = _apply(g, b, b["ella"], _t5_encode(g, b, PROMPT), _t5_encode(g, b, "blurry, text"),
                (sched, 0, "SIGMAS"))
    _sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def legacy_single_encode() -> dict:
    """Apply ELLA without sigmas or timesteps (the deprecated per-call mode), fixed 128 tokens."""
    g = Graph()
    b = _base(g)
    g.nodes[b["t5"][0] - 1]["widgets_values"] = [T5_NAME, 128, "FP32"]
    ap = _apply(g, b, b["ella"], _t5_encode(g, b, PROMPT), _t5_encode(g, b, ""))
    _sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def set_timesteps_then_apply() -> dict:
    """Set ELLA Timesteps feeding Apply ELLA."""
    g = Graph()
    b = _base(g)
    ap = _apply(g, b, _timesteps(g, b), _t5_encode(g, b, PROMPT), _t5_encode(g, b, ""))
    _sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def ella_encode() -> dict:
    """Set ELLA Timesteps + ELLA Encode, no Apply ELLA: conditioning per step range."""
    g = Graph()
    b = _base(g)
    ella = _timesteps(g, b)
    pos = g.add("EllaEncode", [], {"ella": ella, "embeds": _t5_encode(g, b, PROMPT)},
                outputs=[("CONDITIONING", "CONDITIONING")])
    neg = g.add("EllaEncode", [], {"ella": ella, "embeds": _t5_encode(g, b, "")},
                outputs=[("CONDITIONING", "CONDITIONING")])
    _sample_and_save(g, b, b["model"], (pos, 0, "CONDITIONING"), (neg, 0, "CONDITIONING"))
    return g.workflow()


def _ella_text_encode(g: Graph, b: dict, ella: tuple, text: str, text_clip: str) -> int:
    return g.add("EllaTextEncode", [text, text_clip], {"ella": ella, "text_encoder": b["t5"], "clip": b["clip"]},
                 outputs=[("CONDITIONING", "CONDITIONING"), ("CLIP CONDITIONING", "CONDITIONING")])


def ella_plus_clip() -> dict:
    """ELLA Text Encode with a CLIP and text_clip (ELLA + CLIP); the negative is its CLIP CONDITIONING output."""
    g = Graph()
    b = _base(g, lora=True)
    ella = _timesteps(g, b)
    pos = _ella_text_encode(g, b, ella, PROMPT, "(masterpiece), chibi")
    neg = _ella_text_encode(g, b, ella, "", "(low quality:1.3)")
    _sample_and_save(g, b, b["model"], (pos, 0, "CONDITIONING"), (neg, 1, "CONDITIONING"))
    return g.workflow()


def lora_concat() -> dict:
    """LoRA + ELLA Encode joined with CLIP Text Encode by the stock Conditioning (Concat)."""
    g = Graph()
    b = _base(g, lora=True)
    ella = _timesteps(g, b)
    conds = []
    for text, clip_text in ((PROMPT, "(masterpiece), (full body:1.2), chibi"), ("", "(low quality:1.3)")):
        enc = g.add("EllaEncode", [], {"ella": ella, "embeds": _t5_encode(g, b, text)},
                    outputs=[("CONDITIONING", "CONDITIONING")])
        clip = g.add("CLIPTextEncode", [clip_text], {"clip": b["clip"]}, outputs=[("CONDITIONING", "CONDITIONING")])
        conds.append(g.add("ConditioningConcat", [], {"conditioning_to": (enc, 0, "CONDITIONING"),
                                                      "conditioning_from": (clip, 0, "CONDITIONING")},
                           outputs=[("CONDITIONING", "CONDITIONING")]))
    _sample_and_save(g, b, b["model"], (conds[0], 0, "CONDITIONING"), (conds[1], 0, "CONDITIONING"))
    return g.workflow()


def controlnet() -> dict:
    """ControlNet on the positive that Apply ELLA gives."""
    g = Graph()
    b = _base(g)
    ap = _apply(g, b, _timesteps(g, b), _t5_encode(g, b, PROMPT), _t5_encode(g, b, ""))
    cn = g.add("ControlNetLoader", [CONTROLNET], outputs=[("CONTROL_NET", "CONTROL_NET")])
    img = g.add("LoadImage", ["ella_control_hint.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    applied = g.add("ControlNetApply", [1.0], {"conditioning": (ap, 1, "CONDITIONING"),
                                               "control_net": (cn, 0, "CONTROL_NET"), "image": (img, 0, "IMAGE")},
                    outputs=[("CONDITIONING", "CONDITIONING")])
    _sample_and_save(g, b, (ap, 0, "MODEL"), (applied, 0, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def align_your_steps() -> dict:
    """AlignYourSteps sigmas into Set ELLA Timesteps and a SamplerCustom."""
    g = Graph()
    b = _base(g)
    ays = g.add("AlignYourStepsScheduler", ["SD1", STEPS, 1.0], outputs=[("SIGMAS", "SIGMAS")])
    ella = _timesteps(g, b, (ays, 0, "SIGMAS"))
    pos = _ella_text_encode(g, b, ella, PROMPT, "chibi")
    neg = _ella_text_encode(g, b, ella, "", "")
    sampler = g.add("KSamplerSelect", ["euler"], outputs=[("SAMPLER", "SAMPLER")])
    sc = g.add("SamplerCustom", [True, 7, "fixed", 8.0],
               {"model": b["model"], "positive": (pos, 0, "CONDITIONING"), "negative": (neg, 0, "CONDITIONING"),
                "sampler": (sampler, 0, "SAMPLER"), "sigmas": (ays, 0, "SIGMAS"), "latent_image": b["latent"]},
               outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])
    _save(g, b, (sc, 0, "LATENT"))
    return g.workflow()


def helpers() -> dict:
    """ELLA Combine Embeds (the CLIP embeds first, from Convert Condition to ELLA Embeds) and Combine CLIP & ELLA
    Embeds, into Apply ELLA."""
    g = Graph()
    b = _base(g)
    clip_pos = g.add("CLIPTextEncode", ["chibi"], {"clip": b["clip"]}, outputs=[("CONDITIONING", "CONDITIONING")])
    clip_neg = g.add("CLIPTextEncode", ["blurry"], {"clip": b["clip"]}, outputs=[("CONDITIONING", "CONDITIONING")])
    clip_first = g.add("ConditionToEllaEmbeds", [], {"cond": (clip_pos, 0, "CONDITIONING")},
                       outputs=[("ELLA_EMBEDS", "ELLA_EMBEDS")])
    both = g.add("EllaCombineEmbeds", [], {"embeds": (clip_first, 0, "ELLA_EMBEDS"),
                                           "embeds_add": _t5_encode(g, b, PROMPT)},
                 outputs=[("ELLA_EMBEDS", "ELLA_EMBEDS")])
    combined = g.add("CombineClipEllaEmbeds", [], {"cond": (clip_neg, 0, "CONDITIONING"),
                                                   "embeds": _t5_encode(g, b, "")},
                     outputs=[("ELLA_EMBEDS", "ELLA_EMBEDS")])
    ap = _apply(g, b, b["ella"], (both, 0, "ELLA_EMBEDS"), (combined, 0, "ELLA_EMBEDS"))
    _sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def helpers_chained() -> dict:
    """T5 Text Encode adding T5 to CLIP embeds (its embeds input), and the deprecated Concat Condition & ELLA
    Embeds, into Apply ELLA with sigmas."""
    g = Graph()
    b = _base(g)
    clip_pos = g.add("CLIPTextEncode", ["chibi"], {"clip": b["clip"]}, outputs=[("CONDITIONING", "CONDITIONING")])
    clip_neg = g.add("CLIPTextEncode", ["blurry"], {"clip": b["clip"]}, outputs=[("CONDITIONING", "CONDITIONING")])
    as_embeds = g.add("ConditionToEllaEmbeds", [], {"cond": (clip_pos, 0, "CONDITIONING")},
                      outputs=[("ELLA_EMBEDS", "ELLA_EMBEDS")])
    chained = _t5_encode(g, b, PROMPT, (as_embeds, 0, "ELLA_EMBEDS"))
    old = g.add("ConcatConditionEllaEmbeds", [], {"cond": (clip_neg, 0, "CONDITIONING"),
                                                   "embeds": _t5_encode(g, b, "")},
                outputs=[("ELLA_EMBEDS", "ELLA_EMBEDS")])
    sched = g.add("BasicScheduler", ["karras", STEPS, 1.0], {"model": b["model"]}, outputs=[("SIGMAS", "SIGMAS")])
    ap = _apply(g, b, b["ella"], chained, (old, 0, "ELLA_EMBEDS"), (sched, 0, "SIGMAS"))
    _sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


def two_t5_prompts_combined() -> dict:
    """ELLA Combine Embeds of two T5 prompts: no counterpart here (kept, with a Note)."""
    g = Graph()
    b = _base(g)
    both = g.add("EllaCombineEmbeds", [], {"embeds": _t5_encode(g, b, "a cat"), "embeds_add": _t5_encode(g, b, "a dog")},
                 outputs=[("ELLA_EMBEDS", "ELLA_EMBEDS")])
    ap = _apply(g, b, b["ella"], (both, 0, "ELLA_EMBEDS"), _t5_encode(g, b, ""))
    _sample_and_save(g, b, (ap, 0, "MODEL"), (ap, 1, "CONDITIONING"), (ap, 2, "CONDITIONING"))
    return g.workflow()


RUNNABLE = {f.__name__: f for f in (text_to_image, legacy_single_encode, set_timesteps_then_apply, ella_encode,
                                    ella_plus_clip, lora_concat, controlnet, align_your_steps, helpers,
                                    helpers_chained)}
