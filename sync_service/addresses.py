"""Host:port strings, and the one rule both ends of the wire apply to them: plaintext only on loopback.

The coordinator refuses `--insecure` on a non-loopback listen address and `SyncClient` refuses an insecure
channel to a non-loopback target; both ask `is_loopback`, so the rule cannot drift between them.
"""

from __future__ import annotations

import ipaddress


def split_host_port(address: str, what: str = "address") -> tuple[str, int]:
    """("host", port) of "host:port", "[v6]:port" included (the brackets stay on the host); `what` names
    the address in the error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{what} must be HOST:PORT, got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IPv4/IPv6 address, brackets allowed) can only reach this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """`is_loopback` for a gRPC target: "host:port", "[v6]:port", or a bare host."""
    if target.count(":") == 1 or target.startswith("["):
        target = target.rsplit(":", 1)[0]
    return is_loopback(target)
