"""The console's routes on the daemon's aiohttp app (the one serving /metrics and /readyz).

Pages are rendered on the server with Jinja2 (autoescape on: every value is escaped) and work
without JavaScript; static/console.js only adds live refresh and relative-time updates. Every
/console response carries the security headers; pages with data are not stored by caches.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jinja2
from aiohttp import web

from bridge import ops, payload
from bridge.config import redact_url
from bridge.console import data
from bridge.console.auth import COOKIE, SESSION_SECONDS, Auth, Throttle
from bridge.console.data import ConsoleSource, Filters
from bridge.engine.policy import policy_for
from bridge.errors import BridgeError
from bridge.events import ALL_EVENTS
from bridge.signing import Signer

log = logging.getLogger("bridge.console")

PREFIX = "/console"
UNSIGNED = Signer(())  # the console describes signatures, it never computes them
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
PUBLIC = (f"{PREFIX}/login", f"{PREFIX}/static/")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _package_dir(name: str) -> Path:
    return Path(str(resources.files("bridge.console") / name))


# --- formatting helpers (Jinja filters) --------------------------------------------------------


def ago(moment: datetime | None, now: datetime) -> str:
    """'3 min ago', 'in 20 s', 'just now'."""
    if moment is None:
        return "-"
    seconds = (now - moment).total_seconds()
    future, seconds = seconds < 0, abs(seconds)
    if seconds < 2:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if seconds >= size:
            text = f"{int(seconds // size)} {unit}"
            break
    return f"in {text}" if future else f"{text} ago"


def utc(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).isoformat()


STATE_CLASS = {"delivered": "ok", "failed": "bad", "retrying": "warn", "in flight": "busy",
               "pending": "wait", "skipped": "muted"}


def status_class(status: int | None) -> str:
    if status is None:
        return "bad"
    return "ok" if 200 <= status < 300 else "warn" if status < 500 and status != 429 else "bad"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_package_dir("templates")),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True)
    env.filters.update(ago=ago, utc=utc, iso=iso, status_class=status_class)
    env.globals.update(state_class=STATE_CLASS, prefix=PREFIX)
    return env


# --- the console -------------------------------------------------------------------------------


class Console:
    """The /console routes for one or more sites (a selector appears with more than one)."""

    def __init__(self, sources: Callable[[], Sequence[ConsoleSource]], token: str,
                 read_only: bool = False, failure_delay: float | None = None) -> None:
        self.sources = sources  # the sites as they are now: asked again on every request
        self.auth = Auth(token) if failure_delay is None else Auth(token, failure_delay)
        self.read_only = read_only
        self.throttle = Throttle(self.auth.failure_delay)
        self.env = _environment()

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self._middleware)
        r = app.router
        r.add_get(PREFIX, self.overview)
        r.add_get(PREFIX + "/", self.overview)
        r.add_get(PREFIX + "/deliveries", self.deliveries)
        r.add_get(PREFIX + "/events/{event_id}", self.event)
        r.add_post(PREFIX + "/replay", self.replay)
        r.add_get(PREFIX + "/login", self.login_form)
        r.add_post(PREFIX + "/login", self.login)
        r.add_post(PREFIX + "/logout", self.logout)
        r.add_static(PREFIX + "/static", _package_dir("static"), append_version=False)

    # --- middleware: headers and authentication ----------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != PREFIX and not request.path.startswith(PREFIX + "/"):
            return await handler(request)
        try:
            response = await self._authenticated(request, handler)
        except data.SiteUnavailable as exc:
            response = self._render(request, "error.html", 503, title="Site unavailable",
                                    message=str(exc))
        except web.HTTPException as exc:
            response = web.Response(status=exc.status, headers=exc.headers,
                                    text=exc.text if exc.status >= 400 else None)
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith(PREFIX + "/static/"):
            response.headers["Cache-Control"] = "public, max-age=3600"
        else:
            response.headers["Cache-Control"] = "no-store"
        return response

    async def _authenticated(self, request: web.Request,
                             handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PUBLIC):
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, given = header.partition(" ")
            if scheme.lower() == "bearer" and self.auth.token_matches(given.strip()):
                return await handler(request)
            await self.throttle.failed()
            return _unauthorized("wrong token")
        cookie = request.cookies.get(COOKIE)
        if cookie and self.auth.session_valid(cookie):
            return await handler(request)
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            return _see_other(f"{PREFIX}/login?" + urlencode({"next": request.path_qs}))
        return _unauthorized("log in at /console/login or send Authorization: Bearer <token>")

    # --- rendering ---------------------------------------------------------------------------

    def _source(self, request: web.Request) -> ConsoleSource:
        sources = self.sources()
        name = request.query.get("site")
        chosen = next((s for s in sources if s.name == name), None) if name else (
            sources[0] if sources else None)
        if chosen is None:
            raise web.HTTPNotFound(text="no such site (see the site selector)")
        return chosen

    def _render(self, request: web.Request, template: str, status: int = 200,
                source: ConsoleSource | None = None, **context: Any) -> web.Response:
        names = [s.name for s in self.sources()]
        session = _session(request)
        site = source.name if source is not None and len(names) > 1 else None
        page = self.env.get_template(template).render(
            sites=names if len(names) > 1 else [], site=site,
            csrf=self.auth.csrf_token(session) if session else "",
            logged_in=session is not None, read_only=self.read_only,
            link=_linker(site), **context)
        return web.Response(text=page, status=status, content_type="text/html")

    # --- pages -------------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.StreamResponse:
        source = self._source(request)
        view = await data.overview(source)
        return self._render(request, "overview.html", source=source, view=view, now=view.now,
                            totals=view.totals(), active="overview")

    async def deliveries(self, request: web.Request) -> web.StreamResponse:
        source = self._source(request)
        filters, problems = data.parse_filters(request.query)
        before, after = _int(request.query.get("before")), _int(request.query.get("after"))
        page = await data.deliveries(source, filters, before, after)
        now = page.rows[0].now if page.rows else datetime.now(UTC)
        urls = sorted({u for _, u in source.config.webhooks.subscriptions()})
        return self._render(
            request, "deliveries.html", source=source, page=page, filters=filters,
            problems=problems, now=now, states=data.STATES, event_types=ALL_EVENTS,
            urls=urls, replayed=request.query.get("replayed"), active="deliveries",
            here=request.path_qs)

    async def event(self, request: web.Request) -> web.StreamResponse:
        source = self._source(request)
        try:
            event_id = uuid.UUID(request.match_info["event_id"])
        except ValueError:
            return self._render(request, "error.html", 404, source, title="Not found",
                                message="That is not an event id (a UUID).")
        found = await data.event(source, event_id)
        if found is None:
            return self._render(request, "error.html", 404, source, title="Not found",
                                message=f"No event {event_id} in this database (pruned?).")
        sent = payload.Event(str(found.event.event_id), found.event.event_type,
                             found.event.created_at, found.event.info or "{}",
                             found.event.previous)
        raw = payload.body(sent)
        headers, extra = _shown_headers(sent, raw, source,
                                        [d.url for d in found.deliveries])
        return self._render(
            request, "event.html", source=source, page=found, now=found.event.now,
            raw=raw.decode("utf-8"), pretty=json.dumps(json.loads(raw), indent=2,
                                                       ensure_ascii=False),
            headers=headers, extra_headers=extra, active="deliveries")

    # --- actions -----------------------------------------------------------------------------

    async def replay(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        session = _session(request)
        if session is not None and not self.auth.csrf_valid(session, str(form.get("csrf", ""))):
            return _plain(403, "missing or wrong CSRF token: reload the page and try again")
        if self.read_only:
            return _plain(403, "the console is read-only (observe.console_read_only)")
        source = self._source(request)
        selection, problem = await _selection(source, form)
        if selection is None:
            return _plain(400, problem)
        try:
            result = await data.replay(source, selection)
        except BridgeError as exc:
            log.warning("console: replay failed: %s", exc)
            return _plain(503, f"replay failed: {exc}")
        log.info("console: replay re-queued %d and created %d deliver%s", result.requeued,
                 result.created, "y" if result.queued == 1 else "ies")
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response({"requeued": result.requeued, "created": result.created,
                                      "unknown_event_ids": [str(u) for u in
                                                            result.unknown_event_ids]})
        back = _back_to(str(form.get("return_to", "")), selection, request.query.get("site"))
        return _see_other(_with_param(back, "replayed", str(result.queued)))

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        return self._render(request, "login.html", next=_safe_next(request.query.get("next")),
                            error=None)

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        nxt = _safe_next(str(form.get("next", "")))
        if not self.auth.token_matches(str(form.get("token", ""))):
            await self.throttle.failed()
            log.warning("console: failed login from %s", request.remote)
            return self._render(request, "login.html", 401, next=nxt,
                                error="That token is not right.")
        response = _see_other(nxt)
        response.set_cookie(COOKIE, self.auth.new_session(), max_age=SESSION_SECONDS,
                            path=PREFIX, httponly=True, samesite="Strict",
                            secure=request.secure)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        session = request.cookies.get(COOKIE, "")
        if session and not self.auth.csrf_valid(session, str(form.get("csrf", ""))):
            return _plain(403, "missing or wrong CSRF token")
        response = _see_other(PREFIX + "/login")
        response.del_cookie(COOKIE, path=PREFIX)
        return response


# --- helpers -----------------------------------------------------------------------------------


def _unauthorized(reason: str) -> web.Response:
    return web.Response(status=401, text=f"401 Unauthorized: {reason}\n",
                        headers={"WWW-Authenticate": 'Bearer realm="qlm-bridge console"'})


def _session(request: web.Request) -> str | None:
    """The session cookie of a request the middleware let in by cookie; None for Bearer (and
    the login page), which needs no CSRF token."""
    if "Authorization" in request.headers:
        return None
    return request.cookies.get(COOKIE)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=f"{status}: {text}\n")


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _safe_next(text: str | None) -> str:
    """Only console paths (never another site) after logging in."""
    if text and (text == PREFIX or text.startswith(PREFIX + "/") or
                 text.startswith(PREFIX + "?")) and "//" not in text and "\\" not in text:
        return text
    return PREFIX


def _back_to(return_to: str, selection: ops.ReplayFilter, site: str | None) -> str:
    """Where a replay redirects: the list the form came from, else the replayed event's rows."""
    if return_to.startswith(PREFIX + "/deliveries"):
        return return_to
    query = {"event_id": str(selection.event_ids[0]) if len(selection.event_ids) == 1 else "",
             "site": site or ""}
    return PREFIX + "/deliveries?" + urlencode({k: v for k, v in query.items() if v})


def _with_param(path: str, name: str, value: str) -> str:
    parts = urlsplit(path)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != name] + [(name, value)]
    return parts._replace(query=urlencode(query)).geturl()


def _linker(site: str | None) -> Callable[..., str]:
    """link('/deliveries', state='failed') -> '/console/deliveries?state=failed[&site=..]'."""

    def link(path: str, **params: Any) -> str:
        query = {k: str(v) for k, v in params.items() if v not in (None, "")}
        if site is not None:
            query["site"] = site
        return PREFIX + path + ("?" + urlencode(query) if query else "")

    return link


def _shown_headers(event: payload.Event, raw: bytes, source: ConsoleSource,
                   urls: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The request headers as sent, with the signatures described (never computed here), and
    per URL the names of the headers webhooks.endpoints adds (values not shown: they are often
    credentials)."""
    wh = source.config.webhooks
    policies = [policy_for(wh, url) for url in urls]
    shown = list(payload.headers(event, raw, UNSIGNED).items())
    if wh.secret_key or any(p.signer.secrets for p in policies):
        shown.append(("X-QLM-Signature", "(SHA-256 of the body and the secret key; not shown)"))
        if wh.standard_webhooks:
            shown += [("webhook-id", event.event_id),
                      ("webhook-timestamp", "(the time of each attempt)"),
                      ("webhook-signature", "(v1,<HMAC-SHA256>, one per secret; not shown)")]
    extra = [(redact_url(url), ", ".join(name for name, _ in p.headers))
             for url, p in zip(urls, policies, strict=True) if p.headers]
    return shown, extra


async def _selection(source: ConsoleSource,
                     form: Any) -> tuple[ops.ReplayFilter | None, str]:
    """What a replay form asks for: chosen event ids, or the list's current filter."""
    ids: list[uuid.UUID] = []
    for text in form.getall("event_id", []):
        try:
            ids.append(uuid.UUID(str(text)))
        except ValueError:
            return None, f"event_id: {str(text)!r} is not a UUID"
    if form.get("scope") != "filter":
        if not ids:
            return None, "choose at least one event (event_id) or send scope=filter"
        return ops.ReplayFilter(event_ids=tuple(ids), only_states=("failed", "skipped",
                                                                   "delivered")), ""
    filters, problems = data.parse_filters({k: str(v) for k, v in form.items()
                                            if k != "event_id"})
    if problems:
        return None, "; ".join(problems)
    return await _filter_selection(source, filters)


async def _filter_selection(source: ConsoleSource,
                            f: Filters) -> tuple[ops.ReplayFilter | None, str]:
    if f.is_empty() or f.params().keys() <= {"state"}:
        return None, "replaying by filter needs a filter besides state (url, event type, ...)"
    if f.state == "pending":
        return None, "pending deliveries are queued already"
    ids: tuple[uuid.UUID, ...] = (f.event_id,) if f.event_id else ()
    if f.key:
        found = await data.key_event_ids(source, f.key)
        if not found:
            return None, f"no events for key {f.key!r}"
        ids = tuple(found) if not ids else tuple(i for i in ids if i in found)
    only = (f.state,) if f.state else ("failed", "skipped")
    return ops.ReplayFilter(event_ids=ids, urls=(f.url,) if f.url else (),
                            event_types=(f.event_type,) if f.event_type else (),
                            since=f.since, only_states=only), ""
