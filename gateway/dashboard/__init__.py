"""The operators' dashboard (docs/dashboard.md): a static page at `/admin`, served by the gateway itself.

Everything the page needs is a file of `gateway/dashboard/static/` (hand-written HTML, CSS and JavaScript; the
charts are inline SVG), so the dashboard works with no network beyond the gateway: nothing is fetched from a
CDN, nothing is built at run time. The page reads the admin API with the admin key the operator types in
(kept in the tab's sessionStorage); loading the page itself needs no key.

- `GET /admin`, `GET /admin/`        the page (404 with a short explanation when admin features are off)
- `GET /admin/static/{name}`         its assets: only the files of the static folder, read once at start-up
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from gateway.admin import ADMIN_KEY_ENV, AdminGuard

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
#: The page may only talk to the gateway it came from (the offline rule, enforced by the browser too).
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
#: Assets are revalidated on every load (an upgraded gateway serves its new page at once); the ETag makes
#: that a 304 without a body.
CACHE_CONTROL = "no-cache"

DISABLED_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Frugal dashboard: admin features are off</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 4rem auto; padding: 0 1rem;
color: #1f2933; line-height: 1.5">
<h1>Admin features are off</h1>
<p>This Frugal gateway serves no dashboard and no admin API because no admin key is set.</p>
<p>Set the environment variable <code>{ADMIN_KEY_ENV}</code> to a secret of your choice, restart the gateway,
then open <code>/admin</code> again and sign in with that key.</p>
</body></html>
"""


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file of the static folder by name (nothing else can be served: there is no path to traverse)."""
    folder = resources.files("gateway.dashboard") / "static"
    assets = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2] if "." in entry.name else ""
        if not entry.is_file() or suffix not in CONTENT_TYPES or entry.name.startswith("."):
            continue
        body = entry.read_bytes()
        assets[entry.name] = Asset(body, CONTENT_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


def _serve(request: Request, asset: Asset) -> Response:
    headers = {"etag": asset.etag, "cache-control": CACHE_CONTROL, **SECURITY_HEADERS}
    tags = [t.strip().removeprefix("W/") for t in (request.headers.get("if-none-match") or "").split(",")]
    if asset.etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def dashboard_routes(guard: AdminGuard) -> APIRouter:
    routes = APIRouter(include_in_schema=False)
    assets = load_assets()

    async def page(request: Request) -> Response:
        if not guard.enabled:
            return HTMLResponse(DISABLED_PAGE, status_code=404, headers={"cache-control": "no-store"})
        return _serve(request, assets["index.html"])

    routes.add_api_route("/admin", page, methods=["GET"])
    routes.add_api_route("/admin/", page, methods=["GET"])

    @routes.get("/admin/static/{name}")
    async def static(request: Request, name: str) -> Response:
        asset = assets.get(name) if name != "index.html" else None
        if asset is None or not guard.enabled:
            return Response("Not found\n", status_code=404, media_type="text/plain; charset=utf-8",
                            headers={"cache-control": "no-store", "x-content-type-options": "nosniff"})
        return _serve(request, asset)

    return routes


__all__ = ["dashboard_routes", "load_assets"]
