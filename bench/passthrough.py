"""Reference pass-through: the least a Python/aiohttp gateway must do, as aioproxy's yardstick.

Reads the body, decodes only ``model`` with msgspec to pick the upstream, forwards the bytes
unchanged over one shared ClientSession, and streams the answer back chunk by chunk.
No auth, no hooks, no rewriting: whatever aioproxy costs beyond this is its own overhead.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import msgspec
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web


class _Head(msgspec.Struct):
    model: str = ""  # the only field looked at; msgspec skips the rest without building it


_decode_head = msgspec.json.Decoder(_Head).decode
SESSION = web.AppKey("session", ClientSession)


def make_app(default: str, routes: dict[str, str], api_key: str) -> web.Application:
    upstream_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            model = _decode_head(body).model
        except msgspec.DecodeError:
            return web.json_response({"error": {"message": "invalid JSON body"}}, status=400)
        url = routes.get(model, default) + request.path.removeprefix("/v1")
        async with request.app[SESSION].post(url, data=body, headers=upstream_headers) as up:
            response = web.StreamResponse(status=up.status)
            response.content_type = up.content_type
            if up.content_length is not None:
                response.content_length = up.content_length  # avoids chunked framing
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = TCPConnector(limit=0, keepalive_timeout=300)
        async with ClientSession(connector=connector, timeout=ClientTimeout(total=600)) as s:
            app[SESSION] = s
            yield

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_post("/v1/embeddings", forward)
    app.router.add_post("/v1/messages", forward)  # the same bare hop, for the Messages kinds
    return app


def _uvloop(required: bool) -> asyncio.AbstractEventLoop:
    """uvloop when installed (as aioproxy's --loop auto); the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        if required:
            raise SystemExit("passthrough: --loop uvloop needs uvloop installed") from None
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--upstream", required=True, help="default api_base, e.g. http://h:p/v1")
    parser.add_argument("--route", action="append", default=[], metavar="MODEL=API_BASE")
    parser.add_argument("--api-key", default="sk-upstream")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args()
    routes = dict(r.split("=", 1) for r in args.route)
    loop = asyncio.new_event_loop() if args.loop == "asyncio" else _uvloop(args.loop == "uvloop")
    app = make_app(args.upstream.rstrip("/"), routes, args.api_key)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
