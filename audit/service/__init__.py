"""`audit serve`: the auditing service over the Python API (FastAPI app, dynamic batching, scan jobs, evidence
log, keys and limits, metrics, a page). ``create_app(config)`` builds the app; ``serve(config)`` runs it."""

from __future__ import annotations

from .config import ServiceConfig


def create_app(config: ServiceConfig, models=None):
    from .app import create_app as _create_app

    return _create_app(config, models)


def serve(config: ServiceConfig) -> None:
    """Run the service on uvicorn until interrupted; a model that fails to load stops it with that error."""
    import uvicorn

    app = create_app(config)
    svc = app.state.service
    failure: list[BaseException] = []
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False, lifespan="on"))

    def stop(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    svc.on_load_error = stop
    server.run()
    if failure:
        raise failure[0]


__all__ = ["ServiceConfig", "create_app", "serve"]
