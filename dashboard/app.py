"""The aiohttp application: pages, sign-in, CSRF and the security headers around every answer."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from aiohttp import web
from rune.dashboard import routes
from rune.dashboard.api import Api
from rune.dashboard.signin import COOKIE, CSRF_HEADER, LOGIN_COOKIE, SignIns, same_secret

from rune.errors import RuneError, Unauthenticated

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": "live.html", "/audit": "audit.html", "/recordings": "recordings.html",
         "/play": "play.html"}
OPEN_PATHS = ("/login", "/static/", "/healthz", "/favicon.ico")
MAX_TOKEN = 4096

# The vendored terminal renderers need WebAssembly (asciinema-player) and inject <style>
# elements (xterm.js); everything else is same-origin only, and nothing may frame us.
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
       "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
       "worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

API = web.AppKey("api", Api)
SIGNINS = web.AppKey("signins", SignIns)
SECURE = web.AppKey("secure", bool)


def page(name: str, csrf: str = "", error: str = "") -> web.Response:
    text = (STATIC / name).read_text()
    text = text.replace("{{csrf}}", html.escape(csrf)).replace("{{error}}", html.escape(error))
    return web.Response(text=text, content_type="text/html")


@web.middleware
async def headers(request: web.Request, handler: routes.Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # "same-origin", not "no-referrer": with the latter a form post carries `Origin: null`.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def signed_in(request: web.Request, handler: routes.Handler) -> web.StreamResponse:
    """No sign-in: the sign-in page (or 401 for the API), never data."""
    if request.path.startswith(OPEN_PATHS):
        return await handler(request)
    signin = request.app[SIGNINS].get(request.cookies.get(COOKIE))
    if signin is None:
        if request.path.startswith("/api/"):
            return web.json_response({"error": "not signed in"}, status=401)
        raise web.HTTPSeeOther("/login")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        if not same_secret(request.headers.get(CSRF_HEADER), signin.csrf) or \
                not _same_origin(request):
            return web.json_response({"error": "missing or wrong CSRF token"}, status=403)
    request["signin"] = signin
    try:
        return await handler(request)
    except Unauthenticated:
        # The token was revoked or the apiserver restarted without it: sign in again.
        request.app[SIGNINS].drop(request.cookies.get(COOKIE))
        if request.path.startswith("/api/"):
            return web.json_response({"error": "the token is no longer valid"}, status=401)
        raise web.HTTPSeeOther("/login") from None
    except RuneError as exc:
        return web.json_response({"error": exc.message, "code": exc.code},
                                 status=routes.http_status(exc))


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


async def login_page(request: web.Request) -> web.Response:
    if request.app[SIGNINS].get(request.cookies.get(COOKIE)) is not None:
        raise web.HTTPSeeOther("/")
    return _login_form(request)


def _login_form(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    import secrets

    # Keep the form's token across reloads (and the browser's own extra requests), so
    # two open sign-in tabs do not invalidate each other.
    csrf = request.cookies.get(LOGIN_COOKIE, "")
    if len(csrf) != 43 or not csrf.replace("-", "").replace("_", "").isalnum():
        csrf = secrets.token_urlsafe(32)
    response = page("login.html", csrf=csrf, error=error)
    response.set_status(status)
    response.set_cookie(LOGIN_COOKIE, csrf, httponly=True, samesite="Strict", path="/login",
                        secure=request.app[SECURE])
    return response


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    if not same_secret(str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "")) or \
            not _same_origin(request):
        return web.json_response({"error": "missing or wrong CSRF token"}, status=403)
    token = str(form.get("token", "")).strip()
    if not token or len(token) > MAX_TOKEN or not token.isprintable():
        return _login_form(request, "Paste a rune token (the contents of a token file).", 400)
    try:
        await request.app[API].live_sessions(token)
    except Unauthenticated:
        return _login_form(request, "The API server does not know this token.", 401)
    except RuneError as exc:
        return _login_form(request, f"The API server refused: {exc.message}", 502)
    sid, _ = request.app[SIGNINS].create(token)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/",
                        secure=request.app[SECURE])
    response.del_cookie(LOGIN_COOKIE, path="/login")
    raise response


async def logout(request: web.Request) -> web.Response:
    request.app[SIGNINS].drop(request.cookies.get(COOKIE))
    response = web.json_response({"signed_out": True})
    response.del_cookie(COOKIE, path="/")
    return response


def page_handler(name: str) -> routes.Handler:
    async def handler(request: web.Request) -> web.Response:
        return page(name, csrf=request["signin"].csrf)
    return handler


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


def build_app(api: Api, secure: bool = False) -> web.Application:
    app = web.Application(middlewares=[headers, signed_in], client_max_size=64 * 1024)
    app[API] = api
    app[SIGNINS] = SignIns()
    app[SECURE] = secure
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/favicon.ico", favicon)
    for path, name in PAGES.items():
        app.router.add_get(path, page_handler(name))
    routes.add(app, API)
    app.router.add_static("/static/", STATIC, append_version=False)

    async def close_api(app: web.Application) -> None:
        await app[API].close()

    app.on_cleanup.append(close_api)
    return app
