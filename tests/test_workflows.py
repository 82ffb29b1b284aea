"""The shipped workflows as a user opens them: no example shows the warning it teaches about."""

from __future__ import annotations

import json

import pytest
from comfy_host import ROOT

from ella.t5_tokenizer import load_t5_tokenizer

FIXED_PROMPTS = [(path.name, node["id"], *node["widgets_values"])
                 for path in sorted((ROOT / "workflows").glob("*.json"))
                 for node in json.loads(path.read_text())["nodes"]
                 if node["type"] == "EllaNodes_TextEncode" and node["widgets_values"][1] == "fixed"]


def test_some_shipped_workflow_uses_fixed_length():
    assert FIXED_PROMPTS, "no shipped workflow shows the fixed token length"


@pytest.mark.parametrize(("workflow", "node", "text", "mode", "length"), FIXED_PROMPTS,
                         ids=[f"{w}#{n}" for w, n, *_ in FIXED_PROMPTS])
def test_a_fixed_length_prompt_fits_its_length(t5_tokenizer_dir, workflow, node, text, mode, length):
    """What the token counter shows under the prompt: T5 tokens without weighting markup, end token included."""
    tokens = load_t5_tokenizer(t5_tokenizer_dir / "tokenizer.json").count(text, weighted=True)
    assert tokens <= length, f"{workflow}, node {node}: {tokens} / {length} tokens, {tokens - length} cut"
