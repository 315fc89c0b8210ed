"""Slowloris against the real server (`run_server`, in a subprocess so its open-file limit is its own):
half-sent requests are closed at the header deadline, connections beyond the limit push out the idle ones
rather than /health, a slow /v1 body gets 408, and running out of file descriptors neither hides /health nor
floods the log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from nvfp4.serve.app import build_app
from support.serve import FakeEngine, LiveServer, free_port, wait_ready

TESTS = Path(__file__).resolve().parents[1]  # `-c` puts the working directory on sys.path: support/ imports
SERVER = """
import json, resource, sys
port, soft, hard, connections = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
if soft:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard or resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from nvfp4.serve.app import build_app
from nvfp4.serve.cli import run_server
from support.serve import FakeEngine
kwargs = {}
if connections:
    from nvfp4.serve.config import ConnectionLimits
    kwargs["connections"] = ConnectionLimits(**connections)
run_server(build_app({"student": FakeEngine()}), "127.0.0.1", port, 1.0, "warning", **kwargs)
"""
HALF_SENT = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # the head never ends


class Server:
    """`run_server` on FakeEngine in a subprocess: soft_nofile (and hard_nofile) lower its open-file limits."""

    def __init__(self, soft_nofile: int = 0, hard_nofile: int = 0, **connections):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-c",
            SERVER,
            str(self.port),
            str(soft_nofile),
            str(hard_nofile),
            json.dumps(connections),
        ]

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.args, cwd=TESTS, stderr=subprocess.PIPE, text=True)
        wait_ready(self.url, self.process, deadline_s=60)
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.stderr = self.process.communicate(timeout=30)[1]


def half_sent(port: int, count: int, at_once: int = 1) -> list[socket.socket]:
    """count connections, each with a head that never ends, in the order given unless at_once opens several
    together (a connect the listen queue drops waits a second for its retry: one after another, a small
    backlog would take long)."""

    def one(_) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(HALF_SENT)
        return sock

    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(one, range(count)))


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closes `sock` within wait_s (it sends nothing before closing)."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def health_within(url: str, deadline_s: float) -> int | str:
    try:
        return httpx.get(f"{url}/health", timeout=deadline_s).status_code
    except httpx.TransportError as error:
        return type(error).__name__


def test_a_half_sent_head_is_closed_at_the_header_deadline():
    with Server(max_connections=64, header_timeout=0.5) as server:
        sockets = half_sent(server.port, 3)
        started = time.monotonic()
        closed = [closed_by_server(s, 3.0) for s in sockets]
        waited = time.monotonic() - started
        health = health_within(server.url, 2.0)
    assert closed == [True] * 3 and waited < 2.0, (closed, waited)
    assert health == 200


def test_connections_beyond_the_limit_push_out_the_idle_ones_and_health_answers():
    """20 half-sent heads against a limit of 8 (and a header deadline far away): the oldest idle ones are
    closed as new ones come, so /health gets its connection and its 200 at once."""
    with Server(max_connections=8, header_timeout=60) as server:
        sockets = half_sent(server.port, 20)
        started = time.monotonic()
        health = health_within(server.url, 2.0)
        elapsed = time.monotonic() - started
        closed = sum(closed_by_server(s, 0.5) for s in sockets[:12])
        still_open = sum(not closed_by_server(s, 0.05) for s in sockets[-4:])
    assert health == 200 and elapsed < 2.0, (health, elapsed)
    assert closed == 12 and still_open == 4, (closed, still_open)


def test_running_out_of_file_descriptors_neither_hides_health_nor_floods_the_log():
    """Under a 128 open-file soft limit, 200 half-sent heads used to leave /health unanswered while asyncio
    logged `socket.accept() out of system resource` at every accept: the server now raises its soft limit
    to the hard one at start."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit here is {hard}")
    with Server(soft_nofile=128) as server:
        sockets = half_sent(server.port, 200, at_once=32)
        health = health_within(server.url, 3.0)
        for sock in sockets:
            sock.close()
    assert health == 200
    assert server.stderr.count("out of system resource") < 3, server.stderr[-2000:]


def test_a_slow_v1_body_gets_408_at_the_body_deadline():
    engine = FakeEngine()
    with LiveServer(build_app({"student": engine}, body_timeout=0.5)) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"model": '
            )
            started = time.monotonic()
            response = b""
            try:
                while data := sock.recv(4096):  # to the close that ends the answer
                    response += data
            except TimeoutError:
                response += b" (no close in 5 s)"
            waited = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert waited < 2.0 and b"--body-timeout" in response and not engine.submitted


def test_accept_errors_are_logged_once_per_interval_with_their_count(caplog):
    """asyncio reports each refused accept; the server's loop handler keeps one line per interval."""
    from nvfp4.serve.cli import AcceptErrorLog

    now = [0.0]
    handler = AcceptErrorLog(interval_s=10.0, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING):
            for step in range(3000):
                now[0] = step * 0.01  # 30 s of refused accepts
                handler(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "EMFILE")})
            handler(loop, {"message": "something else went wrong"})
    finally:
        loop.close()
    accept_lines = [r.getMessage() for r in caplog.records if "open-file limit" in r.getMessage()]
    assert len(accept_lines) == 3, accept_lines
    counts = [int(re.search(r"refused (\d+) connection", line).group(1)) for line in accept_lines]
    assert counts[0] == 1 and all(990 <= c <= 1010 for c in counts[1:]), accept_lines
    assert any("something else went wrong" in r.getMessage() for r in caplog.records)


def test_the_connection_limit_fits_under_the_open_file_limit(caplog):
    from nvfp4.serve.cli import RESERVED_FILES, fit_open_files
    from nvfp4.serve.config import ConnectionLimits

    wanted = ConnectionLimits(max_connections=1024)
    assert fit_open_files(wanted, None) == wanted and fit_open_files(wanted, 2**20) == wanted
    with caplog.at_level(logging.WARNING):
        fitted = fit_open_files(wanted, 1024)
    assert fitted.max_connections + 4 * fitted.backlog + RESERVED_FILES <= 1024 and fitted.backlog >= 16
    assert "ulimit -n" in caplog.text


def test_a_hard_open_file_limit_holds_under_a_flood_of_half_sent_heads():
    """Soft and hard limits of 256 (the server cannot raise them): 400 half-sent heads come in as fast as
    they can; the server never reaches the limit (asyncio would refuse accepts), and /health answers."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1024:
        pytest.skip("this test's client holds 400 sockets")
    with Server(soft_nofile=256, hard_nofile=256, header_timeout=60) as server:
        with ThreadPoolExecutor(1) as poller:
            polls = poller.submit(lambda: [health_within(server.url, 3.0) for _ in range(20)])  # amid the flood
            sockets = half_sent(server.port, 400, at_once=32)
            amid = polls.result()
        health = health_within(server.url, 3.0)
        for sock in sockets:
            sock.close()
    assert health == 200 and set(amid) == {200}, amid
    assert "open-file limit is 256" in server.stderr  # the fitting said so
    assert "refused" not in server.stderr and "out of system resource" not in server.stderr, server.stderr[-2000:]


@pytest.mark.parametrize("field, value", [("max_connections", 2), ("header_timeout", 0), ("body_timeout", -1)])
def test_connection_settings_are_checked_by_field(tmp_path, field, value):
    from nvfp4.errors import UserError
    from nvfp4.serve.cli import SERVE_FLAGS
    from nvfp4.serve.config import ServeConfig

    with pytest.raises(UserError) as raised:
        ServeConfig(tmp_path, **{field: value})
    assert raised.value.field == field and SERVE_FLAGS[field].startswith("--")
