"""The FastAPI app: both APIs, /health, /metrics, the API key, and every error as a 4xx/5xx JSON answer.

    app = create_app({"tiny": runtime.load(path)}, ServeSettings(api_key="..."))

Errors keep each API's shape: {"error": {"message", "type", "param"}} under /v1 (OpenAI's), and
{"error", "detail", "field"} elsewhere (A1111's FastAPI errors carry `detail`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

from runtime.serve import a1111_api, openai_api
from runtime.serve.fields import FieldError
from runtime.serve.service import HTTPError, Service
from runtime.serve.settings import ServeSettings

log = logging.getLogger(__name__)
_OPEN_PATHS = ("/health",)  # answered without the API key: load balancers probe it
_GENERATION_ROUTES = ("/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def create_app(pipelines_by_name, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    service = Service(pipelines_by_name, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="sd-runtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(FieldError)
    async def field_error(request: Request, err: FieldError):
        return _error(request.url.path, err.status, err.message, err.field)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # one JSON line, never a traceback page
        log.error("unhandled error on %s: %s: %s", request.url.path, type(err).__name__, err)
        return _error(request.url.path, 500, f"internal error: {type(err).__name__}: {str(err)[:300]}", None)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, err: HTTPError):
        return _error(request.url.path, err.status, err.message, err.field, err.headers)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": {
                name: {"queue_depth": model.batcher.queue_depth, "worker_alive": model.batcher.alive}
                for name, model in service.models.items()
            },
        }

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=service.metrics.content_type)

    app.include_router(openai_api.router(service))
    app.include_router(a1111_api.router(service))
    app.add_middleware(_Guard, service=service)
    return app


class _Guard:
    """The API key and the request metrics, as plain ASGI middleware: starlette's BaseHTTPMiddleware
    would hide a client's disconnect from the handlers (they poll it to cancel abandoned work)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, status = time.monotonic(), scope["path"], [500]
        key = self.service.settings.api_key

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if key is not None and path not in _OPEN_PATHS:
                refused = _check_key(Headers(scope=scope).get("authorization"), key)
                if refused is not None:
                    response = _error(path, 401, refused, "authorization", {"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, send_and_note)
            await self.app(scope, receive, send_and_note)
        finally:
            _count(self.service, path, status[0], started)


def _check_key(header: str | None, key: str) -> str | None:
    """None when the Authorization header carries the key, else why not."""
    if not header:
        return "missing API key: send Authorization: Bearer <key>"
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return "wrong API key (Authorization: Bearer <key>)"
    return None


def _error(path: str, status: int, message: str, field: str | None, headers: dict | None = None) -> JSONResponse:
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
        content = {
            "error": {
                "message": f"{field}: {message}" if field else message,
                "type": kind,
                "param": field,
                "code": status,
            }
        }
    else:
        detail = f"{field}: {message}" if field else message
        content = {"error": _STATUS_NAMES.get(status, "Error"), "detail": detail, "field": field}
    return JSONResponse(content, status_code=status, headers=headers)


_STATUS_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    409: "Interrupted",
    413: "TooLarge",
    429: "TooManyRequests",
    499: "ClientClosedRequest",
    503: "Unavailable",
    504: "Timeout",
}


def _count(service: Service, path: str, status: int, started: float) -> None:
    if path in _GENERATION_ROUTES:
        service.metrics.requests.labels(path, str(status)).inc()
        service.metrics.request_seconds.labels(path).observe(time.monotonic() - started)
