"""HTTP route for the page: POST /ella/convert_official converts a workflow made with the official ComfyUI-ELLA
pack, with the same converter (and mapping table) as scripts/convert_official_workflow.py.

Body: the UI-format workflow (a JSON object). Reply: {"workflow", "converted", "kept"}, or a 4xx
{"error": message} saying what was expected (503 while the route's own pool is full). Parsing, checking,
converting and writing the reply all happen in that pool, off the event loop.
"""

from __future__ import annotations

from aiohttp import web

from ..ella.official_workflow import MAX_WORKFLOW_CHARS, ConversionError, convert, parse_workflow
from .http import BadRequest, BoundedPool, add_post_route, answer, json_bytes, json_reply, read_capped

ROUTE = "/ella/convert_official"
MAX_BODY_BYTES = 4 * MAX_WORKFLOW_CHARS  # a workflow of MAX_WORKFLOW_CHARS characters, UTF-8 encoded
POOL = BoundedPool("convert", workers=1, waiting=2, what="workflow conversions")
_registered = False


def register_convert_route() -> None:
    """Add the conversion route to ComfyUI's running server (once)."""
    global _registered
    _registered = _registered or add_post_route(ROUTE, convert_route)


async def convert_route(request: web.Request) -> web.Response:
    return await answer(request, "workflow conversion", _convert_request, lambda e: {"error": e.message})


async def _convert_request(request: web.Request) -> web.Response:
    with POOL.admit():
        raw = await read_capped(request, MAX_BODY_BYTES, "a workflow that large is not converted.")
        return json_reply(await POOL.run(_convert, raw))


def _convert(raw: bytes) -> bytes:
    """The reply's bytes for a request body (runs in the pool)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, None, "request body: not UTF-8 text; expected the workflow as JSON.") from None
    try:
        result = convert(parse_workflow(text, "request body"), name="request body")
    except ConversionError as e:
        raise BadRequest(400, None, str(e)) from None
    return json_bytes({"workflow": result.workflow, "converted": result.converted, "kept": result.kept})
