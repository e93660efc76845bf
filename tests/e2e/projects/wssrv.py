"""A WebSocket echo server for the protocol e2e tests (aiohttp, in the demo image): every path ending
in /ws is a WebSocket that answers each text message with "<hostname>:<message>"; anything else 404."""

import socket

from aiohttp import WSMsgType, web

HOST = socket.gethostname()


async def websocket(request: web.Request) -> web.StreamResponse:
    if not request.path.endswith("/ws"):
        raise web.HTTPNotFound()
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"{HOST}:{msg.data}")
    return ws


app = web.Application()
app.router.add_get("/{tail:.*}", websocket)
web.run_app(app, port=8080, access_log=None, print=None)
