"""The web page of `csm serve`: plain HTML, CSS and JavaScript shipped in the package (`static/`), served at `/`
and `/static/`. No build step and nothing fetched from elsewhere: the page works on a machine with no internet."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

# The page may load and call only this server: no CDN, no external font, no inline script.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


router = APIRouter()


@functools.cache
def index_html() -> str:
    return (resources.files(__package__) / "static" / "index.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def page():
    headers = {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-cache",
        "Referrer-Policy": "no-referrer",
    }
    return HTMLResponse(index_html(), headers=headers)


def add_page(app: FastAPI) -> None:
    """Serve the page at `GET /` and its assets under `/static/` (left out of /openapi.json: not API)."""
    index_html()  # read now: a broken install fails at start, not on the first visit
    app.include_router(router)
    app.mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static")
