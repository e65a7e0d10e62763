"""The vendored basic Plotly.js build (frontend/vendor/) is served, and of the same version
as the full build the plotly Python package ships: a figure must not change with the build
that happened to draw it."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from server.static import FRONTEND_DIR, plotly_js_path

VERSION = re.compile(rb"plotly\.js (?:\([a-z -]+\) )?v(\d+\.\d+\.\d+)")


def header_version(data: bytes) -> str:
    m = VERSION.search(data[:400])
    assert m, data[:400]
    return m.group(1).decode()


def test_basic_build_matches_the_full_builds_version() -> None:
    basic = (FRONTEND_DIR / "vendor" / "plotly-basic.min.js").read_bytes()
    full = plotly_js_path().read_bytes()
    assert b"(basic - minified)" in basic[:400]
    assert header_version(basic) == header_version(full), "refresh frontend/vendor (README.md)"


def test_basic_build_is_served() -> None:
    from fastapi import FastAPI

    from server.static import mount_frontend

    app = FastAPI()
    mount_frontend(app)
    with TestClient(app) as client:
        r = client.get("/static/vendor/plotly-basic.min.js")
        assert r.status_code == 200
        assert r.content == (FRONTEND_DIR / "vendor" / "plotly-basic.min.js").read_bytes()
        assert r.headers["content-type"].startswith(("text/javascript", "application/javascript"))
