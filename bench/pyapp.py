"""A pure-Python stand-in for the nginx app (when nginx is missing, and in the smoke test):
HTTP/1.1 keep-alive, a fixed 100-byte body for every request, on 127.0.0.1.

    python -m bench.pyapp --port P
"""

from __future__ import annotations

import argparse
import asyncio

from httptools import HttpParserError, HttpRequestParser

BODY = b"0123456789" * 10  # 100 bytes, as the nginx app returns
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n" + BODY)
RESPONSE_CLOSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n"
                  b"connection: close\r\n\r\n" + BODY)


class App(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.parser.should_keep_alive():
            self.transport.write(RESPONSE)
        else:
            self.transport.write(RESPONSE_CLOSE)
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(App, "127.0.0.1", port, reuse_address=True, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pyapp")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.run(serve(args.port))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
