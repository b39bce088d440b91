"""A live feedback app over a prepared database (no model), plain HTTP requests, and the browser."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from engine.feedback.server import create_app
from engine.feedback.store import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def live_app(store: Store, *, token: str | None = None, loopback: bool = True) -> Iterator[str]:
    """The app served by uvicorn in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, token=token, loopback=loopback), host="127.0.0.1",
                                           port=port, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(url: str, *, timeout: float = 120.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request(url + "/api/stats", headers=headers)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def request(url: str, body: Any = None, *, headers: dict[str, str] | None = None,
            content_type: str = "application/json") -> tuple[int, Any]:  # fmt: skip
    """(status, parsed JSON or text) of a GET, or of a POST when `body` is given; HTTP errors are returned."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={**(headers or {}), "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status, raw = res.status, res.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def browser_or_fail() -> Any:
    """Playwright's Chromium on the distribution's binary; missing pieces fail the test with the fix."""
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the browser tests need Playwright's Python package: pip install -e '.[dev]' (never `playwright install`)"
        )
    return sync_playwright
