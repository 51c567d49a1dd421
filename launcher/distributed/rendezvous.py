"""Rendezvous helpers shared by the backends (and the tests)."""

import socket


def free_port() -> int:
    """A TCP port on loopback that is free right now (for single-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
