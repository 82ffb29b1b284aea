"""HTTP route on ComfyUI's server for the web token counter: POST /ella/tokens.

Body: {"text": str, "t5_name": str | null, "max_length": int 1..512 | null}. Every value is checked;
bad input gets a 4xx reply {"error": message, "field": name}. Tokenizer files are parsed and prompts
counted in a small pool of worker threads of our own that admits a bounded number of requests (a 503 beyond
it), so a flood of requests (or a slow, hostile tokenizer file) never holds the event loop or the threads
other routes use.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..ella import EllaError, EllaLoadError
from ..ella.t5_tokenizer import T5_MAX_TOKENS, check_encodable
from .http import BadRequest, BoundedPool, add_post_route, answer, json_bytes, json_reply, read_capped
from .token_count import NoTokenizer, UnknownT5, count_tokens, tokenizer_for

ROUTE = "/ella/tokens"
MAX_TEXT_CHARS = 65_536
MAX_BODY_BYTES = 4 * MAX_TEXT_CHARS + 4096  # room for JSON escapes of the longest text
MAX_NAME_CHARS = 1024
FIELDS = ("text", "t5_name", "max_length")
POOL = BoundedPool("tokens", workers=2, waiting=14, what="token counts")
_registered = False


def register_routes() -> None:
    """Add the token count route to ComfyUI's running server (once)."""
    global _registered
    _registered = _registered or add_post_route(ROUTE, count_route)


async def count_route(request: web.Request) -> web.Response:
    """Count the T5 tokens of a prompt as ELLA Text Encode will feed them to T5."""
    return await answer(request, "token count", _count_request, lambda e: {"error": e.message, "field": e.field})


async def _count_request(request: web.Request) -> web.Response:
    with POOL.admit():
        raw = await read_capped(request, MAX_BODY_BYTES, f"send at most {MAX_TEXT_CHARS} characters of text.")
        return json_reply(await POOL.run(lambda: json_bytes(count(*parse_body(raw)))))


def count(text: str, t5_name: str | None, max_length: int | None) -> dict[str, Any]:
    """The reply for checked input (runs in a worker thread)."""
    mode = "flexible" if max_length is None else "fixed"
    try:
        tokenizer, source = tokenizer_for(t5_name)
    except UnknownT5:
        raise BadRequest(404, "t5_name", f"t5_name: {_short(t5_name)} is not a T5 encoder listed in the model "
                                         "folders; expected one of the names Load T5 Encoder (ELLA) offers.") from None
    except NoTokenizer as e:
        return {"tokens": None, "limit": max_length or T5_MAX_TOKENS, "cut": 0, "mode": mode, "tokenizer": None,
                "message": str(e)}
    except EllaLoadError as e:
        raise BadRequest(422, "t5_name", f"t5_name: the tokenizer of {_short(t5_name)} cannot be read: {e}") from None
    try:
        counted = count_tokens(tokenizer, text, max_length)
    except EllaLoadError as e:  # the tokenizer file failed while tokenizing
        raise BadRequest(422, "t5_name", f"t5_name: the tokenizer of {_short(t5_name)} failed: {e}") from None
    except EllaError as e:
        raise BadRequest(400, "text", f"text: {e}") from None
    return {"tokens": counted.tokens, "limit": counted.limit, "cut": counted.cut, "mode": counted.mode,
            "tokenizer": source}


def parse_body(raw: bytes) -> tuple[str, str | None, int | None]:
    """(text, t5_name, max_length) from a JSON body, each checked."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest(400, None, 'request body: not valid JSON; expected an object like {"text": "a cat"}.') from None
    if not isinstance(body, dict):
        raise BadRequest(400, None, f'request body: expected a JSON object like {{"text": "a cat"}}, '
                                    f"got {type(body).__name__}.")
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise BadRequest(400, unknown[0], f"unexpected field(s) {', '.join(map(_short, unknown))}; "
                                          f"expected {', '.join(FIELDS)}.")
    text = body.get("text")
    if not isinstance(text, str):
        raise BadRequest(400, "text", f"text: expected a string, got {_type(text)}.")
    if len(text) > MAX_TEXT_CHARS:
        raise BadRequest(413, "text", f"text: {len(text)} characters, more than {MAX_TEXT_CHARS}.")
    try:
        check_encodable(text, "text")
    except EllaError as e:
        raise BadRequest(400, "text", str(e)) from None
    t5_name = body.get("t5_name")
    if t5_name is not None and (not isinstance(t5_name, str) or not t5_name or len(t5_name) > MAX_NAME_CHARS
                                or not t5_name.isprintable()):
        raise BadRequest(400, "t5_name", f"t5_name: expected null or the name of a listed T5 encoder "
                                         f"(1 to {MAX_NAME_CHARS} characters), got {_type(t5_name)}.")
    max_length = body.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or not 1 <= max_length <= T5_MAX_TOKENS):
        raise BadRequest(400, "max_length", f"max_length: expected null (flexible) or a whole number from 1 to "
                                            f"{T5_MAX_TOKENS} (fixed), got {_short(max_length)}.")
    return text, t5_name, max_length


def _type(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {_short(value)}"


def _short(value: object, limit: int = 80) -> str:
    """repr of a client value, cut so replies and logs stay small."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
