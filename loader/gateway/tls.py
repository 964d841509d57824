"""Server TLS credentials from the `tls` config: certificate, key, and a CA for mutual TLS."""

from __future__ import annotations

import pathlib

import grpc

from loader.config import TLSConfig


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    key = pathlib.Path(tls.key).read_bytes()
    chain = pathlib.Path(tls.cert).read_bytes()
    client_ca = pathlib.Path(tls.client_ca).read_bytes() if tls.client_ca else None
    # With a client CA, a client that shows no certificate signed by it fails the handshake.
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def describe(tls: TLSConfig | None) -> str:
    if tls is None:
        return "tls: off (plaintext; the token, if any, and all data cross the network readable)"
    if tls.client_ca:
        return f"tls: mutual (certificate {tls.cert}; clients must present a certificate signed by {tls.client_ca})"
    return f"tls: on (certificate {tls.cert})"
