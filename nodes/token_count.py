"""T5 token counts for the web counter: which tokenizer to use, and what the encode node will feed T5.

Only tokenizer files are read (tokenizer.json or spiece.model), never weights. The tokenizer is the one
of the T5 chosen in the graph when it has one, else the T5 tokenizer that ComfyUI ships.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

from ..ella import EllaLoadError
from ..ella.t5_files import find_tokenizer, find_weights, resolve_hf_cache
from ..ella.t5_tokenizer import T5_MAX_TOKENS, T5PromptTokenizer, read_tokenizer_file
from .folders import t5_choices, t5_root

log = logging.getLogger("ELLA")

# under the `comfy` package: ComfyUI ships the standard T5 vocabulary (not pile-t5 or umt5) here
HOST_TOKENIZERS = ("text_encoders/t5_tokenizer/tokenizer.json", "t5_tokenizer/tokenizer.json")
CACHE_SIZE = 4


class UnknownT5(Exception):
    """The name is not one the T5 loader lists (so it is never opened)."""


class NoTokenizer(Exception):
    """No T5 tokenizer can be found: neither beside the chosen T5 nor in the host."""


@dataclass(frozen=True)
class TokenCount:
    """What the encode node will feed T5 for one prompt."""

    tokens: int  # T5 tokens of the prompt, EOS included, before any cut
    limit: int  # tokens T5 reads at most: fixed_tokens in fixed mode, 512 in flexible mode
    cut: int  # tokens dropped from the end
    mode: str  # "fixed" or "flexible"


def count_tokens(tokenizer: T5PromptTokenizer, text: str, max_length: int | None) -> TokenCount:
    """Count like ELLA Text Encode tokenizes: markup removed, EOS appended, cut to max_length (or 512)."""
    tokens = tokenizer.count(text, weighted=True)
    limit = max_length or T5_MAX_TOKENS
    return TokenCount(tokens, limit, max(0, tokens - limit), "flexible" if max_length is None else "fixed")


def tokenizer_for(t5_name: str | None) -> tuple[T5PromptTokenizer, str]:
    """The tokenizer of the listed T5 `t5_name` if it has one, else the host's; with its source ("t5" or "host").

    Raises UnknownT5 for an unlisted name, EllaLoadError for an unreadable tokenizer, NoTokenizer if none exists."""
    if t5_name is not None:
        path = t5_choices().get(t5_name)
        if path is None:
            raise UnknownT5(t5_name)
        found = _t5_tokenizer_file(t5_name, path)
        if found is not None:
            return _cached(found), "t5"
        log.debug("ELLA: no tokenizer beside T5 %r; counting with the host's.", t5_name)
    host = host_tokenizer_file()
    if host is None:
        which = "no Load T5 Encoder (ELLA) is linked" if t5_name is None else \
            f"T5 {t5_name!r} has no tokenizer.json or spiece.model beside it"
        raise NoTokenizer(f"No T5 tokenizer available: {which}, and this ComfyUI ships no T5 tokenizer.")
    return _cached(host), "host"


def host_tokenizer_file() -> Path | None:
    """The standard T5 tokenizer.json that ComfyUI ships inside its `comfy` package, if any."""
    spec = importlib.util.find_spec("comfy")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for relative in HOST_TOKENIZERS:
            path = Path(root) / relative
            if path.is_file():
                return path
    return None


def _t5_tokenizer_file(name: str, path: Path) -> Path | None:
    """The tokenizer file of a listed T5, if one is found inside the model folder it is listed from
    (the same containment rule as the loader's)."""
    roots = [t5_root(name, path)]
    try:
        try:
            found = find_tokenizer(None, find_weights(path, roots), roots)
        except EllaLoadError:
            if not path.is_dir():
                return None
            found = find_tokenizer(resolve_hf_cache(path, roots), None, roots)  # a folder without usable weights
    except EllaLoadError as e:
        log.debug("ELLA: no tokenizer for T5 %r: %s", name, e)
        return None
    return found


_cache: OrderedDict[tuple[str, int, int], T5PromptTokenizer | EllaLoadError] = OrderedDict()
_lock = Lock()
_loading: dict[tuple[str, int, int], Lock] = {}  # one parse per file at a time; others wait for its result


def _cached(path: Path) -> T5PromptTokenizer:
    """Load a tokenizer file once per (path, mtime, size), failures included (an invalid file is not parsed
    again until it changes); keep the few most recent."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _lock:
        loading = _loading.setdefault(key, Lock())
    with loading:
        with _lock:
            found = _cache.get(key)
            if found is not None:
                _cache.move_to_end(key)
        if found is None:
            try:
                found = read_tokenizer_file(path)
            except EllaLoadError as e:
                found = e
            with _lock:
                _cache[key] = found
                while len(_cache) > CACHE_SIZE:
                    _cache.popitem(last=False)
        with _lock:
            _loading.pop(key, None)
    if isinstance(found, EllaLoadError):
        raise EllaLoadError(str(found))
    return found
