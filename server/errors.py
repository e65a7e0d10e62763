"""Error answers of the API, and the OpenAPI entries that document them.

Every error answers JSON ``{"detail": ...}``. A 422's detail is FastAPI's list of errors
plus ``field`` and ``message`` per item (core.errors), made encodable whatever the input
held: NaN or Infinity become null, lone surrogates become "?". A 405 names every method
the path has in ``Allow``.

``document_errors`` adds to each operation the answers the guards in front of the routes
(server.middleware) and the routes' own checks give, so the schema matches the answers:
400 (unknown Host), 403 (cross-site write), 413 (body too large), 401 (with a token), 404
(an id that does not exist).
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Mount
from starlette.types import Scope

from core.errors import error_field, error_message
from core.jsonsafe import json_safe
from server.submit import QueueUnavailable
from store.runs import RunNotFound

log = logging.getLogger("batchlab.server")


def encodable(obj: Any) -> Any:
    """``obj`` as JSON can carry it: non-finite floats null, lone surrogates "?"."""
    obj = json_safe(obj)
    if isinstance(obj, str):
        return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, dict):
        return {encodable(k): encodable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [encodable(v) for v in obj]
    return obj


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's 422 body plus each error's "field" and "message" (core.errors), so the
        # dashboard shows "field: message" as the CLI and the client do, without its own rule.
        detail = encodable(jsonable_encoder(exc.errors()))
        for item in detail:
            item["field"] = error_field(item.get("loc", ()))
            item["message"] = error_message(item.get("msg", ""))
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            # Starlette names the methods of the first route matching the path only, and
            # the static files none (they answer GET and HEAD).
            allowed = allowed_methods(app, req.scope) or ["GET", "HEAD"]
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
        return await http_exception_handler(req, exc)

    @app.exception_handler(QueueUnavailable)
    async def _queue_down(_req: Request, exc: QueueUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.exception_handler(RunNotFound)
    async def _gone(_req: Request, exc: RunNotFound) -> JSONResponse:
        # A run deleted between a route's lookup and its update.
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.InterfaceError)
    async def _db_down(_req: Request, exc: sqlalchemy.exc.DBAPIError) -> JSONResponse:
        log.error("database error: %s", exc)
        return JSONResponse(
            {"detail": f"database unavailable: {type(exc.orig).__name__}: {exc.orig}"[:500]},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods some route of ``app`` answers for the request's path."""
    return [
        method
        for method in _METHODS
        if any(
            r.matches({**scope, "method": method})[0] == Match.FULL
            for r in app.router.routes
            if not isinstance(r, Mount)  # a mount matches every method
        )
    ]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


_ERROR = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
_WRITE_METHODS = ("post", "put", "patch", "delete")


def document_errors(app: FastAPI, *, token_required: bool) -> None:
    """Let ``app.openapi()`` list the error answers each operation can give.

    Without a configured token the Bearer scheme of the writes is optional (an empty
    requirement ``{}`` beside it, as OpenAPI spells "no authentication also works").
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR
        for path, operations in schema.get("paths", {}).items():
            for method, op in operations.items():
                _add_errors(path, method, op)
                if op.get("security") and not token_required:
                    op["security"] = [*op["security"], {}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_errors(path: str, method: str, op: dict[str, Any]) -> None:
    responses = op.setdefault("responses", {})

    def add(code: int, description: str) -> None:
        entry = responses.setdefault(str(code), {"description": description})
        entry.setdefault(
            "content", {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        )

    add(400, "Unknown Host header (BATCHLAB_ALLOWED_HOSTS), or a body that cannot be read.")
    if method in _WRITE_METHODS:
        add(403, "A browser's write from a page of another origin.")
    if "requestBody" in op:
        add(413, "The request body is larger than BATCHLAB_MAX_BODY_BYTES.")
    if op.get("security"):
        add(401, "A token is configured and the request lacks it (Authorization: Bearer).")
    if "{" in path:
        add(404, "No such run or sweep.")
