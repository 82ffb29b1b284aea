"""The pack's routes under floods, on a real ComfyUI server: each route admits a bounded number of requests (a 503
with a JSON error beyond it, at once), its work runs in the pack's own threads so `GET /` and `/object_info` stay
fast, clients that hang up are not logged as errors, malformed and looping workflows get a 4xx naming the field."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import official_graphs as og
import pytest
import workflow_shapes as shapes
from test_hostile_server import post_raw
from test_server import HOST, T5_NAME, server  # noqa: F401  (the module's real server)

pytestmark = pytest.mark.skipif(HOST is None, reason="no ComfyUI host: see README, Tests")
TOKENS, CONVERT = "/ella/tokens", "/ella/convert_official"
PROMPT_TIMEOUT = 20  # seconds a client waits for an answer that should come at once: a guard, not a target


def post(srv, path: str, data: bytes, timeout: float = PROMPT_TIMEOUT) -> tuple[int, dict]:
    return post_raw(srv, path, data, timeout)


def stalled(srv, path: str, declared: int = 10_000) -> socket.socket:
    """A client that sends its headers and the start of a body, then waits (holding its place, if admitted)."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=PROMPT_TIMEOUT)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n{{\"text\": \"".encode())
    return sock


def answered(sock: socket.socket, wait: float) -> bytes:
    """What the server sent back within `wait` seconds (b"" if nothing)."""
    sock.settimeout(wait)
    try:
        return sock.recv(65_536)
    except TimeoutError:
        return b""


def fill(srv, path: str, count: int) -> tuple[list[socket.socket], list[bytes]]:
    """`count` stalled clients; those the route turned away at once are answered (and closed here)."""
    socks = [stalled(srv, path) for _ in range(count)]
    time.sleep(1)
    replies = [answered(s, 0.5) for s in socks]
    held = [s for s, r in zip(socks, replies, strict=True) if not r]
    for s, r in zip(socks, replies, strict=True):
        if r:
            s.close()
    return held, [r for r in replies if r]


def stays_fast(srv) -> None:
    """The page and /object_info answer while the routes are full (each within PROMPT_TIMEOUT)."""
    with urllib.request.urlopen(srv.url + "/", timeout=PROMPT_TIMEOUT) as r:
        assert r.status == 200 and b"<html" in r.read().lower()
    with urllib.request.urlopen(srv.url + "/object_info", timeout=PROMPT_TIMEOUT) as r:
        assert "EllaNodes_TextEncode" in json.loads(r.read())


def hang_up(socks: list[socket.socket]) -> None:
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset, mid-body
        s.close()


def ella_errors(srv, since: int) -> list[str]:
    return [line for line in srv.log_text()[since:].splitlines()
            if "ELLA" in line and ("ERROR" in line or "failed" in line) or "Traceback" in line]


@pytest.mark.parametrize(("path", "normal"), [
    (TOKENS, {"text": "a cat", "t5_name": T5_NAME}),
    (CONVERT, None)])
def test_a_full_route_refuses_at_once_serves_the_page_and_recovers(server, path, normal):  # noqa: F811
    normal = normal or og.text_to_image()
    since = len(server.log_text())
    held, refused = fill(server, path, 40)
    assert held and refused, "some clients are admitted and held, the rest turned away"
    assert all(r.startswith(b"HTTP/1.1 503") and b'"error": "busy: ' in r for r in refused), refused[:1]
    status, reply = post(server, path, json.dumps(normal).encode())
    assert status == 503 and reply["error"].startswith("busy: ")
    stays_fast(server)
    hang_up(held)  # they leave mid-body: their places free up, and nothing is logged as an error
    for _ in range(50):
        status, reply = post(server, path, json.dumps(normal).encode())
        if status != 503:
            break
        time.sleep(0.2)
    assert status == 200, reply
    assert ella_errors(server, since) == []


def test_a_flood_of_the_largest_counts_is_capped_and_a_normal_count_is_answered(server):  # noqa: F811
    body = json.dumps({"text": "a red cube, " * 5400, "t5_name": T5_NAME}).encode()
    replies: list[tuple[int, dict]] = []
    threads = [threading.Thread(target=lambda: replies.append(post(server, TOKENS, body, 300))) for _ in range(120)]
    for t in threads:
        t.start()
    stays_fast(server)
    for t in threads:
        t.join()
    statuses = {status for status, _ in replies}
    assert len(replies) == 120 and statuses <= {200, 503} and 503 in statuses
    assert all(reply["tokens"] > 5000 for status, reply in replies if status == 200)
    status, reply = post(server, TOKENS, json.dumps({"text": "a cat", "t5_name": T5_NAME}).encode())
    assert status == 200 and reply["tokens"] > 1


def test_looping_workflows_are_refused_and_the_page_stays_up(server):  # noqa: F811
    body = json.dumps(shapes.self_fed_combine()).encode()
    replies: list[tuple[int, dict]] = []
    threads = [threading.Thread(target=lambda: replies.append(post(server, CONVERT, body))) for _ in range(6)]
    for t in threads:
        t.start()
    stays_fast(server)
    for t in threads:
        t.join()
    assert {status for status, _ in replies} <= {400, 503} and 400 in {status for status, _ in replies}
    assert all("loop" in reply["error"] or "busy" in reply["error"] for _, reply in replies)
    status, reply = post(server, CONVERT, json.dumps(shapes.doubling_combines(40)).encode(), 300)
    assert status == 200 and len(reply["kept"]) == 40


@pytest.mark.parametrize("name", list(shapes.ONE_WRONG_FIELD))
def test_one_wrong_field_is_a_400_naming_it(server, name):  # noqa: F811
    status, reply = post(server, CONVERT, json.dumps(shapes.one_wrong_field(name)).encode())
    assert status == 400 and reply["error"].startswith("request body: ")
    assert shapes.ONE_WRONG_FIELD[name][1] in reply["error"]


def test_deep_nesting_is_a_400(server):  # noqa: F811
    for text in (json.dumps(shapes.nested(300)), "[" * 100_000 + "]" * 100_000):
        status, reply = post(server, CONVERT, text.encode())
        assert status == 400 and ("nested more than" in reply["error"] or "not valid JSON" in reply["error"])


@pytest.mark.parametrize("path", [TOKENS, CONVERT])
def test_clients_that_hang_up_mid_body_are_not_errors(server, path):  # noqa: F811
    since = len(server.log_text())
    for _ in range(10):
        sock = stalled(server, path)
        time.sleep(0.1)
        hang_up([sock])
    time.sleep(1)
    assert ella_errors(server, since) == []
    assert post(server, TOKENS, json.dumps({"text": "a cat"}).encode())[0] == 200
