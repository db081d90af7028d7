"""The SMTP session against the in-process gateway: random command sequences and random bytes,
before STARTTLS (plain) and after it (the implicit-TLS listener). Property: whatever one peer
sends, the server keeps running and keeps answering: after every example, a fresh connection
gets its 220 greeting and answers EHLO and NOOP with 250.

The gateway and its sinks run on an event loop in a background thread (module-scoped), and the
fuzzer speaks with blocking sockets, so one example cannot stall the server's loop by itself.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.e2e.conftest import Running, start
from tests.fuzz.conftest import fuzz
from tests.support.world import World, build_world

pytestmark = pytest.mark.e2e


class Background:
    """The gateway of `world` running on its own event loop thread."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.context = start(world)
        self.running: Running | None = None

    def __enter__(self) -> Background:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self.context.__aenter__(), self.loop)
        self.running = future.result(60)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.context.__aexit__(None, None, None),
                                         self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    world = build_world(Path(tmp_path_factory.mktemp("smtp-fuzz")), retry="[1s]")
    with Background(world) as background:
        yield background


ADDRESSES = st.sampled_from([
    "<a@clinique-test.fr>", "<b@chu-test.fr>", "<>", "<@evil.test:x@chu-test.fr>",
    "<b%chu-test.fr@clinique-test.fr>", "<\"b@x\"@chu-test.fr>", "<b@[127.0.0.1]>",
    "b@chu-test.fr", "<" + "a" * 300 + "@chu-test.fr>", "<b@labo-test.fr>", "<é@chu-test.fr>",
])
PARAMETERS = st.sampled_from([
    "", " SIZE=100", " SIZE=999999999999", " BODY=8BITMIME", " SMTPUTF8", " RET=HDRS",
    " ENVID=x+2B", " NOTIFY=SUCCESS,FAILURE", " ORCPT=rfc822;b@chu-test.fr", " NOTIFY=NEVER,X",
    " =", " SIZE=-1", " " + "X" * 600,
])
LINES = st.one_of(
    st.builds(lambda verb, host: f"{verb} {host}".encode(),
              st.sampled_from(["EHLO", "HELO", "ehlo", "LHLO"]),
              st.sampled_from(["client.test", "", "[127.0.0.1]", "x" * 600])),
    st.builds(lambda a, p: f"MAIL FROM:{a}{p}".encode(), ADDRESSES, PARAMETERS),
    st.builds(lambda a, p: f"RCPT TO:{a}{p}".encode(), ADDRESSES, PARAMETERS),
    st.sampled_from([b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY b", b"EXPN x", b"HELP",
                     b"STARTTLS", b"AUTH PLAIN AGFhAGI=", b"BDAT 10 LAST", b"TURN", b"",
                     b".", b"..", b"MAIL", b"RCPT", b"MAIL FROM:", b"RCPT TO:"]),
    st.binary(max_size=80),
)
BODIES = st.lists(st.one_of(
    st.sampled_from([b"Subject: x", b"", b".", b"..", b".\n", b"\n.\n", b"\r.\r", b"a\rb",
                     b"x" * 1200, b"\x00\xff"]),
    st.binary(max_size=100),
), max_size=8)


def recv_some(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (TimeoutError, OSError):
        return b""


def open_session(world: World, tls: bool) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", world.implicit_port if tls else world.port),
                                   timeout=5)
    if not tls:
        return raw
    context = ssl.create_default_context(cafile=str(world.anchor))
    context.check_hostname = False
    return context.wrap_socket(raw)


def probe(world: World) -> None:
    """A fresh session gets a greeting and answers EHLO and NOOP."""
    with socket.create_connection(("127.0.0.1", world.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO probe.test\r\n")
        while True:
            line = reader.readline()
            assert line.startswith(b"250"), line
            if line.startswith(b"250 "):
                break
        sock.sendall(b"NOOP\r\n")
        assert reader.readline().startswith(b"250")
        sock.sendall(b"QUIT\r\n")


@fuzz(25)
@given(tls=st.booleans(), lines=st.lists(LINES, max_size=12), body=BODIES,
       finish=st.booleans(), end=st.sampled_from([b"\r\n", b"\n", b"\r", b""]))
def test_random_sessions_never_stop_the_server(
    gateway: Background, tls: bool, lines: list[bytes], body: list[bytes], finish: bool,
    end: bytes,
) -> None:
    world = gateway.world
    try:
        with open_session(world, tls) as sock:
            sock.settimeout(0.2)
            recv_some(sock)  # greeting
            for line in lines:
                sock.sendall(line + end)
                reply = recv_some(sock)
                if line == b"DATA" and reply.startswith(b"354"):
                    for chunk in body:
                        sock.sendall(chunk + b"\r\n")
                    if finish:
                        sock.sendall(b".\r\n")
                        recv_some(sock)
                if not reply and line.upper() == b"QUIT":
                    break
    except (OSError, ssl.SSLError):
        pass  # the server may hang up on a hostile peer; that is its right
    assert gateway.thread.is_alive()
    probe(world)
