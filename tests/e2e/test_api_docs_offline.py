"""/docs (Swagger UI) and /redoc (ReDoc) work offline: headless Chromium against a live
`robustify serve --no-worker`, with every request to a host other than the server aborted. The
pages list the API's operations, Swagger UI shows its Authorize button, and nothing was fetched
from anywhere else (no CDN)."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import free_port
from tests.e2e.test_dashboard import browser, serve  # noqa: F401  (a fixture and a helper)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def _offline_page(browser: Any, url: str) -> tuple[Any, list[str], list[str]]:
    ctx = browser.new_context()
    blocked: list[str] = []
    errors: list[str] = []
    ours = urlsplit(url).netloc

    def only_ours(route: Any) -> None:
        if urlsplit(route.request.url).netloc == ours or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    ctx.route("**/*", only_ours)
    page = ctx.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, blocked, errors


def test_swagger_ui_and_redoc_load_without_the_internet(browser: Any, tmp_path: Path) -> None:
    port = free_port()
    with serve(tmp_path / "data", port, tmp_path / "serve.log", "--no-worker"):
        url = f"http://127.0.0.1:{port}"
        page, blocked, errors = _offline_page(browser, url)
        answer = page.goto(f"{url}/docs")
        assert "default-src 'self'" in answer.headers["content-security-policy"]
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = {p.strip().replace("\u200b", "") for p in page.locator(".opblock-summary-path").all_inner_texts()}
        assert {"/v1/jobs", "/v1/models", "/v1/jobs/{job_id}/events", "/healthz"} <= paths, paths
        assert page.locator(".opblock").count() >= 25
        authorize = page.locator("button.authorize")
        assert authorize.is_visible() and "Authorize" in authorize.inner_text()
        authorize.click()  # the bearer scheme is offered
        page.wait_for_selector("text=bearerAuth", timeout=10_000)
        # the typed schemas are there: the Job model is listed with its fields
        assert page.locator("section.models").get_by_text("Job", exact=True).count() >= 1

        page.goto(f"{url}/redoc")
        page.get_by_role("heading", name="Submit a fine-tuning, evaluation or sweep job").wait_for(timeout=30_000)
        assert page.get_by_role("heading", name="List models").count() == 1
        assert not blocked, f"the pages tried to fetch from elsewhere: {blocked}"
        assert not errors, errors
        page.context.close()
