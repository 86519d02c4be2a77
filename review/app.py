"""The review web app: routes, the token check for writing verdicts, the confined heatmap files, the summary charts.

Reading needs no login on loopback; a server that listens beyond it is ``private``: every page and heatmap needs the
token too. Writing a verdict needs the token of NEURON_REVIEW_TOKEN, sent as ``Authorization: Bearer``,
as a ``token`` form field, or as the cookie the sign-in form sets (HttpOnly, SameSite=Strict, holding a keyed hash of
the token, not the token). Without a configured token the app is read-only. Heatmaps are addressed by prediction id;
the stored path is looked up, mapped to this host and served only when it resolves inside one of the heatmap folders
the runs recorded (``HeatmapFolders``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from db import audit
from db import review as queries
from db.monitor import RECENT_DAYS, REFERENCE_DAYS, day_window, monitor
from db.store import Database
from neuron.drift import ALPHA, DriftReport, prometheus_text
from neuron.settings import Settings
from neuron.work import POSITIVE

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
TOKEN_COOKIE = "neuron_review"
REVIEWER_COOKIE = "neuron_reviewer"
SUMMARY_TTL_S = 60.0
READ_ONLY = ("this review server is read-only: no token is configured. Set NEURON_REVIEW_TOKEN in the environment of "
             "`neuron review` and restart it to record verdicts")
SECURITY_HEADERS = {
    # every script, style and image comes from this server; nothing may frame the page
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ReviewConfig:
    database: Database
    settings: Settings
    token: str | None  # None: read-only
    private: bool = False  # reading needs the token too (a server that listens beyond loopback)

    @property
    def writable(self) -> bool:
        return bool(self.token)

    def cookie_value(self) -> str:
        """What the sign-in cookie holds: a keyed hash of the token, so the cookie does not carry the token itself."""
        assert self.token
        return hmac.new(self.token.encode(), b"neuron-review-cookie", hashlib.sha256).hexdigest()


def _templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.1f}%"
    env.filters["num"] = lambda v, d=3: "" if v is None else f"{v:.{d}f}"
    env.filters["when"] = lambda v: "" if v is None else v.strftime("%Y-%m-%d %H:%M")
    env.filters["short"] = lambda v, n=12: "" if v is None else (v if len(v) <= n else v[:n] + "\u2026")
    env.globals["positive"] = POSITIVE  # the one operating point, as in the views
    return Jinja2Templates(env=env)


def _safe_next(value: str | None) -> str:
    """Only a path on this server (no scheme, no host, no '//' that a browser reads as another host)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    return value if not parts.scheme and not parts.netloc else "/"


PRIVATE = ("this review server listens beyond loopback, so reading needs the review token too: sign in at the top "
           "of the page with your name and the value of NEURON_REVIEW_TOKEN")


class HeatmapFolders:
    """Where heatmaps may be served from: the folders the screening runs and workers wrote into, as they recorded
    them in the database (mapped to this host), and the review's own --heatmap-dir. The file a finding records is
    served only when it resolves inside one of them; a request never names a path. Read again when a file is not
    inside the folders known so far (a run started after the review may have added one), at most once a second."""

    def __init__(self, database: Database, settings: Settings, clock=time.monotonic):
        self.database, self.settings, self.clock = database, settings, clock
        self.roots: tuple[Path, ...] = ()
        self._read_at = float("-inf")
        self._read()

    def _read(self) -> None:
        recorded = [Path(self.settings.to_local(p)).resolve() for p in self.database.heatmap_folders()]
        self.roots = tuple(dict.fromkeys([self.settings.heatmap_dir.resolve(), *recorded]))
        self._read_at = self.clock()

    def holds(self, path: Path) -> bool:
        if any(path.is_relative_to(root) for root in self.roots):
            return True
        if self.clock() - self._read_at >= 1.0:
            self._read()
            return any(path.is_relative_to(root) for root in self.roots)
        return False


def create_app(database: Database, settings: Settings, token: str | None, private: bool = False) -> Starlette:
    """``private``: every page and heatmap needs the token (sign-in cookie or Bearer), not only verdicts; for a server
    that other machines reach (``neuron review --host`` other than loopback)."""
    if private and not token:
        raise ValueError("a private review server needs a token to sign in with")
    config = ReviewConfig(database, settings, token or None, private)
    templates = _templates()
    folders = HeatmapFolders(database, settings)

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        context.update(writable=config.writable, signed_in=_signed_in(request),
                       reviewer=request.cookies.get(REVIEWER_COOKIE, ""), here=str(request.url.path) + (
                           f"?{request.url.query}" if request.url.query else ""))
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def error(request: Request, status: int, message: str) -> HTMLResponse:
        return page(request, "error.html", status=status, status_code=status, message=message)

    def _signed_in(request: Request) -> bool:
        cookie = request.cookies.get(TOKEN_COOKIE)
        return bool(config.writable and cookie and hmac.compare_digest(cookie.encode(), config.cookie_value().encode()))

    def _bearer(request: Request) -> str:
        """The token of an ``Authorization: Bearer`` header, or ''."""
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else ""

    def _is_token(supplied: str) -> bool:
        return bool(supplied) and hmac.compare_digest(supplied.encode(), config.token.encode())

    def _authorized(request: Request, form: FormData) -> str | None:
        """None when the request may write; else why not (the 403 page's message)."""
        if not config.writable:
            return READ_ONLY
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            return f"a verdict from another site ({origin}) is refused"
        supplied = _bearer(request) or str(form.get("token") or "")
        if supplied:
            if _is_token(supplied):
                return None
            return "the token is wrong; type the value of NEURON_REVIEW_TOKEN into the sign-in form"
        if _signed_in(request):
            return None
        return ("writing a verdict needs the review token: sign in at the top of the page with the value of "
                "NEURON_REVIEW_TOKEN")

    def _may_read(request: Request) -> bool:
        return not config.private or _signed_in(request) or _is_token(_bearer(request))

    def guarded(handler):
        """Pages and heatmaps of a private server answer 401 (with the sign-in form) until the reader signs in."""
        def guard(request: Request) -> Response:
            if not _may_read(request):
                return error(request, 401, PRIVATE)
            return handler(request)
        return guard

    def actor(request: Request, who: str | None = None) -> audit.Actor:
        """Who is reading or writing: the name given (a verdict, a sign-in), else the signed-in reviewer, else the
        holder of the token (a script), else "loopback" (reading needs no sign-in only on this machine)."""
        if who is None:
            if _signed_in(request):
                who = request.cookies.get(REVIEWER_COOKIE) or "signed-in reviewer"
            elif config.writable and _is_token(_bearer(request)):
                who = "token holder"
            else:
                who = "loopback"
        return audit.Actor(who.strip() or "loopback", request.client.host if request.client else None)

    def worklist(request: Request) -> Response:
        try:
            f = queries.WorklistFilter.from_query(request.query_params)
        except queries.FilterError as exc:
            return error(request, 400, str(exc))
        result = queries.worklist(config.database, f)
        prev_link = f"?{urlencode(f.as_query(page=f.page - 1))}" if f.page > 1 else None
        next_link = f"?{urlencode(f.as_query(page=f.page + 1))}" if result.has_next else None
        return page(request, "worklist.html", result=result, f=f, labels=queries.labels(config.database),
                    prev_link=prev_link, next_link=next_link)

    def study(request: Request) -> Response:
        detail = queries.study_detail(config.database, request.path_params["study_uid"])
        if detail is None:
            return error(request, 404, "no study with this Study Instance UID in the database")
        audit.record(config.database, audit.Event(actor(request), audit.Action.VIEW_STUDY,
                                                   detail.study.study_instance_uid))
        return page(request, "study.html", d=detail, study=detail.study)

    cached: dict = {}  # "data": the summary; a monitoring query: its drift report

    def summary(request: Request) -> Response:
        """The aggregates pass over every predictions row (2.3 s on 1,000,000 rows with SQLite), so one computation
        serves every request for SUMMARY_TTL_S seconds."""
        now = time.monotonic()
        if "data" not in cached or now - cached["data"][0] > SUMMARY_TTL_S:
            cached["data"] = (now, queries.summary(config.database))
        data = cached["data"][1]
        return page(request, "summary.html", s=data, charts=charts(data),
                    review_threshold=config.settings.review_threshold)

    def _heatmap_file(request: Request, shown: str) -> Path:
        ref = queries.heatmap_of(config.database, request.path_params["prediction_id"])
        if ref is None or ref.path is None:
            raise HTTPException(404, "this finding has no heatmap")
        path = Path(config.settings.to_local(ref.path)).resolve()
        if not folders.holds(path) or not path.is_file():
            # a path outside the folders (a tampered row, a symbolic link out) is answered like a missing one
            log.warning("heatmap of finding %s is not a file inside the heatmap folders (%s); not served",
                        request.path_params["prediction_id"], ", ".join(map(str, folders.roots)))
            raise HTTPException(404, "heatmap not found in the heatmap folders")
        audit.record(config.database, audit.Event(
            actor(request), audit.Action.VIEW_HEATMAP, ref.study_instance_uid,
            target=f"finding {request.path_params['prediction_id']} ({ref.label}), {shown}"))
        return path

    def heatmap(request: Request) -> Response:
        return FileResponse(_heatmap_file(request, "heatmap"), media_type="image/png",
                            headers={"Cache-Control": "private, max-age=3600", **SECURITY_HEADERS})

    def heatmap_gray(request: Request) -> Response:
        """The overlay without its colours: the base layer the opacity slider fades the coloured overlay over (the
        plain model-input image is not stored; this is the overlay's luminance, and the page says so)."""
        import cv2

        image = cv2.imread(str(_heatmap_file(request, "heatmap in grayscale")), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise HTTPException(404, "heatmap is not a readable PNG")
        ok, png = cv2.imencode(".png", image)
        return Response(png.tobytes(), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600", **SECURITY_HEADERS})

    async def sign_in(request: Request) -> Response:
        form = await request.form()
        if not config.writable:
            return error(request, 403, READ_ONLY)
        reviewer = str(form.get("reviewer") or "").strip()[:queries.MAX_REVIEWER]
        if not _is_token(str(form.get("token") or "")):
            audit.record(config.database, audit.Event(actor(request, reviewer or "unnamed"), audit.Action.SIGN_IN,
                                                      outcome="failure", detail="wrong token"))
            return error(request, 403, "the token is wrong; type the value of NEURON_REVIEW_TOKEN")
        audit.record(config.database, audit.Event(actor(request, reviewer or "unnamed"), audit.Action.SIGN_IN))
        response = RedirectResponse(_safe_next(str(form.get("next") or "/")), status_code=303)
        response.set_cookie(TOKEN_COOKIE, config.cookie_value(), httponly=True, samesite="strict", path="/")
        if reviewer:
            response.set_cookie(REVIEWER_COOKIE, reviewer, httponly=True, samesite="strict", path="/")
        return response

    async def sign_out(request: Request) -> Response:
        form = await request.form()
        response = RedirectResponse(_safe_next(str(form.get("next") or "/")), status_code=303)
        response.delete_cookie(TOKEN_COOKIE, path="/")
        return response

    async def verdict(request: Request) -> Response:
        form = await request.form()
        refused = _authorized(request, form)
        if refused is not None:
            return error(request, 403, refused)
        reviewer = str(form.get("reviewer") or request.cookies.get(REVIEWER_COOKIE) or "")
        prediction_id = request.path_params["prediction_id"]
        try:
            stored = queries.add_verdict(config.database, prediction_id, str(form.get("verdict") or ""), reviewer,
                                         str(form.get("note") or ""))
        except queries.VerdictError as exc:
            return error(request, 400, str(exc))
        audit.record(config.database, audit.Event(
            actor(request, reviewer), audit.Action.VERDICT, stored.study_instance_uid,
            target=f"finding {prediction_id} ({stored.label})", detail=f"verdict {form.get('verdict')}"))
        log.info("verdict %s recorded on finding %s", stored.id, prediction_id)
        if request.headers.get("authorization"):  # a script, not the page: no redirect to follow
            return Response(f"verdict {stored.id} recorded\n", status_code=201, media_type="text/plain")
        response = RedirectResponse(f"/study/{stored.study_instance_uid}#finding-{prediction_id}", status_code=303)
        response.set_cookie(REVIEWER_COOKIE, reviewer.strip()[:queries.MAX_REVIEWER], httponly=True,
                            samesite="strict", path="/")
        return response

    def drift(request: Request) -> tuple[DriftReport | None, str | None]:
        """The drift report for the query's windows (``db.monitor``), one computation per minute per query."""
        params = request.query_params
        try:
            key, kwargs = monitor_query(params)
        except ValueError as exc:
            return None, str(exc)
        now = time.monotonic()
        if key not in cached or now - cached[key][0] > SUMMARY_TTL_S:
            cached[key] = (now, monitor(config.database, **kwargs))
        return cached[key][1], None

    def monitoring(request: Request) -> Response:
        report, problem = drift(request)
        if problem is not None:
            return error(request, 400, problem)
        return page(request, "monitoring.html", r=report, params=request.query_params)

    def metrics(request: Request) -> Response:
        report, problem = drift(request)
        if problem is not None:
            return Response(problem + "\n", status_code=400, media_type="text/plain")
        return Response(prometheus_text(report), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error(request, exc.status_code, exc.detail)

    routes = [
        Route("/", guarded(worklist)),
        Route("/study/{study_uid}", guarded(study)),
        Route("/summary", guarded(summary)),
        Route("/monitoring", guarded(monitoring)),
        Route("/metrics", guarded(metrics)),
        Route("/heatmap/{prediction_id:int}", guarded(heatmap)),
        Route("/heatmap/{prediction_id:int}/gray", guarded(heatmap_gray)),
        Route("/signin", sign_in, methods=["POST"]),
        Route("/signout", sign_out, methods=["POST"]),
        Route("/finding/{prediction_id:int}/verdict", verdict, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.config = config
    return app


def monitor_query(params) -> tuple[tuple, dict]:
    """The Monitoring page's query (``recent_days``, ``reference_days``, ``reference_from``/``reference_to``,
    ``recent_from``/``recent_to`` as YYYY-MM-DD, ``alpha``) as ``db.monitor.monitor`` arguments; ValueError naming a
    bad value and its form."""
    from datetime import date

    def number(key: str, kind, default):
        raw = (params.get(key) or "").strip()
        if not raw:
            return default
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r} is not a number; e.g. {key}={default}") from None

    def window(prefix: str):
        first, last = (params.get(f"{prefix}_from") or "").strip(), (params.get(f"{prefix}_to") or "").strip()
        if not first and not last:
            return None
        try:
            return day_window(date.fromisoformat(first), date.fromisoformat(last))
        except ValueError:
            raise ValueError(f"{prefix}_from={first!r} and {prefix}_to={last!r} must both be dates (YYYY-MM-DD), "
                             f"the first not after the second") from None

    kwargs = {"recent_days": number("recent_days", int, RECENT_DAYS),
              "reference_days": number("reference_days", int, REFERENCE_DAYS),
              "alpha": number("alpha", float, ALPHA), "reference": window("reference"), "recent": window("recent")}
    if kwargs["recent_days"] < 1 or kwargs["reference_days"] < 1 or not 0 < kwargs["alpha"] < 1:
        raise ValueError("recent_days and reference_days are whole days (1 or more), alpha is between 0 and 1")
    return tuple(sorted((k, str(v)) for k, v in kwargs.items())), kwargs


# -- summary charts: plain geometry for inline SVG (no JavaScript, no plotting library) ------------------------------
@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


def charts(data: queries.SummaryData) -> dict:
    """Coordinates of the summary page's three charts in SVG user units; the template only draws them."""
    # positives per label per day: one cell per (label, day), darker for more
    peak = max(data.positives.values(), default=0)
    cells = [{"x": 140 + j * 34, "y": 20 + i * 20, "n": data.positives.get((label, d), 0),
              "shade": 0.08 + 0.92 * data.positives.get((label, d), 0) / peak if peak else 0.0}
             for i, label in enumerate(data.labels) for j, d in enumerate(data.days)]
    grid = {"cells": cells, "width": 150 + 34 * len(data.days), "height": 40 + 20 * max(1, len(data.labels)),
            "days": [{"x": 140 + j * 34 + 15, "text": d.strftime("%m-%d")} for j, d in enumerate(data.days)],
            "labels": [{"y": 20 + i * 20 + 13, "text": label} for i, label in enumerate(data.labels)]}
    # the uncertainty histogram
    most = max((n for _, _, n in data.histogram), default=0) or 1
    width = 600 / max(1, len(data.histogram))
    bars = [Bar(40 + i * width, 20 + 180 * (1 - n / most), width - 2, 180 * n / most, f"{lo:.3f}-{hi:.3f}: {n}")
            for i, (lo, hi, n) in enumerate(data.histogram)]
    top = data.histogram[-1][1] if data.histogram else 0.0
    histogram = {"bars": bars, "most": most, "top": top}
    # agreement: one horizontal bar per label, full width = 100 %
    agreement = [Bar(140, 10 + i * 24, 400 * (a / n if n else 0), 18, f"{label}: {a} of {n} agree")
                 for i, (label, a, n) in enumerate(data.agreement)]
    return {"grid": grid, "histogram": histogram, "agreement": agreement,
            "agreement_height": 20 + 24 * max(1, len(data.agreement))}
