"""Health and metrics endpoints, and an in-loop uvicorn server that leaves signals to us."""

import asyncio
import contextlib
from collections.abc import Generator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from services.runtime.health import Health
from services.runtime.settings import split_host_port
from services.runtime.telemetry_metrics import exposition


def health_routes(health: Health) -> list[BaseRoute]:
    async def healthz(_: Request) -> Response:
        status = health.liveness()
        return JSONResponse(
            {"alive": health.alive(), "loops": status}, 200 if health.alive() else 503
        )

    async def readyz(_: Request) -> Response:
        ready = health.ready()
        return JSONResponse({"ready": ready, "checks": health.readiness()}, 200 if ready else 503)

    async def metrics(_: Request) -> Response:
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    return [
        Route("/healthz", healthz, include_in_schema=False),
        Route("/readyz", readyz, include_in_schema=False),
        Route("/metrics", metrics, include_in_schema=False),
    ]


class _QuietServer(uvicorn.Server):
    """uvicorn that does not take over SIGINT/SIGTERM: the service's own handler decides."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_http(app: ASGIApp, addr: str, stop: asyncio.Event) -> None:
    """Serve `app` on `host:port` until `stop` is set."""
    host, port = split_host_port(addr, 8080)
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopped.cancel()
    await task
    if server.started is False and not stop.is_set():
        raise RuntimeError(f"could not serve HTTP on {addr}")


def admin_app(health: Health) -> Starlette:
    return Starlette(routes=health_routes(health))
