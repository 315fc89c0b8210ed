"""The body limit holds however the body is framed: over a real socket (uvicorn parses the framing) and at the
ASGI layer (a server that hands over more bytes than Content-Length announced)."""

from __future__ import annotations

import asyncio
import socket

import httpx

from nvfp4.serve.app import build_app
from nvfp4.serve.limits import Limits
from support.serve import FakeEngine, LiveServer

LIMIT = 2048
PADDED = b'{"model": "student", "prompt": "hi", "max_tokens": 2' + b" " * 64 * 1024 + b"}"  # 64 KiB, valid JSON


def raw_exchange(port: int, head: bytes, chunks: list[bytes], timeout_s: float = 5.0) -> bytes:
    """Send a request head and its body pieces on one socket; -> the response (until the server closes or
    the timeout), whatever arrives first."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed while the body was still going
            pass
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
                if b"\r\n\r\n" in received and (b'"error"' in received or b'"choices"' in received):
                    break
        except OSError:
            pass
        return received


def chunked(body: bytes, size: int = 1024) -> list[bytes]:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def test_content_length_beside_chunked_framing_is_a_400_not_a_way_past_the_limit():
    """Content-Length: 10 with Transfer-Encoding: chunked let a 300 MiB body through (uvicorn follows the
    chunked framing, the limit read the 10)."""
    engine = FakeEngine()
    with LiveServer(build_app({"student": engine}, limits=Limits(max_body_bytes=LIMIT))) as live:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n" % live.port
        )
        response = raw_exchange(live.port, head, chunked(PADDED))
    status = response.split(b" ", 2)[1] if response else b"none"
    assert status == b"400", response[:300]
    assert not engine.submitted  # (httptools refuses the pair itself; with h11 the app says why)
    assert b"Transfer-Encoding" in response or b"Invalid HTTP request" in response


def test_bytes_are_counted_as_they_arrive_whatever_content_length_said():
    """A server (or proxy) that hands over more body than Content-Length announced still meets the limit:
    413 once the limit is passed; past it, at most four limits' bytes are drained unkept before the close."""
    engine = FakeEngine()
    app = build_app({"student": engine}, limits=Limits(max_body_bytes=LIMIT))
    pieces = [PADDED[i : i + 1024] for i in range(0, len(PADDED), 1024)]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"10")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    handed, sent = [], []

    async def receive():
        if len(handed) < len(pieces):
            handed.append(pieces[len(handed)])
            return {"type": "http.request", "body": handed[-1], "more_body": len(handed) < len(pieces)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413, sent[:1]
    assert len(handed) <= 5 * (LIMIT // 1024 + 1) < len(pieces) and not engine.submitted


def test_a_client_that_sends_an_oversized_body_first_reads_its_413_not_a_reset():
    """HTTP clients send the whole body before they read the answer: the server drains it (bounded) so that the
    client sees the 413 (a reset would be retried by the OpenAI SDK)."""
    limit = 4 * 2**20  # the default: bodies past it outgrow the loopback socket buffers
    with LiveServer(build_app({"student": FakeEngine()}, limits=Limits(max_body_bytes=limit))) as live:
        for size in (limit + 2**20, 3 * limit):
            response = httpx.post(
                f"{live.url}/v1/completions",
                content=b"x" * size,
                timeout=10,
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large", size
