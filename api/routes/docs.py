"""/docs (Swagger UI) and /redoc (ReDoc) served by the app itself, with no CDN: the pages work
on an air-gapped machine. The JavaScript and CSS come from the fastapi-offline package (its
static/ folder: Swagger UI's bundle under Apache-2.0, ReDoc's standalone build under MIT), which
this module serves under /docs-assets; only the files, not its FastAPI wrapper, are used.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


# The pages load only this server's files and call only its API. Their inline start-up script needs
# 'unsafe-inline' (the pages hold no data of their own); ReDoc's build links a logo on
# cdn.redoc.ly, which img-src keeps from being fetched.
_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} API - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        # The key typed into Authorize lives only as long as the page: persisting it would write it to
        # localStorage, where any script of this origin (and anyone at the browser later) reads it.
        swagger_ui_parameters={"persistAuthorization": False, "displayRequestDuration": True},
    )
    page.headers.update(_HEADERS)
    return page


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    page = get_redoc_html(openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} API - ReDoc",
                          redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)
    page.headers.update(_HEADERS)
    return page


def install_api_docs(app: FastAPI) -> None:
    """The app must be created with docs_url=None and redoc_url=None (FastAPI's pages use a CDN)."""
    app.include_router(router)
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
