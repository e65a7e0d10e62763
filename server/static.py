"""The single-page frontend: ``/`` is frontend/index.html, ``/static/*`` the rest.

Plotly.js comes from the installed ``plotly`` Python package (it bundles
``package_data/plotly.min.js``), so the dashboard works offline and needs no CDN or
JavaScript build step. The API docs (``/docs``, ``/redoc``) likewise load Swagger UI and
ReDoc from the ``fastapi-offline`` package's ``static`` folder under
``/static/vendor/apidocs/``, not from FastAPI's default CDN.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.staticfiles import NotModifiedResponse

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"
# plotly.min.js changes only with the plotly package: let browsers keep it a day and
# revalidate with the ETag/Last-Modified FileResponse sends. App files revalidate always,
# so a new version of the dashboard shows up on the next load.
VENDOR_CACHE = "public, max-age=86400"
APP_CACHE = "no-cache"


def plotly_js_path() -> Path:
    """plotly.min.js inside the installed plotly package (found without importing it)."""
    from importlib.util import find_spec

    spec = find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the plotly package is not installed")
    for base in spec.submodule_search_locations:
        path = Path(base) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise FileNotFoundError("plotly.min.js not found in the plotly package")


API_DOCS_PREFIX = "/static/vendor/apidocs"


def api_docs_dir() -> Path:
    """The Swagger UI / ReDoc assets the ``fastapi-offline`` package ships (found without
    importing it: its module builds a FastAPI app helper we do not use)."""
    from importlib.util import find_spec

    spec = find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the fastapi-offline package is not installed")
    for base in spec.submodule_search_locations:
        path = Path(base) / "static"
        if (path / "swagger-ui-bundle.js").is_file():
            return path
    raise FileNotFoundError("Swagger UI assets not found in the fastapi-offline package")


def mount_api_docs(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` with their assets served by this server, so the API docs
    work on a cluster without internet. Create the app with ``docs_url=None,
    redoc_url=None`` and call this before ``mount_frontend`` (whose mount would win)."""
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{API_DOCS_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{API_DOCS_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{root}{API_DOCS_PREFIX}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - API reference",
            redoc_js_url=f"{root}{API_DOCS_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{API_DOCS_PREFIX}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(API_DOCS_PREFIX + "/{name}", include_in_schema=False)
    def api_docs_asset(name: str, request: Request) -> Response:
        try:
            folder = api_docs_dir()
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from err
        path = folder / name
        # Only the folder's own files: no path separators reach here, but "." names could.
        if name.startswith(".") or not path.is_file():
            raise HTTPException(404, f"no API docs asset {name!r}")
        return _vendor_file(path, request)


def _vendor_file(path: Path, request: Request) -> Response:
    """A file that changes only with its package: cached a day, revalidated by ETag."""
    response = FileResponse(
        path,
        media_type="text/javascript" if path.suffix == ".js" else None,
        headers={"Cache-Control": VENDOR_CACHE},
        stat_result=os.stat(path),  # computes the ETag now, for the check below
    )
    if _etag_matches(request.headers.get("if-none-match"), response.headers["etag"]):
        return NotModifiedResponse(response.headers)
    return response


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match against our (strong) ETag; weak tags compare equal too."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class _AppStatic(StaticFiles):
    """StaticFiles that asks browsers to revalidate (cheap 304s via ETag)."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.setdefault("Cache-Control", APP_CACHE)
        return response


def mount_frontend(app: FastAPI, frontend_dir: Path = FRONTEND_DIR) -> None:
    """Serve the dashboard; routes are registered before the mount so they win."""

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def plotly_js(request: Request) -> Response:
        try:
            path = plotly_js_path()
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from err
        return _vendor_file(path, request)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        index_html = frontend_dir / "index.html"
        if not index_html.is_file():
            raise HTTPException(404, f"frontend not found at {index_html}")
        return FileResponse(index_html, headers={"Cache-Control": APP_CACHE})

    app.mount("/static", _AppStatic(directory=frontend_dir, check_dir=False), name="static")
