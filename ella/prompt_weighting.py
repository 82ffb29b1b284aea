"""ComfyUI's prompt weighting syntax for ELLA prompts: the clean text T5 reads and a weight per character.

`(text)` multiplies the weight around it by 1.1, `(text:1.3)` sets it to 1.3 (nested groups work the same
way), `\\(` and `\\)` are literal brackets. T5 reads the text without markup; the weights reach the
connector as log(w) on its attention logits (see `token_bias`). Malformed markup never fails: brackets
without a partner stay as text, weights that are not numbers stay as text, negative or huge weights are
clamped (nested bare brackets too: 1.1 per level stops at MAX_WEIGHT), and each repair is reported in
`warnings`. Parsing is iterative and linear in the text: no nesting depth reaches a recursion limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BARE_GROUP = 1.1
MAX_WEIGHT = 10.0


@dataclass(frozen=True)
class WeightedText:
    """The clean text, the weight of each of its characters, and what was repaired in the markup."""

    text: str
    char_weights: tuple[float, ...]
    warnings: tuple[str, ...] = ()

    @property
    def plain(self) -> bool:
        """True when every character has weight 1 (no markup, or markup of weight 1)."""
        return all(w == 1.0 for w in self.char_weights)

    def spans(self) -> list[tuple[str, float]]:
        """(text, weight) runs of equal weight, in order."""
        runs: list[tuple[str, float]] = []
        for char, weight in zip(self.text, self.char_weights, strict=True):
            if runs and runs[-1][1] == weight:
                runs[-1] = (runs[-1][0] + char, weight)
            else:
                runs.append((char, weight))
        return runs


def parse_weighted(text: str) -> WeightedText:
    """Parse ComfyUI weighting markup; never raises for any string."""
    warnings: list[str] = []
    pairs = _matching_brackets(text, warnings)
    chars, weights = _emit(text, pairs, warnings)
    return WeightedText("".join(chars), tuple(weights), tuple(warnings))


def plain_text(text: str) -> str:
    """The text T5 reads: the prompt without weighting markup."""
    return parse_weighted(text).text


def token_weights(weighted: WeightedText, offsets: Sequence[tuple[int, int]]) -> list[float]:
    """The weight of each token given its character span in `weighted.text`: the weight that owns most of
    its characters (the earlier one on a tie); a token with an empty span takes the weight at its position."""
    out = []
    n = len(weighted.char_weights)
    for start, end in offsets:
        start, end = max(0, min(start, n)), max(0, min(end, n))
        if end <= start:
            out.append(weighted.char_weights[start] if start < n else 1.0)
            continue
        counts: dict[float, int] = {}
        for w in weighted.char_weights[start:end]:
            counts[w] = counts.get(w, 0) + 1
        out.append(max(counts, key=counts.__getitem__))  # dicts keep first-seen order, so ties go to the earlier
    return out


def _matching_brackets(text: str, warnings: list[str]) -> dict[int, int]:
    """Index of each '(' -> its ')'; escaped and unpaired brackets are left out (and reported)."""
    pairs: dict[int, int] = {}
    open_at: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "()":
            i += 2
            continue
        if char == "(":
            open_at.append(i)
        elif char == ")":
            if open_at:
                pairs[open_at.pop()] = i
            else:
                warnings.append(f"')' at character {i + 1} has no '(' before it; kept as text")
        i += 1
    for i in open_at:
        warnings.append(f"'(' at character {i + 1} is never closed; kept as text")
    return pairs


def _emit(text: str, pairs: dict[int, int], warnings: list[str]) -> tuple[list[str], list[float]]:
    """The clean characters of `text` and their weights, descending into bracket groups with an explicit
    stack of (start, end, weight) segments still to emit (no recursion)."""
    chars: list[str] = []
    weights: list[float] = []
    capped = False
    stack = [(0, len(text), 1.0)]
    while stack:
        i, end, weight = stack.pop()
        while i < end:
            char = text[i]
            if char == "\\" and i + 1 < end and text[i + 1] in "()":
                chars.append(text[i + 1])
                weights.append(weight)
                i += 2
            elif char == "(" and i in pairs:
                close = pairs[i]
                inner_end, group_weight = _group_weight(text, i + 1, close, weight, pairs, warnings)
                if group_weight > MAX_WEIGHT:
                    group_weight, capped = MAX_WEIGHT, True
                stack.append((close + 1, end, weight))  # the rest of this segment, after the group
                stack.append((i + 1, inner_end, group_weight))
                break
            else:
                chars.append(char)
                weights.append(weight)
                i += 1
    if capped:
        warnings.append(f"nested brackets raise the weight above {_short(MAX_WEIGHT)} (1.1 per level); "
                        f"used {_short(MAX_WEIGHT)}")
    return chars, weights


def _group_weight(text: str, start: int, end: int, outer: float, pairs: dict[int, int],
                  warnings: list[str]) -> tuple[int, float]:
    """(end of the group's text, its weight): `:number` after the last top-level colon sets the weight,
    otherwise the outer weight times 1.1."""
    colon = _last_top_level_colon(text, start, end, pairs)
    if colon is None:
        return end, outer * BARE_GROUP
    raw = text[colon + 1:end].strip()
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        if raw:
            warnings.append(f"weight {_cut(raw)!r} is not a number; '({_cut(text[start:end])})' kept as text at "
                            f"weight {_short(outer * BARE_GROUP)}")
        return end, outer * BARE_GROUP
    if value < 0:
        warnings.append(f"weight {_cut(raw)} is negative; used 0 (the tokens are ignored)")
        value = 0.0
    elif value > MAX_WEIGHT:
        warnings.append(f"weight {_cut(raw)} is above {_short(MAX_WEIGHT)}; used {_short(MAX_WEIGHT)}")
        value = MAX_WEIGHT
    return colon, value


def _last_top_level_colon(text: str, start: int, end: int, pairs: dict[int, int]) -> int | None:
    found = None
    i = start
    while i < end:
        if text[i] == "\\" and i + 1 < end and text[i + 1] in "()":
            i += 2
            continue
        if text[i] == "(" and i in pairs:
            i = pairs[i] + 1
            continue
        if text[i] == ":":
            found = i
        i += 1
    return found


def _short(value: float) -> str:
    return f"{value:g}"


def _cut(part: str, limit: int = 40) -> str:
    """A piece of the prompt for a warning, cut to `limit` characters (groups nest: a warning must not hold its
    whole group, or nested groups would make the warnings quadratic in the prompt's length)."""
    return part if len(part) <= limit else part[:limit] + "…"
