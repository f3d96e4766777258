"""Running corral under uvicorn (uvloop + httptools), with graceful SIGTERM drain."""

from __future__ import annotations

import uvicorn

from corral.app import create_app
from corral.config import Settings
from corral.logs import configure_logging


def uvicorn_config(settings: Settings, **kwargs: object) -> uvicorn.Config:
    app = create_app(settings)
    return uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=settings.server.log_level,
        timeout_keep_alive=75,
        # SIGTERM: stop accepting, let in-flight streams finish, then shut down.
        timeout_graceful_shutdown=int(settings.server.drain_timeout_s) or None,
        **kwargs,  # type: ignore[arg-type]
    )


def run_server(settings: Settings) -> None:
    configure_logging(settings.server.log_level, settings.server.log_format)
    uvicorn.Server(uvicorn_config(settings)).run()
