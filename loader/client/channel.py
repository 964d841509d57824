"""Client channels to the loader service: TLS credentials and the bearer token."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings
from typing import Mapping, Union

import grpc

from loader.addresses import TOKEN_ENV, is_loopback


class InsecureTokenWarning(UserWarning):
    """A token is about to cross the network in plaintext."""


@dataclasses.dataclass(frozen=True)
class TLS:
    """How a client checks the server and, for mutual TLS, proves who it is.

    `ca`: PEM file of the CA that signed the server's certificate (None: the system's roots).
    `cert`, `key`: the client's certificate and private key, when the server demands one.
    `server_name`: the name to check the server's certificate against, when it differs from the
    host in the address (e.g. connecting by IP to a certificate issued for a DNS name).
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls: cert and key go together (a client certificate needs its private key)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read("ca", self.ca), private_key=_read("key", self.key),
            certificate_chain=_read("cert", self.cert),
        )  # fmt: skip


TLSLike = Union[TLS, Mapping[str, str], bool, None]


def as_tls(tls: TLSLike) -> TLS | None:
    """None/False: plaintext; True: TLS against the system's roots; a mapping: TLS(**mapping)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return TLS()
    if isinstance(tls, TLS):
        return tls
    if isinstance(tls, Mapping):
        unknown = sorted(set(tls) - {f.name for f in dataclasses.fields(TLS)})
        if unknown:
            raise ValueError(f"tls.{unknown[0]}: unknown key; known keys: ca, cert, key, server_name")
        return TLS(**tls)
    raise TypeError(f"tls must be None, a bool, a mapping or loader.client.TLS, got {type(tls).__name__}")


def _read(name: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls.{name}: cannot read {path!r}: {exc.strerror}") from None


def resolve_token(token: str | None) -> str | None:
    """The token argument, else $LOADER_TOKEN; blank means none."""
    token = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip()
    if token and not all("!" <= ch <= "~" for ch in token):
        # Never echo it: it may be a real secret pasted with a stray character.
        raise ValueError("the loader token must be printable ASCII without spaces")
    return token or None


def token_metadata(token: str | None, address: str, tls: TLS | None) -> tuple[tuple[str, str], ...]:
    """The `authorization` metadata for every call. It is plain metadata rather than gRPC call
    credentials because gRPC refuses those on insecure channels, and in-cluster plaintext (or a
    mesh doing the TLS) is a setup users run; off loopback they are warned instead."""
    if not token:
        return ()
    if tls is None and not is_loopback(address):
        warnings.warn(
            f"sending the loader token to {address} without TLS: anyone on the path can read it and the data; "
            "pass tls=... (see docs/security.md)",
            InsecureTokenWarning,
            stacklevel=3,
        )
    return (("authorization", f"Bearer {token}"),)


def open_channel(address: str, tls: TLS | None, options: list[tuple[str, int | str]] | None = None) -> grpc.Channel:
    options = list(options or [])
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.credentials(), options=options)
