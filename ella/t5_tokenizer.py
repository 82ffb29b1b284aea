"""T5 prompt tokenization: tokenizer.json (via `tokenizers`) or spiece.model (via `sentencepiece`).

Prompts end with the EOS token `</s>` and are padded with `<pad>`, as the T5
tokenizers of transformers do. Two modes: flexible (max_length None: no padding
beyond the longest prompt of a batch, hard cap of 512 tokens) and fixed
(max_length N: pad or truncate every prompt to exactly N tokens, the ELLA
training setting with N = 128).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .containment import Roots, contained, default_roots
from .errors import EllaError, EllaLoadError, fenced
from .prompt_weighting import parse_weighted, token_weights
from .t5_files import find_tokenizer, find_weights

log = logging.getLogger("ELLA")

T5_MAX_TOKENS = 512
_MAX_WARNINGS = 5  # markup repairs logged per prompt
MAX_TOKENIZER_BYTES = 32 * 1024 * 1024  # a real T5 tokenizer.json is 2.4 MB, spiece.model 0.8 MB


@dataclass
class TokenizedPrompts:
    """Token ids of a batch of prompts, padded to one length, with counts before truncation."""

    input_ids: torch.Tensor  # [B, L] int64
    mask: torch.Tensor  # [B, L] bool, True = real token (EOS included)
    token_counts: list[int]  # tokens per prompt before truncation, EOS included
    truncated: list[bool]
    fixed_length: int | None  # N in fixed mode, None in flexible mode
    weights: torch.Tensor | None = None  # [B, L] float32 token weights (1 for EOS and padding); None = all 1


Encoded = tuple[list[int], list[tuple[int, int]]]  # token ids and each token's character span in the text


class T5PromptTokenizer:
    """A T5 SentencePiece vocabulary that turns prompts into token ids."""

    def __init__(self, path: Path, encode_batch: Callable[[list[str]], list[Encoded]],
                 eos_id: int, pad_id: int, vocab_size: int) -> None:
        self.path = path
        self._encode_batch = encode_batch
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size

    def __repr__(self) -> str:
        return f"T5PromptTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [ids for ids, _ in self._encoded(prompt_list(list(texts)))]

    def _encoded(self, texts: list[str]) -> list[Encoded]:
        with fenced(self.path, "the tokenizer: it failed while tokenizing, the file may be damaged"):
            return self._encode_batch(texts)

    def count(self, text: str, weighted: bool = False) -> int:
        """T5 tokens of one prompt, EOS included, before any truncation (markup removed if weighted)."""
        text = prompt_list(text)[0]
        return len(self.encode([parse_weighted(text).text if weighted else text])[0]) + 1

    def tokenize(self, texts: str | Sequence[str], max_length: int | None = None,
                 weighted: bool = False) -> TokenizedPrompts:
        """Tokenize prompts: EOS appended, truncated to max_length (or 512), padded to one length.
        With weighted=True, ComfyUI weighting markup is removed and each token gets its weight."""
        texts = prompt_list(texts)
        limit = check_max_length(max_length) or T5_MAX_TOKENS
        parsed = [parse_weighted(t) for t in texts] if weighted else None
        for i, p in enumerate(parsed or []):
            for warning in p.warnings[:_MAX_WARNINGS]:
                log.warning("ELLA: prompt %d: %s.", i + 1, warning)
            if len(p.warnings) > _MAX_WARNINGS:
                log.warning("ELLA: prompt %d: %d more markup repairs like these.", i + 1,
                            len(p.warnings) - _MAX_WARNINGS)
        rows, row_weights, counts = [], [], []
        encoded = self._encoded([p.text for p in parsed] if parsed else texts)
        for i, (ids, offsets) in enumerate(encoded):
            weights = token_weights(parsed[i], offsets) if parsed and not parsed[i].plain else [1.0] * len(ids)
            ids, weights = [*ids, self.eos_id], [*weights, 1.0]
            counts.append(len(ids))
            if len(ids) > limit:
                _log_truncation(i, len(texts), len(ids), limit)
                ids, weights = [*ids[: limit - 1], self.eos_id], [*weights[: limit - 1], 1.0]
            rows.append(ids)
            row_weights.append(weights)
        length = max_length or max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        weight_rows = torch.ones((len(rows), length), dtype=torch.float32)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = True
            weight_rows[i, : len(ids)] = torch.tensor(row_weights[i], dtype=torch.float32)
        truncated = [c > limit for c in counts]
        weights = None if bool((weight_rows == 1).all()) else weight_rows
        return TokenizedPrompts(input_ids, mask, counts, truncated, max_length, weights)


def prompt_list(texts: str | Sequence[str]) -> list[str]:
    """One prompt or a list of prompts, checked (strings of valid Unicode), as a list."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise EllaError("No prompt given: pass a string or a non-empty list of strings.")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise EllaError(f"Prompts must be strings; got {', '.join(sorted(set(bad)))}.")
    for i, text in enumerate(texts):
        check_encodable(text, f"prompt {i + 1}" if len(texts) > 1 else "the prompt")
    return texts


def check_encodable(text: str, name: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as '\\ud800'), naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EllaError(f"{name}: character {e.start + 1} ({text[e.start]!r}) is half of a surrogate pair, "
                        "not a character; expected valid Unicode text.") from None


def check_max_length(max_length: int | None) -> int | None:
    """Validate max_length: None (flexible mode) or an int in 1..512 (fixed mode)."""
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= T5_MAX_TOKENS:
        raise EllaError(f"max_length must be None (flexible) or a whole number from 1 to {T5_MAX_TOKENS}; got {max_length!r}.")
    return max_length


def _log_truncation(index: int, total: int, count: int, limit: int) -> None:
    which = f"prompt {index + 1} of {total}" if total > 1 else "the prompt"
    dropped = count - limit
    if count > T5_MAX_TOKENS:
        log.warning("ELLA: %s has %d T5 tokens, more than T5 reads (%d); the last %d tokens were dropped (%d kept).",
                    which, count, T5_MAX_TOKENS, dropped, limit)
    else:
        log.info("ELLA: %s has %d T5 tokens; fixed length %d drops the last %d.", which, count, limit, dropped)


def load_t5_tokenizer(path: str | os.PathLike, roots: Roots | None = None) -> T5PromptTokenizer:
    """Load a tokenizer from a tokenizer.json / spiece.model file, a folder holding one, or a T5 model path;
    every file read lies inside `roots` (default: the path's folder)."""
    path = Path(path).expanduser()
    roots = default_roots(path) if roots is None else roots
    if path.is_file() and _is_tokenizer_file(path):
        return read_tokenizer_file(contained(path, roots))
    try:
        weights = find_weights(path, roots)
    except EllaLoadError:
        return read_tokenizer_file(find_tokenizer(path, None, roots))  # a tokenizer-only folder, or a clear error
    return read_tokenizer_file(find_tokenizer(None, weights, roots))


def _is_tokenizer_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".model") or (name.endswith(".json") and name != "config.json" and not name.endswith(".index.json"))


def read_tokenizer_file(path: Path) -> T5PromptTokenizer:
    """Read tokenizer.json (any *.json) with `tokenizers` or a SentencePiece *.model with `sentencepiece`."""
    if path.name.lower().endswith(".model"):
        return _read_spiece(path)
    if path.name.lower().endswith(".json"):
        return _read_tokenizer_json(path)
    raise EllaLoadError(f"{path}: not a tokenizer file; expected tokenizer.json or spiece.model of a T5 model.")


def _read_capped(path: Path, what: str) -> bytes:
    """The bytes of a tokenizer file, refused unread when it is larger than any T5 tokenizer."""
    try:
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise EllaLoadError(f"{path}: {size / 2**20:.0f} MiB, too large for a T5 tokenizer (tokenizer.json is "
                                f"2.4 MB; files over {MAX_TOKENIZER_BYTES // 2**20} MiB are not read).")
        with open(path, "rb") as f:
            return f.read(MAX_TOKENIZER_BYTES + 1)[:MAX_TOKENIZER_BYTES]
    except OSError as e:
        raise EllaLoadError(f"{path}: cannot read {what} ({e.strerror or e}).") from None


def _read_tokenizer_json(path: Path) -> T5PromptTokenizer:
    from tokenizers import Tokenizer

    what = "the file as tokenizer.json of a T5 model"
    data = _read_capped(path, what)  # read here (not by the library) so the size and the open are ours
    with fenced(path, what):
        tok = Tokenizer.from_str(data.decode("utf-8"))
        tok.no_truncation()
        tok.no_padding()

    def encode_batch(texts: list[str]) -> list[Encoded]:
        return [(e.ids, list(e.offsets)) for e in tok.encode_batch(texts, add_special_tokens=False)]

    with fenced(path, what):
        special = tok.token_to_id("</s>"), tok.token_to_id("<pad>"), tok.get_vocab_size(with_added_tokens=True)
    return _checked(path, encode_batch, *special)


def _read_spiece(path: Path) -> T5PromptTokenizer:
    import sentencepiece

    what = "the file as spiece.model (SentencePiece) of a T5 model"
    data = _read_capped(path, what)
    with fenced(path, what):
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)

    def piece_id(piece: str) -> int | None:
        i = sp.piece_to_id(piece)
        return i if sp.id_to_piece(i) == piece else None

    def encode_batch(texts: list[str]) -> list[Encoded]:
        return [_spiece_encoded(sp, text) for text in texts]

    with fenced(path, what):
        special = piece_id("</s>"), piece_id("<pad>"), sp.get_piece_size()
    return _checked(path, encode_batch, *special)


def _spiece_encoded(sp: object, text: str) -> Encoded:
    """Ids and character spans of one text with SentencePiece (0.2.3+ gives character offsets; older
    versions give pieces whose spans count UTF-8 bytes)."""
    try:
        found = sp.encode(text, return_type="offset_mapping")
        return list(found["ids"]), [tuple(o) for o in found["offsets"]]
    except TypeError:
        proto = sp.encode(text, out_type="immutable_proto")
    char_at = [i for i, c in enumerate(text) for _ in c.encode("utf-8")] + [len(text)]
    last = len(char_at) - 1
    return [p.id for p in proto.pieces], [(char_at[min(p.begin, last)], char_at[min(p.end, last)]) for p in proto.pieces]


def _checked(path: Path, encode_batch: Callable[[list[str]], list[Encoded]], eos: int | None,
             pad: int | None, vocab_size: int) -> T5PromptTokenizer:
    if eos is None or pad is None:
        raise EllaLoadError(
            f"{path}: not a T5 tokenizer (it has no '</s>' and '<pad>' tokens); use tokenizer.json or "
            "spiece.model of google/flan-t5-xl."
        )
    return T5PromptTokenizer(path, encode_batch, eos, pad, vocab_size)
