"""The dashboard: static HTML, CSS and ES modules (api/ui/, shipped in the package) under /ui.

The files are the same for everyone and hold no data: every number on the page comes from
/v1 with the caller's API key, so serving the shell without a key gives away nothing the API
would refuse. `/` redirects to the dashboard.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

# The page runs only its own files and talks only to its own origin (no CDN, no inline code).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every load (a 304 via the ETag): an upgraded package is picked up at once.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """StaticFiles (GET/HEAD only, no path escape, ETag and 304s) plus the headers above."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Any,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_HEADERS)
        return response


router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def root() -> RedirectResponse:
    # Relative, so the redirect also works behind a proxy that serves robustify under a prefix.
    return RedirectResponse("ui/", status_code=307)


def install_dashboard(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui", DashboardFiles(directory=UI_DIR, html=True), name="ui")
