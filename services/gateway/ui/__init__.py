"""The web UI and the API docs page, served by the gateway from files shipped in this package.

The UI is static: ``/`` is ``static/index.html``, ``/ui/...`` the rest (plain ES modules, the CSS, and the
vendored uPlot and Swagger UI under ``static/vendor/``, see its README). It signs in with
``POST /api/v1/auth/login`` like the CLI and calls the same JSON API with ``Authorization: Bearer``, so these
routes are public: they hold no data. Nothing is fetched from elsewhere at run time; the index page's
Content-Security-Policy holds the browser to that.

``/schema`` renders the OpenAPI schema with the vendored Swagger UI (Litestar's default pages load their
scripts from a CDN and are blank offline).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import CacheControlHeader
from litestar.openapi.plugins import OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.router import Router
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"
# Where the UI's files are served (``/ui/js/main.js``); the index page at ``/`` refers to them there.
PREFIX = "/ui"
# Only this origin: scripts, styles, API calls. Inline styles are allowed (uPlot positions its parts with them).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:;"
       " connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
_NO_CACHE = CacheControlHeader(no_cache=True)  # revalidate (ETag): an upgraded gateway serves its own UI at once


@functools.cache
def _index_html() -> bytes:
    """The index page, read once on the first ask (no I/O at import)."""
    return (STATIC / "index.html").read_bytes()


def routes(public: dict[str, Any]) -> list[Any]:
    """The UI's routes: the index page at ``/`` and the static files under ``/ui``; ``public`` is the route
    ``opt`` that exempts them from authentication."""

    @get("/", opt=public, include_in_schema=False, cache_control=_NO_CACHE)
    async def index() -> Response[bytes]:
        """The web UI's single page (hash routing: every view is ``/#/...``)."""
        return Response(_index_html(), media_type="text/html",
                        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer"})

    files: Router = create_static_files_router(path=PREFIX, directories=[STATIC], opt=public,
                                               include_in_schema=False, cache_control=_NO_CACHE, name="ui")
    return [index, files]


class LocalSwagger(OpenAPIRenderPlugin):
    """Swagger UI from the vendored files: the schema inline, no validator badge, no CDN favicon. Signed in to
    the web UI (same origin), its "Try it out" sends that session's token."""

    def __init__(self, path: str | list[str]) -> None:
        super().__init__(path=path, favicon=f"<link rel='icon' href='{PREFIX}/favicon.svg'>")

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The docs page: Swagger UI over the schema, from ``static/vendor/swagger-ui``."""
        spec = self.render_json(request, openapi_schema).decode()
        # The schema goes into a <script> element: "</" must not end it early.
        spec = spec.replace("</", "<\\/")
        vendor = f"{PREFIX}/vendor/swagger-ui"
        title = json.dumps(openapi_schema["info"]["title"])[1:-1]
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} API</title>{self.favicon}
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="{vendor}/swagger-ui.css">
<style>body {{ margin: 0 }}</style>
<script src="{vendor}/swagger-ui-bundle.js"></script>
</head><body><div id="swagger"></div>
<script>
SwaggerUIBundle({{
  spec: {spec},
  dom_id: "#swagger",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  requestInterceptor: (req) => {{
    const token = sessionStorage.getItem("kiln.token");
    if (token && !req.headers.Authorization) req.headers.Authorization = "Bearer " + token;
    return req;
  }},
}});
</script></body></html>""".encode()


def schema_plugins() -> list[OpenAPIRenderPlugin]:
    """The schema pages: Swagger UI at ``/schema`` (and ``/schema/swagger``), the YAML at ``/schema/openapi.yaml``;
    Litestar adds ``/schema/openapi.json``."""
    return [LocalSwagger(path=["/", "/swagger"]), YamlRenderPlugin(path="/openapi.yaml")]
