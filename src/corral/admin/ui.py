"""The status page at ``/ui``: one static HTML file; the browser reads the admin API itself."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

# The page loads nothing from elsewhere; the policy makes the browser hold it to that.
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


def page() -> bytes:
    """The status page's HTML, shipped as package data (``corral/admin/ui.html``)."""
    return (files("corral.admin") / "ui.html").read_bytes()


def ui_routes() -> APIRouter:
    """``GET /ui``: the page. It needs no key: it holds no data, and asks for the admin key
    when the admin API wants one."""
    router = APIRouter(include_in_schema=False)
    html = page()

    @router.api_route("/ui", methods=["GET", "HEAD"])
    async def status_page() -> HTMLResponse:
        return HTMLResponse(html, headers=_HEADERS)

    @router.api_route("/ui/", methods=["GET", "HEAD"])
    async def status_page_slash() -> RedirectResponse:
        # Relative, so it also works behind a proxy that serves corral under a path prefix.
        return RedirectResponse("../ui", status_code=308)

    return router
