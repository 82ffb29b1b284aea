"""HTTP route for the page: POST /ella/convert_official converts a workflow made with the official ComfyUI-ELLA
pack, with the same converter (and mapping table) as scripts/convert_official_workflow.py.

Body: the UI-format workflow (a JSON object). Reply: {"workflow", "converted", "kept"}, or a 4xx
{"error": message} saying what was expected.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..ella.official_workflow import MAX_WORKFLOW_CHARS, ConversionError, convert, parse_workflow
from .routes import BadRequest, add_post_route, read_capped

log = logging.getLogger("ELLA")

ROUTE = "/ella/convert_official"
MAX_BODY_BYTES = 4 * MAX_WORKFLOW_CHARS  # a workflow of MAX_WORKFLOW_CHARS characters, UTF-8 encoded
_registered = False


def register_convert_route() -> None:
    """Add the conversion route to ComfyUI's running server (once)."""
    global _registered
    _registered = _registered or add_post_route(ROUTE, convert_route)


async def convert_route(request: web.Request) -> web.Response:
    try:
        raw = await read_capped(request, MAX_BODY_BYTES, "a workflow that large is not converted.")
        result = await asyncio.to_thread(_convert, raw)
        return web.json_response({"workflow": result.workflow, "converted": result.converted, "kept": result.kept})
    except BadRequest as e:
        return web.json_response({"error": e.message}, status=e.status)
    except ConversionError as e:
        return web.json_response({"error": str(e)}, status=400)
    except Exception:  # a bug of ours: a 500 with a message, never a dropped connection
        log.exception("ELLA: workflow conversion failed")
        return web.json_response({"error": "internal error while converting; see the server log"}, status=500)


def _convert(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConversionError("request body: not UTF-8 text; expected the workflow as JSON.") from None
    return convert(parse_workflow(text, "request body"))
