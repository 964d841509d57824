"""Service addresses and the token's environment variable: what the client and the service
both need, without the service's config schema (a trainer installs only the client)."""

from __future__ import annotations

import ipaddress

from loader.errors import ConfigError

# The bearer token, when neither `token=` nor `token_file` names one.
TOKEN_ENV = "LOADER_TOKEN"


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("address", f"expected HOST:PORT with a port from 0 to 65535, got {address!r}")
    return host, int(port)


def is_loopback(address: str) -> bool:
    """True when HOST:PORT (or a unix: target) stays on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
