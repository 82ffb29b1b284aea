"""What the pack's HTTP routes share: their own bounded worker pools, capped bodies, JSON replies and errors.

Every route's work runs in a pool of the pack's own (never the event loop's default executor, which ComfyUI's
web server needs to serve files), and each pool admits a fixed number of requests, running or waiting, before
their bodies are read: beyond it a request gets a 503 at once. Clients that hang up are not errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from aiohttp import web

log = logging.getLogger("ELLA")
T = TypeVar("T")


class BadRequest(Exception):
    """A client error: HTTP status, the field at fault and a message saying what was expected."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class ClientGone(Exception):
    """The client hung up before its request was read: nobody is left to answer."""


class BoundedPool:
    """Worker threads of the pack's own for one route, admitting at most `workers + waiting` requests at once.

    `admit()` and the counter run on the event loop's thread only, so no lock is needed."""

    def __init__(self, name: str, workers: int, waiting: int, what: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"ella-{name}")
        self.limit, self.what, self.admitted = workers + waiting, what, 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        """One admitted request for the `with` block; BadRequest 503 when the pool is full."""
        if self.admitted >= self.limit:
            raise BadRequest(503, None, f"busy: {self.admitted} {self.what} are under way or waiting, the most this "
                                        "server takes at once; try again in a moment.")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)


def add_post_route(path: str, handler: Callable[[web.Request], Awaitable[web.Response]]) -> bool:
    """Add a POST route to ComfyUI's running server; False outside a server (nothing to do)."""
    server = sys.modules.get("server")  # ComfyUI's main.py imports it before loading custom nodes
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.post(path)(handler)
    return True


BODY_SECONDS = 30  # a client that has not sent its whole body by then frees its place (408)


async def read_capped(request: web.Request, limit: int, advice: str) -> bytes:
    """The request body, refusing bodies over `limit` bytes without reading them whole and bodies still incomplete
    after BODY_SECONDS; ClientGone if the client hangs up first."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, None, f"request body: {request.content_length} bytes, more than {limit}; {advice}")
    try:
        return await asyncio.wait_for(_read_body(request, limit, advice), BODY_SECONDS)
    except asyncio.TimeoutError:
        raise BadRequest(408, None, f"request body: not received within {BODY_SECONDS} s.") from None
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        raise ClientGone(type(e).__name__) from None
    except Exception as e:  # aiohttp's payload errors when the client stops mid-body
        if type(e).__module__.startswith("aiohttp") and not isinstance(e, web.HTTPException):
            raise ClientGone(type(e).__name__) from None
        raise


async def _read_body(request: web.Request, limit: int, advice: str) -> bytes:
    body = bytearray()
    while chunk := await request.content.read(65_536):
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, None, f"request body: more than {limit} bytes; {advice}")
    return bytes(body)


def json_bytes(reply: Any) -> bytes:
    """A reply serialised (called in a worker thread, so large replies never hold the event loop)."""
    return json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_reply(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


async def answer(request: web.Request, what: str, handle: Callable[[web.Request], Awaitable[web.Response]],
                 error_body: Callable[[BadRequest], dict]) -> web.Response:
    """`handle(request)`, with every failure turned into a JSON reply: a BadRequest into its status and
    `error_body`, a hang-up into a quiet debug line, a bug of ours into a logged 500."""
    try:
        return await handle(request)
    except BadRequest as e:
        return web.json_response(error_body(e), status=e.status)
    except ClientGone as e:
        log.debug("ELLA: a client hung up during %s (%s)", what, e)
        return web.Response(status=400)  # nobody reads it
    except Exception:  # a bug of ours: a 500 with a message, never a dropped connection
        log.exception("ELLA: %s failed", what)
        return web.json_response({**error_body(BadRequest(500, None, "")),
                                  "error": f"internal error during {what}; see the server log"}, status=500)
