"""The console's pages and actions (FastAPI), rendered with Jinja2 from `bot/i18n` catalogs.

Every page but /login, /healthz and /static needs a session; every POST needs the session's
CSRF token (a form field, or the X-CSRF-Token header htmx sends). The console reads and acts
only through `Services` and the store's console section.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode
from zoneinfo import ZoneInfo

import jinja2
from fastapi import FastAPI, Request, Response
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
)
from fastapi.staticfiles import StaticFiles

from adapters.console import metrics, views
from adapters.console.auth import COOKIE, LoginLimiter, Session, Signer, password_matches
from adapters.console.logbuffer import LogBuffer
from bot.config import Settings, is_loopback_host
from bot.i18n import LANGUAGES, t
from bot.jobs import today
from bot.platform import Connection
from bot.secrets import mask_key
from bot.services import Services
from bot.store import NotFoundError, StoreError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
LANG_COOKIE = "drawbridge_console_lang"
RANGES = {"24h": 24 * 3600, "7d": 7 * 86400, "30d": 30 * 86400}
# Seconds the overview of a range is reused: the long ranges read every job of a week or a
# month (about 2 s for 100,000 jobs here, bench/console.py), and change little in a minute.
# The last 24 h and "now" are always read afresh.
OVERVIEW_CACHE = {"24h": 0.0, "7d": 30.0, "30d": 60.0}
PAGE_SIZE = 50
MAX_GRANT = 1_000_000_000

Handler = Callable[[Request, Session], Awaitable[Response]]


class Console:
    """The console web app for one process: `app` is what uvicorn serves."""

    def __init__(self, settings: Settings, services: Services, logs: LogBuffer) -> None:
        self.settings = settings
        self.services = services
        self.logs = logs
        self.signer = Signer()
        self.limiter = LoginLimiter()
        self.secure = settings.console_url.lower().startswith("https://")
        self.overview_cache = dict(OVERVIEW_CACHE)
        self._overviews: dict[str, tuple[float, dict[str, Any]]] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = self._when
        self.app = self._build()

    # --- plumbing ---

    def _build(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
        app.add_api_route("/healthz", self.healthz, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_api_route("/login", self.login_page, methods=["GET"])
        app.add_api_route("/login", self.login, methods=["POST"])
        app.add_api_route("/login/link", self.link_page, methods=["GET"])
        app.add_api_route("/login/link", self.link_login, methods=["POST"])
        pages: dict[str, Handler] = {
            "/": self.overview,
            "/partials/now": self.now_partial,
            "/partials/totals": self.totals_partial,
            "/jobs": self.jobs,
            "/jobs/{job_id}": self.job,
            "/users": self.users,
            "/groups": self.groups,
            "/jobs/{job_id}/files/{name}": self.job_file,
            "/ledger": self.ledger,
            "/ledger.csv": self.ledger_csv,
            "/providers": self.providers,
            "/settings": self.settings_page,
            "/logs": self.logs_page,
            "/partials/logs": self.logs_partial,
        }
        for path, handler in pages.items():
            app.add_api_route(path, self._page(handler), methods=["GET"])
        actions: dict[str, Handler] = {
            "/logout": self.logout,
            "/lang": self.set_lang,
            "/jobs/{job_id}/refund": self.refund,
            "/providers/doctor": self.doctor,
            "/users/{user_id}/grant": self.grant,
            "/users/{user_id}/allowance": self.allowance,
            "/users/{user_id}/ban": self.ban,
            "/users/{user_id}/unban": self.unban,
        }
        for path, handler in actions.items():
            app.add_api_route(path, self._action(handler), methods=["POST"])
        return app

    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            session = self.signer.load(request.cookies.get(COOKIE))
            if session is None or not session.logged_in:
                if request.headers.get("HX-Request"):
                    return Response(status_code=401)
                return RedirectResponse("/login", status_code=303)
            return await handler(request, session)

        return page

    def _action(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def action(request: Request) -> Response:
            session = self.signer.load(request.cookies.get(COOKIE))
            if session is None or not session.logged_in:
                return PlainTextResponse("login required", status_code=401)
            form = await _form(request)
            request.state.form = form
            if not _csrf_ok(request, form, session):
                return PlainTextResponse("CSRF token missing or wrong", status_code=403)
            return await handler(request, session)

        return action

    def _cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.signer.dump(session),
            max_age=int(session.expires - time.time()),
            httponly=True,
            samesite="strict",
            secure=self.secure,
            path="/",
        )

    def lang_of(self, request: Request) -> str:
        lang = request.cookies.get(LANG_COOKIE, "")
        return lang if lang in LANGUAGES else self.settings.default_lang

    def render(
        self,
        request: Request,
        session: Session | None,
        template: str,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        lang = self.lang_of(request)

        def tr(key: str, **params: Any) -> str:
            return t(lang, "console." + key, **params)

        body = self.env.get_template(template).render(
            t=tr,
            lang=lang,
            languages=LANGUAGES,
            csrf=session.csrf if session else "",
            who=session.who if session else "",
            path=request.url.path,
            **context,
        )
        return HTMLResponse(body, status_code=status_code)

    def _when(self, stamp: float | None) -> str:
        if stamp is None:
            return ""
        zone = ZoneInfo(self.settings.timezone)
        return datetime.fromtimestamp(stamp, zone).strftime("%Y-%m-%d %H:%M:%S")

    def actor(self, session: Session) -> str:
        return session.who

    async def actor_user_id(self, session: Session) -> int | None:
        # A one-time-link login is an admin's own account: grants name them in the ledger.
        platform, sep, user_id = session.who.partition(":")
        if not sep or platform == "password":
            return None
        user = await self.services.store.find_user(platform, f"{platform}:{user_id}")
        return user.id if user else None

    # --- open endpoints ---

    async def healthz(self, request: Request) -> Response:
        # Each configured chat platform says whether it is connected now (a OneBot client
        # gone, Telegram polling failing, Discord's gateway reconnecting): 503 while any is
        # not, so Docker or Kubernetes see it. With none configured the console alone is up.
        platforms: dict[str, dict[str, Any]] = {}
        for name in self.settings.chat_platforms():
            platform = self.services.platforms.get(name)
            state = platform.connection() if platform else Connection(False, "not started")
            platforms[name] = {"connected": state.connected, "detail": state.detail}
        up = all(state["connected"] for state in platforms.values())
        return JSONResponse(
            {"status": "ok" if up else "disconnected", "platforms": platforms},
            status_code=200 if up else 503,
        )

    async def metrics(self, request: Request) -> Response:
        token = self.settings.metrics_token
        if token:
            given = request.headers.get("Authorization", "")
            if not password_matches(given, f"Bearer {token}"):
                return PlainTextResponse(
                    "bearer token required", status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        elif not is_loopback_host(self.settings.console_host):
            # Without a token, a console reachable from elsewhere shows metrics to its
            # logged-in operators only.
            session = self.signer.load(request.cookies.get(COOKIE))
            if session is None or not session.logged_in:
                return PlainTextResponse("login or DRAWBRIDGE_METRICS_TOKEN required", 401)
        body, content_type = await metrics.render(self.services)
        return Response(body, media_type=content_type)

    async def login_page(self, request: Request) -> Response:
        session = self.signer.load(request.cookies.get(COOKIE))
        if session is not None and session.logged_in:
            return RedirectResponse("/", status_code=303)
        session = session or self.signer.new()
        response = self.render(request, session, "login.html", error="")
        self._cookie(response, session)
        return response

    async def login(self, request: Request) -> Response:
        address = request.client.host if request.client else "?"
        wait = self.limiter.blocked(address)
        if wait:
            log.warning("console: login refused for %s: too many failed attempts", address)
            return PlainTextResponse(
                "too many failed logins; try again later",
                status_code=429,
                headers={"Retry-After": str(int(wait))},
            )
        session = self.signer.load(request.cookies.get(COOKIE))
        form = await _form(request)
        if session is None or not _csrf_ok(request, form, session):
            return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        if not password_matches(form.get("password", ""), self.settings.console_password):
            self.limiter.failed(address)
            log.warning("console: wrong password from %s", address)
            return self.render(request, session, "login.html", status_code=401, error="login.wrong")
        self.limiter.succeeded(address)
        who = f"password@{address}"
        await self.services.store.audit(who, "login")
        log.info("console: %s logged in", who)
        fresh = self.signer.new(who)
        response = RedirectResponse("/", status_code=303)
        self._cookie(response, fresh)
        return response

    async def link_page(self, request: Request) -> Response:
        # Only shows a button: link previews (Telegram fetches URLs sent in chats) must not
        # use up the one-time token, so it is spent by the POST alone.
        session = self.signer.load(request.cookies.get(COOKIE)) or self.signer.new()
        response = self.render(
            request,
            session,
            "login.html",
            error="",
            action="/login/link",
            link_token=request.query_params.get("token", ""),
        )
        self._cookie(response, session)
        return response

    async def link_login(self, request: Request) -> Response:
        address = request.client.host if request.client else "?"
        wait = self.limiter.blocked(address)
        if wait:
            return PlainTextResponse(
                "too many failed logins; try again later",
                status_code=429,
                headers={"Retry-After": str(int(wait))},
            )
        session = self.signer.load(request.cookies.get(COOKIE))
        form = await _form(request)
        if session is None or not _csrf_ok(request, form, session):
            return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        who = self.services.console_links.redeem(form.get("token", ""))
        if who is None:
            self.limiter.failed(address)
            log.warning("console: an expired or used login link from %s", address)
            return self.render(
                request,
                session,
                "login.html",
                status_code=401,
                error="login.link_used",
                action="/login",
            )
        self.limiter.succeeded(address)
        await self.services.store.audit(who, "login", detail={"via": "link", "from": address})
        log.info("console: %s logged in with a one-time link", who)
        response = RedirectResponse("/", status_code=303)
        self._cookie(response, self.signer.new(who))
        return response

    # --- actions ---

    async def logout(self, request: Request, session: Session) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def set_lang(self, request: Request, session: Session) -> Response:
        lang = request.state.form.get("lang", "")
        response = RedirectResponse(_back(request), status_code=303)
        if lang in LANGUAGES:
            response.set_cookie(
                LANG_COOKIE, lang, max_age=365 * 86400, samesite="strict", secure=self.secure
            )
        return response

    async def refund(self, request: Request, session: Session) -> Response:
        job_id = int(request.path_params["job_id"])
        try:
            credits = await self.services.store.console_refund(
                job_id,
                actor=self.actor(session),
                by_user_id=await self.actor_user_id(session),
            )
        except NotFoundError:
            return PlainTextResponse("no such job", status_code=404)
        except StoreError as exc:
            return PlainTextResponse(str(exc), status_code=409)
        log.info("console: %s refunded %d credits of job #%d", session.who, credits, job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    async def doctor(self, request: Request, session: Session) -> Response:
        # The free checks only (as `drawbridge doctor` without --spend): nothing is bought.
        from bot import doctor
        from bot.upstream import CapabilityStore

        name = request.state.form.get("provider", "")
        provider = next((p for p in self.settings.providers() if p.name == name), None)
        if provider is None:
            return PlainTextResponse("no such provider", status_code=404)
        store = self.services.store
        report = await doctor.diagnose(
            self.services.http, provider, known=await store.provider_capabilities(name)
        )
        if report.learned:
            await CapabilityStore(store).learn(name, **report.learned)
        await store.audit(session.who, "doctor", name, {"free_ok": report.free_ok})
        log.info("console: %s ran the doctor's free checks on %s", session.who, name)
        rows = await views.providers(self.services)
        return self.render(
            request, session, "providers.html", providers=rows, report=doctor.render([report])
        )

    async def grant(self, request: Request, session: Session) -> Response:
        user_id = int(request.path_params["user_id"])
        try:
            amount = int(request.state.form.get("credits", ""))
        except ValueError:
            return PlainTextResponse("credits must be a whole number", status_code=400)
        if abs(amount) > MAX_GRANT:
            return PlainTextResponse("credits out of range", status_code=400)
        store = self.services.store
        try:
            balance = await store.grant(
                user_id,
                amount,
                by_user_id=await self.actor_user_id(session),
                note=f"console: {session.who}",
            )
        except NotFoundError:
            return PlainTextResponse("no such user", status_code=404)
        await store.audit(
            session.who, "grant", f"#{user_id}", {"credits": amount, "balance": balance}
        )
        log.info("console: %s granted %d credits to user #%d", session.who, amount, user_id)
        return RedirectResponse(_back(request, "/users"), status_code=303)

    async def allowance(self, request: Request, session: Session) -> Response:
        # A whole number gives the account its own daily allowance; blank goes back to
        # DRAWBRIDGE_DAILY_CREDITS.
        user_id = int(request.path_params["user_id"])
        raw = request.state.form.get("allowance", "").strip()
        value: int | None = None
        if raw:
            try:
                value = int(raw)
            except ValueError:
                return PlainTextResponse("allowance must be a whole number", status_code=400)
            if not 0 <= value <= MAX_GRANT:
                return PlainTextResponse("allowance out of range", status_code=400)
        try:
            await self.services.store.set_daily_allowance(user_id, value)
        except NotFoundError:
            return PlainTextResponse("no such user", status_code=404)
        await self.services.store.audit(
            session.who,
            "allowance",
            f"#{user_id}",
            {"allowance": value, "default": self.settings.daily_credits},
        )
        log.info(
            "console: %s set user #%d's daily allowance to %s",
            session.who,
            user_id,
            "the default" if value is None else value,
        )
        return RedirectResponse(_back(request, "/users"), status_code=303)

    async def ban(self, request: Request, session: Session) -> Response:
        return await self._role(request, session, "banned", "ban")

    async def unban(self, request: Request, session: Session) -> Response:
        return await self._role(request, session, "user", "unban")

    async def _role(self, request: Request, session: Session, role: str, action: str) -> Response:
        user_id = int(request.path_params["user_id"])
        try:
            await self.services.store.set_role(user_id, role)
        except NotFoundError:
            return PlainTextResponse("no such user", status_code=404)
        await self.services.store.audit(session.who, action, f"#{user_id}")
        log.info("console: %s: %s user #%d", session.who, action, user_id)
        return RedirectResponse(_back(request, "/users"), status_code=303)

    # --- pages ---

    async def _overview(self, request: Request) -> tuple[str, dict[str, Any]]:
        span = request.query_params.get("range", "24h")
        if span not in RANGES:
            span = "24h"
        cached = self._overviews.get(span)
        if cached is not None and time.monotonic() - cached[0] < self.overview_cache[span]:
            return span, cached[1]
        data = await views.overview(self.services, RANGES[span])
        self._overviews[span] = (time.monotonic(), data)
        return span, data

    async def overview(self, request: Request, session: Session) -> Response:
        span, data = await self._overview(request)
        return self.render(
            request,
            session,
            "overview.html",
            span=span,
            ranges=list(RANGES),
            now=await self.services.store.console_now(),
            data=data,
            amount=views.amount,
            # Inside a <script> element: no "</script>" can close it early.
            chart=json.dumps(data["chart"]).replace("<", "\\u003c"),
        )

    async def totals_partial(self, request: Request, session: Session) -> Response:
        # The overview's cards, polled like "now": a job that finishes shows without a reload.
        span, data = await self._overview(request)
        return self.render(
            request, session, "_totals.html", span=span, data=data, amount=views.amount
        )

    async def now_partial(self, request: Request, session: Session) -> Response:
        return self.render(
            request, session, "_now.html", now=await self.services.store.console_now()
        )

    async def jobs(self, request: Request, session: Session) -> Response:
        filters = {k: v for k, v in request.query_params.items() if k in views.JOB_FILTERS and v}
        page = max(0, _int(request.query_params.get("page"), 0))
        store_filters = views.job_filters(filters, self.settings.timezone)
        jobs, total = await self.services.store.console_jobs(
            store_filters, limit=PAGE_SIZE, offset=page * PAGE_SIZE
        )
        query = urlencode(filters)
        done = await self.services.store.console_upstream_done([job.id for job in jobs])
        rows = [views.job_row(job, done.get(job.id)) for job in jobs]
        files = await asyncio.to_thread(
            views.job_files, [self.services.jobs.job_dir(job.id) for job in jobs]
        )
        for row, names in zip(rows, files, strict=True):
            row["files"] = names
        return self.render(
            request,
            session,
            "jobs.html",
            jobs=rows,
            total=total,
            filters=filters,
            page=page,
            pages=(total + PAGE_SIZE - 1) // PAGE_SIZE,
            query=query,
            statuses=("queued", "running", "succeeded", "failed", "cancelled"),
        )

    async def job(self, request: Request, session: Session) -> Response:
        job_id = _int(request.path_params["job_id"], -1)
        job = await self.services.store.job(job_id)
        if job is None:
            return self.render(request, session, "missing.html", status_code=404)
        user = await self.services.store.find_user(job.platform, f"#{job.user_id}")
        entries, _ = await self.services.store.console_ledger({"job": str(job.id)}, limit=None)
        refunded = any(e["kind"] == "grant" for e in entries) or any(
            a.get("job_id") == job.id and a["action"] == "refund"
            for a in await self.services.store.audit_entries(500)
        )
        done = await self.services.store.console_upstream_done([job.id])
        row = views.job_row(job, done.get(job.id))
        row["files"] = (
            await asyncio.to_thread(views.job_files, [self.services.jobs.job_dir(job.id)])
        )[0]
        return self.render(
            request,
            session,
            "job.html",
            job=row,
            raw=job,
            user=user,
            entries=entries,
            refundable=job.status == "succeeded"
            and job.ledger_state == "committed"
            and job.spent > 0
            and not refunded,
        )

    async def groups(self, request: Request, session: Session) -> Response:
        span = request.query_params.get("range", "30d")
        if span not in RANGES:
            span = "30d"
        rows = await self.services.store.console_groups(
            time.time() - RANGES[span], today(self.settings)
        )
        global_cap = self.settings.group_daily_cap
        for row in rows:
            own = row["cap"]
            caps = [cap for cap in (global_cap, own or 0) if cap > 0]
            row["effective_cap"] = min(caps) if caps else 0
            row["enabled"] = row["enabled"] is None or bool(row["enabled"])
        return self.render(
            request, session, "groups.html", groups=rows, span=span, ranges=list(RANGES)
        )

    async def job_file(self, request: Request, session: Session) -> Response:
        # A job's kept reference or result (DATA_DIR/jobs/<id>/, `DRAWBRIDGE_KEEP_HOURS`), or
        # with ?thumb=1 a small JPEG of it for the tables. Names are the runner's own only.
        name = request.path_params["name"]
        job_id = _int(request.path_params["job_id"], -1)
        if job_id < 0 or not views.JOB_FILE.fullmatch(name):
            return PlainTextResponse("not found", status_code=404)
        path = self.services.jobs.job_dir(job_id) / name
        if request.query_params.get("thumb"):
            data = await asyncio.to_thread(views.thumbnail, path)
            if data is None:
                return PlainTextResponse("not found", status_code=404)
            return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private"})
        if not await asyncio.to_thread(path.is_file):
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "private"})

    async def users(self, request: Request, session: Session) -> Response:
        search = request.query_params.get("q", "")
        rows = await self.services.store.console_users(search, today(self.settings))
        users = []
        for user, used_today, job_count in rows:
            key = await self.services.store.get_api_key(user.id) if user.has_key else None
            users.append(
                {
                    "user": user,
                    "used_today": used_today,
                    "jobs": job_count,
                    # A key this secret cannot decrypt is still bound: shown as unreadable.
                    "key": (mask_key(key) if key else "?") if user.has_key else "",
                    "probe": views.key_probe(user.key_probe) if user.has_key else None,
                    "allowance": (
                        self.settings.daily_credits
                        if user.daily_allowance is None
                        else user.daily_allowance
                    ),
                }
            )
        return self.render(
            request,
            session,
            "users.html",
            users=users,
            q=search,
            daily=self.settings.daily_credits,
            amount=views.amount,
        )

    async def ledger(self, request: Request, session: Session) -> Response:
        filters = {k: v for k, v in request.query_params.items() if k in views.LEDGER_FILTERS and v}
        entries, totals = await self.services.store.console_ledger(
            views.ledger_filters(filters, self.settings.timezone), limit=500
        )
        return self.render(
            request,
            session,
            "ledger.html",
            entries=entries,
            totals=totals,
            filters=filters,
            query=urlencode(filters),
            kinds=("reserve", "commit", "refund", "grant"),
        )

    async def ledger_csv(self, request: Request, session: Session) -> Response:
        filters = {k: v for k, v in request.query_params.items() if k in views.LEDGER_FILTERS and v}
        entries, _ = await self.services.store.console_ledger(
            views.ledger_filters(filters, self.settings.timezone), limit=None
        )
        out = io.StringIO()
        columns = (
            "id",
            "created_at",
            "kind",
            "who",
            "user_id",
            "job_id",
            "daily_amount",
            "balance_amount",
            "day",
            "note",
            "by_user_id",
        )
        writer = csv.writer(out)
        writer.writerow(columns)
        for entry in entries:
            writer.writerow([_csv_cell(entry.get(column)) for column in columns])
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="ledger.csv"'},
        )

    async def providers(self, request: Request, session: Session) -> Response:
        rows = await views.providers(self.services)
        return self.render(request, session, "providers.html", providers=rows, report="")

    async def settings_page(self, request: Request, session: Session) -> Response:
        rows = views.settings_rows(self.settings, os.environ, Path(".env"))
        return self.render(request, session, "settings.html", rows=rows)

    async def logs_page(self, request: Request, session: Session) -> Response:
        level = request.query_params.get("level", "INFO").upper()
        return self.render(
            request,
            session,
            "logs.html",
            level=level,
            levels=views.LOG_LEVELS,
            lines=self.logs.tail(views.level_number(level)),
        )

    async def logs_partial(self, request: Request, session: Session) -> Response:
        level = request.query_params.get("level", "INFO").upper()
        return self.render(
            request, session, "_logs.html", lines=self.logs.tail(views.level_number(level))
        )


async def _form(request: Request) -> dict[str, str]:
    # application/x-www-form-urlencoded only (what our forms and htmx send); parsed here so
    # the console needs no multipart library.
    body = (await request.body())[:65536].decode("utf-8", "replace")
    return {key: values[-1] for key, values in parse_qs(body, keep_blank_values=True).items()}


def _csrf_ok(request: Request, form: dict[str, str], session: Session) -> bool:
    given = form.get("csrf") or request.headers.get("X-CSRF-Token", "")
    return bool(given) and password_matches(given, session.csrf)


def _back(request: Request, default: str = "/") -> str:
    # Only a path on this site: an open redirect would let a link send an operator anywhere.
    target = request.state.form.get("next", "") if hasattr(request.state, "form") else ""
    # Browsers read "/\\host" as "//host": a backslash anywhere is refused too.
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # A cell starting with = + - @ is a formula to a spreadsheet; a note is typed by admins.
    if text[:1] in ("=", "+", "@") or (text[:1] == "-" and not _is_number(text)):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
