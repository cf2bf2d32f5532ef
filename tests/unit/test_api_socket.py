"""The local API's socket: streamed tokens must not wait on Nagle's algorithm."""

from __future__ import annotations

import asyncio
import socket

from edgefleet.agent.tasks.api_server import bind_api_socket


async def test_api_connections_have_nagle_off() -> None:
    listener = bind_api_socket("127.0.0.1", 0)
    nodelay: asyncio.Queue[int] = asyncio.Queue()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay.put_nowait(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listener)
    try:
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        assert await asyncio.wait_for(nodelay.get(), timeout=5) == 1
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
