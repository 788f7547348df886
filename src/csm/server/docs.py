"""`/docs` (Swagger UI) and `/redoc` served with their JavaScript and CSS from an installed package
(`fastapi-offline` ships Swagger UI's and ReDoc's files), not from a CDN: the API's pages work with no internet."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"  # the package's files: swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
# ReDoc's menu shows its maker's logo from their CDN (hidden when it fails to load); our copy shows nothing.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_IMAGE = "data:image/svg+xml,%3Csvg%20xmlns=%22http://www.w3.org/2000/svg%22/%3E"


def content_policy(html: str) -> str:
    """A Content-Security-Policy holding the page to this server: its inline scripts allowed by their hashes
    (FastAPI writes Swagger UI's set-up inline), ReDoc's workers from blob: URLs, inline styles (both use them)."""
    scripts = ["'self'"] + [
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in INLINE_SCRIPT.findall(html)
    ]
    return (
        f"default-src 'self'; script-src {' '.join(scripts)}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


def page(response: HTMLResponse) -> HTMLResponse:
    html = response.body.decode()
    return HTMLResponse(html, headers={"Content-Security-Policy": content_policy(html)})


def add_docs(app: FastAPI) -> None:
    """Serve /docs, /docs/oauth2-redirect and /redoc with local assets; the app must be made with
    `docs_url=None, redoc_url=None` (FastAPI's own pages load from a CDN)."""
    redoc_js = (resources.files("fastapi_offline") / "static" / "redoc.standalone.js").read_text("utf-8")
    redoc_js = redoc_js.replace(REDOC_LOGO, EMPTY_IMAGE)

    @app.get(f"{ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_script():
        return Response(redoc_js, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})

    app.mount(ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return page(
            get_swagger_ui_html(
                openapi_url=app.openapi_url,
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=redirect,
                swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS}/swagger-ui.css",
                swagger_favicon_url="/static/favicon.svg",
                swagger_ui_parameters={"validatorUrl": None},  # its badge would call a validator online
            )
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect():
        return page(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return page(
            get_redoc_html(
                openapi_url=app.openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                redoc_favicon_url="/static/favicon.svg",
                with_google_fonts=False,
            )
        )
