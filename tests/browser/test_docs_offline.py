"""/docs (Swagger UI) renders the API's operations with every other host unreachable: its
scripts and styles come from this server (issue 12, point 3), not from a CDN. /redoc too
(its only outside request is a decorative logo image)."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser


def test_swagger_ui_renders_offline(browser, service) -> None:
    context = browser.new_context(base_url=service.url)
    ours = urlparse(service.url).netloc
    refused: list[str] = []

    def offline(route) -> None:
        if urlparse(route.request.url).netloc == ours:
            route.continue_()
        else:  # what an air-gapped cluster does to a CDN request
            # ReDoc's "powered by" footer links an image on its CDN: decoration only.
            if route.request.resource_type != "image":
                refused.append(route.request.url)
            route.abort()

    context.route("**/*", offline)
    page = context.new_page()
    try:
        page.goto("/docs")
        # Operations are drawn only once the bundle ran and read /openapi.json.
        page.locator(".opblock-summary-path", has_text="/api/runs").first.wait_for(timeout=30_000)
        assert page.locator(".opblock").count() > 10
        assert page.title() == "batchlab - API docs"
        page.goto("/redoc")
        # ReDoc drew the spec: the title heading and the operations' menu.
        page.locator("h1", has_text="batchlab").first.wait_for(timeout=30_000)
        assert page.locator("[role=menuitem]").count() > 10
        assert not refused, refused
    finally:
        context.close()
