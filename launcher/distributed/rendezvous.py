"""Rendezvous helpers shared by the backends (and the tests)."""

import socket


def free_port() -> int:
    """A TCP port on loopback that is free right now (for single-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Linux hands out ephemeral ports (outgoing connections, port-0 binds) from this range; a fixed
# rendezvous port inside it can be taken by any connection on a shared node.
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST_PORT = 15000  # above the usual well-known and registered service ports that clusters run


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, open(EPHEMERAL_RANGE_FILE).read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # all addresses: the other nodes connect to the head's network address
        except OSError:
            return False
    return True


def pick_rendezvous_port(seed: int, tries: int = 64) -> int:
    """A port free on this host now and outside the ephemeral range, for the rendezvous of a job whose
    head node runs this: the first of `tries` candidates (spread by `seed`, e.g. the job id, so that
    jobs sharing a node start from different ports) that can be bound. Chosen at run time, not
    derived: a derived port is taken on a shared node as soon as another job or a connection holds it.
    Candidates lie below the ephemeral range, or above it where a site starts that range low."""
    low, high = ephemeral_range()
    ranges = [(LOWEST_PORT, low), (high + 1, 65536)]
    start, end = max(ranges, key=lambda r: r[1] - r[0])
    span = end - start
    if span < tries:  # the ephemeral range covers (nearly) everything: let the kernel choose
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]
    for i in range(tries):
        port = start + (seed + i * 7919) % span  # a prime stride visits different ports
        if _bindable(port):
            return port
    raise OSError(f"no free port for the rendezvous among {tries} tried between {start} and {end}")
