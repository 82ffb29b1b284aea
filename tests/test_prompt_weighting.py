"""Prompt weighting: the parser (ComfyUI's syntax, nesting, escapes, repairs), token weights from both
tokenizer backends, and what the weights do to the connector (log(w) on its attention logits)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from connector_fixtures import TINY, random_connector_state
from t5_fixtures import make_t5_folder, write_t5_tokenizer

import ella
from ella.connector import Connector, ConnectorConfig
from ella.prompt_weighting import parse_weighted, plain_text, token_weights
from ella.t5_tokenizer import load_t5_tokenizer

T5_WIDTH = 32
CONNECTOR = ConnectorConfig(**{**TINY.__dict__, "input_dim": T5_WIDTH})


def runs(text: str) -> list[tuple[str, float]]:
    return [(t, round(w, 6)) for t, w in parse_weighted(text).spans()]


@pytest.mark.parametrize(("text", "expected"), [
    ("a red dress", [("a red dress", 1.0)]),
    ("a (red) dress", [("a ", 1.0), ("red", 1.1), (" dress", 1.0)]),
    ("((red))", [("red", 1.21)]),
    ("a (red dress:1.3)", [("a ", 1.0), ("red dress", 1.3)]),
    ("((big:2) dog:0.5)", [("big", 2.0), (" dog", 0.5)]),  # an explicit weight is absolute, as in ComfyUI
    ("(a (b) c:1.5)", [("a ", 1.5), ("b", 1.65), (" c", 1.5)]),
    (r"\(not weighted\) (yes:1.2)", [("(not weighted) ", 1.0), ("yes", 1.2)]),
    (r"(a \(b\):0.5)", [("a (b)", 0.5)]),
    ("(x: 2 )", [("x", 2.0)]),
    ("()a", [("a", 1.0)]),
    ("(a:1)", [("a", 1.0)]),
])
def test_parser_reads_comfyui_syntax(text: str, expected: list) -> None:
    assert runs(text) == expected
    assert parse_weighted(text).warnings == ()


@pytest.mark.parametrize(("text", "clean", "weights", "warning"), [
    ("a (red dress", "a (red dress", {1.0}, "'(' at character 3 is never closed; kept as text"),
    ("a red) dress", "a red) dress", {1.0}, "')' at character 6 has no '(' before it; kept as text"),
    ("(red:abc)", "red:abc", {1.1}, "weight 'abc' is not a number; '(red:abc)' kept as text at weight 1.1"),
    ("(red:nan)", "red:nan", {1.1}, "weight 'nan' is not a number"),
    ("(red:-2)", "red", {0.0}, "weight -2 is negative; used 0 (the tokens are ignored)"),
    ("(red:1e6)", "red", {10.0}, "weight 1e6 is above 10; used 10"),
    ("(red:inf)", "red", {10.0}, "weight inf is above 10; used 10"),
    ("((a)", "(a", {1.0, 1.1}, "'(' at character 1 is never closed"),
])
def test_malformed_markup_is_repaired_and_reported(text: str, clean: str, weights: set, warning: str) -> None:
    parsed = parse_weighted(text)
    assert parsed.text == clean
    assert {round(w, 6) for w in parsed.char_weights} == weights
    assert any(w.startswith(warning) for w in parsed.warnings), parsed.warnings


def test_parser_never_raises_on_arbitrary_strings() -> None:
    import random
    rng = random.Random(0)
    alphabet = "ab :()\\.1-e"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        parsed = parse_weighted(text)
        assert len(parsed.text) == len(parsed.char_weights)
        assert all(0.0 <= w <= 10.0 * 1.1 ** 24 for w in parsed.char_weights)
        assert plain_text(text) == parsed.text


def test_a_token_takes_the_weight_owning_most_of_its_characters() -> None:
    parsed = parse_weighted("(abc:2)de (f:3)ghij")  # clean "abcde fghij"
    assert token_weights(parsed, [(0, 5), (0, 4), (5, 11), (6, 11), (2, 4), (5, 5), (11, 11)]) == [
        2.0, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    assert token_weights(parsed, [(1, 5)]) == [2.0]  # 2 characters at 2, 2 at 1: the earlier wins the tie


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("tok")
    write_t5_tokenizer(tmp / "json", "json")
    write_t5_tokenizer(tmp / "spiece", "spiece")
    return {kind: load_t5_tokenizer(tmp / kind) for kind in ("json", "spiece")}


@pytest.mark.parametrize("kind", ["json", "spiece"])
def test_tokens_carry_their_span_weights(tokenizers: dict, kind: str) -> None:
    tok = tokenizers[kind]
    weighted = tok.tokenize(["a (red dress:1.5) on a (chair:0)"], weighted=True)
    plain = tok.tokenize(["a red dress on a chair"])
    assert torch.equal(weighted.input_ids, plain.input_ids)  # T5 reads the text without markup
    ids = weighted.input_ids[0].tolist()
    words = {w: tok.encode([w])[0] for w in ("red dress", "chair")}
    weights = weighted.weights[0].tolist()
    assert weights[-1] == 1.0  # EOS
    red = _find(ids, words["red dress"][-2:])  # "▁red", "▁dress" inside the prompt
    assert weights[red:red + 2] == [1.5, 1.5]
    chair = _find(ids, words["chair"][-1:])
    assert weights[chair] == 0.0
    assert sorted(set(weights)) == [0.0, 1.0, 1.5]


def test_both_backends_weight_non_ascii_text_alike(tokenizers: dict) -> None:
    text = "(naïve café:1.5) résumé ((crème brûlée))"
    json_tokens, spiece_tokens = (tokenizers[k].tokenize([text], weighted=True) for k in ("json", "spiece"))
    assert torch.equal(json_tokens.input_ids, spiece_tokens.input_ids)
    assert torch.equal(json_tokens.weights, spiece_tokens.weights)


def test_weights_follow_truncation_and_padding(tokenizers: dict) -> None:
    tok = tokenizers["json"]
    out = tok.tokenize(["(" + "cat " * 20 + ":2)", "(dog:0.5)"], max_length=8, weighted=True)
    assert out.weights.shape == (2, 8)
    assert out.weights[0].tolist() == [2.0] * 7 + [1.0]  # cut to 7 + EOS
    assert out.weights[1, 0] == 0.5 and out.weights[1, 1:].eq(1).all()  # dog, EOS, padding (masked anyway)
    assert tok.count("(cat:2) (dog)", weighted=True) == tok.count("cat dog")


def test_markup_warnings_are_logged(tokenizers: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ELLA"):
        tokenizers["json"].tokenize(["a (red:abc) dress"], weighted=True)
    assert "weight 'abc' is not a number" in caplog.text


def _find(ids: list[int], part: list[int]) -> int:
    for i in range(len(ids) - len(part) + 1):
        if ids[i:i + len(part)] == part:
            return i
    raise AssertionError(f"{part} not in {ids}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ella.T5Encoder, Connector]:
    t5 = ella.load_t5(make_t5_folder(tmp_path_factory.mktemp("t5"), "hf"))
    connector = Connector(CONNECTOR)
    connector.load_state_dict(random_connector_state(CONNECTOR, seed=2))
    return t5, connector.eval()


def _context(models: tuple, text: str, max_length: int | None, weighted: bool = True) -> torch.Tensor:
    t5, connector = models
    encoded = t5.encode([text], max_length, weighted=weighted)
    with torch.no_grad():
        return connector(encoded.features, torch.tensor([400.0]), encoded.connector_mask)


@pytest.mark.parametrize("max_length", [None, 32])
def test_weight_one_markup_equals_the_unweighted_path(models: tuple, max_length: int | None) -> None:
    plain = _context(models, "a red dress on a chair", max_length, weighted=False)
    assert torch.equal(_context(models, "a (red dress:1) on a (chair:1.0)", max_length), plain)
    assert torch.equal(_context(models, "a red dress on a chair", max_length), plain)
    assert not torch.equal(_context(models, "a (red dress:1.5) on a chair", max_length), plain)


@pytest.mark.parametrize("max_length", [None, 32])
def test_weight_zero_equals_masking_those_tokens(models: tuple, max_length: int | None) -> None:
    t5, connector = models
    weighted = t5.encode(["a red dress on a (wooden chair:0)"], max_length, weighted=True)
    mask = weighted.connector_mask > 0  # the same tokens masked through the boolean path
    assert mask.sum() < weighted.connector_mask.ne(0).numel()
    t = torch.tensor([400.0])
    with torch.no_grad():
        assert torch.equal(connector(weighted.features, t, weighted.connector_mask), connector(weighted.features, t, mask))


def test_the_effect_grows_with_the_weight(models: tuple) -> None:
    base = _context(models, "a red dress on a wooden chair", None)
    up = [(_context(models, f"a (red dress:{w}) on a wooden chair", None) - base).norm().item()
          for w in (1.25, 1.5, 2.0, 3.0, 5.0)]
    down = [(_context(models, f"a (red dress:{w}) on a wooden chair", None) - base).norm().item()
            for w in (0.8, 0.6, 0.4, 0.2, 0.0)]
    assert up == sorted(up) and down == sorted(down) and up[0] > 0 and down[0] > 0, (up, down)


def test_weights_reach_the_attention_as_log_w(models: tuple) -> None:
    from ella.connector import token_bias
    weights = torch.tensor([[1.0, 2.0, 0.5, 0.0]])
    bias = token_bias(weights, num_latents=3, dtype=torch.float32)[0, 0, 0]
    assert torch.allclose(bias[:5], torch.tensor([0.0, 0.0, 0.0, 0.0, 0.6931472]))
    assert bias[5] == pytest.approx(-0.6931472) and bias[6] == -float("inf")


def test_plain_text_is_what_t5_reads(tmp_path: Path, models: tuple) -> None:
    t5 = models[0]
    text = r"a (red dress:1.3) and \(brackets\)"
    assert plain_text(text) == "a red dress and (brackets)"
    assert torch.equal(t5.tokenize([text], weighted=True).input_ids, t5.tokenize([plain_text(text)]).input_ids)


def test_warnings_quote_a_bounded_piece_of_the_prompt():
    """Groups nest: a warning that quoted its whole group would make nested bad weights quadratic in memory."""
    levels = 3000
    text = "(" * levels + "x" + ":y)" * levels
    parsed = parse_weighted(text)
    assert len(parsed.warnings) >= levels  # one per group (and one for the capped nesting)
    assert max(len(w) for w in parsed.warnings) < 200
