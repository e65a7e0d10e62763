"""The single-page frontend: ``/`` is frontend/index.html, ``/static/*`` the rest.

Plotly.js comes from the installed ``plotly`` Python package (it bundles
``package_data/plotly.min.js``), so the dashboard works offline and needs no CDN or
JavaScript build step.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse
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
        response = FileResponse(
            path,
            media_type="text/javascript",
            headers={"Cache-Control": VENDOR_CACHE},
            stat_result=os.stat(path),  # computes the ETag now, for the check below
        )
        if _etag_matches(request.headers.get("if-none-match"), response.headers["etag"]):
            return NotModifiedResponse(response.headers)
        return response

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        index_html = frontend_dir / "index.html"
        if not index_html.is_file():
            raise HTTPException(404, f"frontend not found at {index_html}")
        return FileResponse(index_html, headers={"Cache-Control": APP_CACHE})

    app.mount("/static", _AppStatic(directory=frontend_dir, check_dir=False), name="static")
