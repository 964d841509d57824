"""The bare-gRPC ceiling: a grpc.aio server streams pre-encoded byte messages, a sync client counts them.

No protobuf, no Arrow, no Ray: what Python gRPC alone moves between two processes on this machine.
The server runs like the loader's gateway (grpc.aio on its own event-loop thread, the same
message-size limits); the client, like RemoteLoader, iterates a sync stream in another process.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

METHOD = "/bench.Bare/Stream"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class BareServer:
    """Serves `messages` round-robin; a request's bytes are the decimal count to send."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bare-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None

    async def _stream(self, request: bytes, context):
        messages = self.messages
        for i in range(int(request)):
            yield messages[i % len(messages)]

    async def _start(self) -> str:
        server = grpc.aio.server(options=OPTIONS)
        # No serializers: handlers take and return bytes as they are on the wire.
        handler = grpc.method_handlers_generic_handler(
            "bench.Bare", {"Stream": grpc.unary_stream_rpc_method_handler(self._stream)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return f"127.0.0.1:{port}"

    def start(self) -> str:
        self._thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self.address

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def consume(address: str, count: int) -> dict:
    """Receives `count` messages; seconds are from the call to the last message."""
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        call = channel.unary_stream(METHOD)
        started = time.perf_counter()
        first = None
        received = wire = 0
        for message in call(str(count).encode()):
            if first is None:
                first = time.perf_counter() - started
            received += 1
            wire += len(message)
        seconds = time.perf_counter() - started
    return {"messages": received, "wire_bytes": wire, "seconds": seconds, "first_message_s": first}
