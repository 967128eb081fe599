"""The API's listening socket: connections it accepts send small responses at once (TCP_NODELAY).

Without it, every response on a kept-alive connection waits ~40 ms for the client's delayed ACK (Nagle);
bench/api_latency.py measures the round trip. asyncio (under uvicorn) sets TCP_NODELAY on the sockets it
accepts only when the listening socket says IPPROTO_TCP, so this serves from dllama's own listening socket
the way uvicorn does (`loop.create_server(sock=...)`) and reads the option off the accepted connection.
"""

import asyncio
import socket

import pytest

from dllama.api.server import _listen

pytestmark = pytest.mark.network


async def _accepted_nodelay() -> int:
    sock = _listen("127.0.0.1", 0)
    seen = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(seen, 30)
        await reader.read()
        writer.close()
    return value


def test_accepted_connections_have_tcp_nodelay():
    assert asyncio.run(_accepted_nodelay()) != 0
