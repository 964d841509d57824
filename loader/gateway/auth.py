"""Bearer-token authentication: a server interceptor that admits an RPC only with the token."""

from __future__ import annotations

import hmac
import logging
from typing import Iterable

import grpc

log = logging.getLogger("loader.gateway")

# Load balancers and Kubernetes probes check health without credentials; it reveals nothing else.
OPEN_SERVICES = ("grpc.health.v1.Health",)
SCHEME = "bearer"


def token_problem(metadata: Iterable[tuple[str, object]] | None, token: str) -> str | None:
    """Why the call's metadata does not carry `token`, or None when it does.

    The reasons name what is wrong with the header, never its value or the expected token.
    """
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        return "missing `authorization: Bearer <token>` metadata"
    if len(values) > 1:
        return "more than one `authorization` header"
    value = values[0]
    if isinstance(value, bytes):
        return "the `authorization` header must be text"
    scheme, _, presented = value.partition(" ")
    if scheme.lower() != SCHEME or not presented.strip():
        return "the `authorization` header must read `Bearer <token>`"
    # Constant-time: how many leading characters match must not show in the response time.
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return "wrong token"
    return None


def _is_open(method: str) -> bool:
    service = method.lstrip("/").split("/", 1)[0]
    return service in OPEN_SERVICES


def _denied(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that fails with UNAUTHENTICATED: the shape
    decides how the server reads the request, so a streaming call is refused as a stream."""

    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.unary_stream_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC outside OPEN_SERVICES whose `authorization` metadata is not
    `Bearer <token>`, with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token

    def __repr__(self) -> str:  # the default repr would be harmless, but never risk the secret
        return "BearerTokenInterceptor(token=<hidden>)"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if _is_open(method):
            return await continuation(handler_call_details)
        reason = token_problem(handler_call_details.invocation_metadata, self._token)
        if reason is None:
            return await continuation(handler_call_details)
        log.info("refused %s: %s", method, reason)
        return _denied(await continuation(handler_call_details), f"{method}: {reason}")
