"""Loopback helpers for the tests that start a server: a free port, and waiting until it listens."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_listening(
    port: int,
    timeout_s: float = 30.0,
    *,
    poll_s: float = 0.2,
    alive: Callable[[], None] | None = None,
    why: Callable[[], str] = lambda: "",
) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port`` (a bare TCP connect: an HTTP GET
    would open a Bokeh session).

    ``alive`` is called before each try (it asserts that the server process still runs); after
    ``timeout_s`` seconds an AssertionError says so, with ``why()`` (e.g. the server's log).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None:
            alive()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listened on port {port} in {timeout_s:g} s {why()}"
            time.sleep(poll_s)
