"""`engine feedback serve`: a local web app in which reviewers rank sampled responses.

One process: the policy is loaded once (engine/feedback/sampler.py) and a background thread keeps
`ahead` unreviewed items sampled (K responses per prompt), so a reviewer never waits for the model;
Starlette under uvicorn serves one page (page.html, plain HTML and JavaScript, no build step) and a
JSON API:

    GET  /                 the page
    GET  /api/next         the reviewer's pending item, or a newly assigned one (store.py's queue)
    POST /api/judgments    one judgment, committed before the answer (application/json only)
    GET  /api/stats        counts, the sampler's state and inter-reviewer agreement

Security: it binds 127.0.0.1 unless told otherwise, and any other address needs an access token
(`--token` or ENGINE_FEEDBACK_TOKEN), which every request must then carry: an `Authorization: Bearer`
header, or the `?token=` of the first page load, which the server turns into a same-site, HTTP-only
cookie. On a loopback address other Host headers are refused (DNS rebinding). Model output and
reviewer text reach the page only through `textContent`; the page's Content-Security-Policy allows
its own nonce-tagged script and nothing else. No route takes a path: nothing from a request reaches
the file system. State-changing requests are JSON POSTs, which a cross-site form cannot send.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import threading
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import EngineError
from .agreement import agreement
from .sampler import PromptSet, Sampler, SamplingOptions, model_version, open_sampler

if TYPE_CHECKING:
    from ..chat_session import Target
from .store import NewItem, Store, check_reviewer

PAGE = Path(__file__).with_name("page.html")
TOKEN_ENV = "ENGINE_FEEDBACK_TOKEN"
COOKIE = "engine_feedback_token"
MAX_BODY = 256 * 1024
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without an access token."""
    if not is_loopback(host) and not token:
        raise EngineError(
            f"--host {host} makes the app reachable from other machines; give an access token with --token "
            f"or {TOKEN_ENV} (every request must then carry it), or bind 127.0.0.1"
        )


# ---- sampling ahead of the reviewers --------------------------------------------------------------
@dataclass
class Producer:
    """Keeps `ahead` unstarted items in the store, sampling `batch` prompts at a time in a thread."""

    store: Store
    sampler: Sampler
    prompts: PromptSet
    model_id: int
    k: int
    ahead: int = 8
    batch: int = 4
    overlap: float = 0.0
    state: str = "starting"
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.index = self.store.next_prompt_index(self.prompts.name, "human")
        self.thread = threading.Thread(target=self._loop, name="feedback-sampler", daemon=True)

    @property
    def exhausted(self) -> bool:
        return self.index >= len(self.prompts.rows)

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                if self.exhausted or self.store.unstarted() >= self.ahead:
                    self.state = "every prompt sampled" if self.exhausted else "ready"
                    self.wake.wait(timeout=2.0)
                    self.wake.clear()
                    continue
                self.state = "sampling"
                self.sample_batch()
        except Exception as exc:  # shown on the page; the judgments already made are safe in the store
            traceback.print_exc()
            self.state = f"failed: {type(exc).__name__}: {exc}"

    def sample_batch(self) -> None:
        first = self.index
        rows = self.prompts.rows[first : first + self.batch]
        self.index = first + len(rows)
        encoded = [(first + i, row, self.sampler.encode(row.prompt)) for i, row in enumerate(rows)]
        fitting = [(i, row, tokens) for i, row, tokens in encoded if tokens is not None]
        if not fitting:
            return
        texts = self.sampler.responses([t for _, _, t in fitting], self.k, seed=first)
        items = [
            NewItem(row.prompt, row.reference, i, responses)
            for (i, row, _), responses in zip(fitting, texts, strict=True)
        ]
        self.store.add_items(items, prompt_set=self.prompts.name, model_id=self.model_id,
                             sampling=self.sampler.sampling, origin="human", overlap=self.overlap)  # fmt: skip


# ---- the web app ------------------------------------------------------------------------------------
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """Host and token checks on every request, and headers that keep the page to itself."""

    def __init__(self, app: ASGI, *, token: str | None, hosts: set[str] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    def _allowed(self, request: Request) -> str | None:
        if self.hosts is not None and _hostname(request.headers.get("host", "")) not in self.hosts:
            return "unexpected Host header"
        if self.token is None:
            return None
        auth = request.headers.get("authorization", "")
        given = [auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else "",
                 request.cookies.get(COOKIE, ""), request.query_params.get("token", "") if request.url.path == "/" else ""]  # fmt: skip
        ok = any(g and hmac.compare_digest(g.encode(), self.token.encode()) for g in given)
        return None if ok else "an access token is required"

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:  # fmt: skip
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                                       (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]  # fmt: skip
            await send(message)

        refused = self._allowed(Request(scope))
        if refused is not None:
            await _error(401 if "token" in refused else 400, refused)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def create_app(store: Store, *, producer: Producer | None = None, token: str | None = None,
               loopback: bool = True) -> ASGI:  # fmt: skip
    """The ASGI app over `store`; `producer` (when sampling) is woken whenever an item is handed out."""
    page = PAGE.read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
        response = HTMLResponse(page.replace("{{nonce}}", nonce), headers={"content-security-policy": csp})
        if token is not None and request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def next_item(request: Request) -> Response:
        try:
            reviewer = check_reviewer(request.query_params.get("reviewer", ""))
        except EngineError as exc:
            return _error(400, str(exc))
        item_id = await run_in_threadpool(store.next_item, reviewer)
        if producer is not None:
            producer.wake.set()
        item = None if item_id is None else await run_in_threadpool(store.item, item_id)
        counts = await run_in_threadpool(store.counts)
        exhausted = producer is None or producer.exhausted
        return JSONResponse({"item": _public(item), "judged": counts["judgments"].get(reviewer, 0),
                             "exhausted": item is None and exhausted and counts["unstarted"] == 0,
                             "producer": None if producer is None else producer.state})  # fmt: skip

    async def judge(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error(415, "send application/json")
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, "request too large")
        try:
            data = json.loads(body)
            reviewer = check_reviewer(str(data["reviewer"]))
            args = {"item_id": int(data["item"]), "reviewer": reviewer, "action": str(data["action"]),
                    "ranks": data.get("ranks"), "written": _str(data.get("written")), "note": _str(data.get("note"))}  # fmt: skip
        except (ValueError, KeyError, TypeError, EngineError) as exc:
            return _error(400, f"not a judgment: {exc}")
        try:
            judgment = await run_in_threadpool(lambda: store.judge(**args))
        except EngineError as exc:
            return _error(409 if "already judged" in str(exc) else 400, str(exc))
        return JSONResponse({"ok": True, "id": judgment})

    async def stats(request: Request) -> Response:
        counts = await run_in_threadpool(store.counts)
        judgments = await run_in_threadpool(store.judgments)
        return JSONResponse({**counts, "agreement": agreement(judgments),
                             "producer": None if producer is None else producer.state})  # fmt: skip

    routes = [Route("/", index), Route("/api/next", next_item), Route("/api/stats", stats),
              Route("/api/judgments", judge, methods=["POST"])]  # fmt: skip
    app = Starlette(routes=routes)
    return Guard(app, token=token, hosts=LOOPBACK_HOSTS if loopback else None)


def _hostname(header: str) -> str:
    """The host of a Host header without its port ("[::1]:8000" → "[::1]")."""
    return header.split("]")[0] + "]" if header.startswith("[") else header.rsplit(":", 1)[0]


def _str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError("written and note are text")
    return value


def _public(item: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the page needs; the reference answer stays out of the reviewer's sight."""
    if item is None:
        return None
    return {k: item[k] for k in ("id", "prompt", "responses", "model", "sampling")}


def serve(target: Target, prompts: PromptSet, *, db: Path, host: str, port: int, token: str | None, k: int,
          options: SamplingOptions, ahead: int = 8, overlap: float = 0.0, announce: Callable[[str], None] = print) -> None:  # fmt: skip
    """Load the model, keep items sampled ahead, and serve until interrupted (Ctrl-C, SIGTERM)."""
    import uvicorn

    check_binding(host, token)
    store = Store(db)
    try:
        with open_sampler(target, options) as sampler:
            producer = Producer(store, sampler, prompts, store.model_id(model_version(target)), k, ahead=ahead,
                                batch=max(1, min(ahead, 16 // k or 1)), overlap=overlap)  # fmt: skip
            producer.thread.start()
            app = create_app(store, producer=producer, token=token, loopback=is_loopback(host))
            shown = f"[{host}]" if ":" in host else host
            announce(f"reviewing {target.checkpoint} on http://{shown}:{port}/" + ("?token=…" if token else ""))
            try:
                uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
            finally:
                producer.stop.set()
                producer.wake.set()
                producer.thread.join(timeout=120)
    finally:
        store.close()
