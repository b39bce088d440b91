"""The web app's API and its security rules, over a prepared database (no model needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.feedback.server import check_binding, is_loopback
from engine.feedback.store import Store

from ..conftest import REPO
from .helpers import live_app, request
from .test_store import filled


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return filled(tmp_path / "f.db", n=3)


def test_next_and_judge_through_the_api(store: Store) -> None:
    with live_app(store) as url:
        status, data = request(url + "/api/next?reviewer=alice")
        assert status == 200 and data["item"]["id"] == 1 and len(data["item"]["responses"]) == 3
        assert "reference" not in data["item"]  # the answer stays out of the reviewer's sight
        judgment = {"reviewer": "alice", "item": 1, "action": "rank", "ranks": [2, 0, 1], "written": "1"}
        assert request(url + "/api/judgments", judgment) == (200, {"ok": True, "id": 1})
        assert request(url + "/api/judgments", judgment)[0] == 409
        status, data = request(url + "/api/next?reviewer=alice")
        assert data["item"]["id"] == 2 and data["judged"] == 1
        assert request(url + "/api/judgments", {**judgment, "item": 2, "ranks": [0, 0, 1]})[0] == 400
        assert request(url + "/api/next?reviewer=ai:me")[0] == 400
        status, stats = request(url + "/api/stats")
        assert stats["judgments"] == {"alice": 1} and stats["agreement"]["overall"]["items"] == 0


def test_posts_must_be_json(store: Store) -> None:
    with live_app(store) as url:
        form = b"reviewer=alice&item=1&action=skip"
        assert request(url + "/api/judgments", form, content_type="application/x-www-form-urlencoded")[0] == 415
        assert request(url + "/api/judgments", form, content_type="text/plain")[0] == 415
        assert request(url + "/api/judgments", b"{not json")[0] == 400
        assert request(url + "/api/judgments", b"x" * 300_000)[0] == 413
    assert store.judgments() == []


def test_no_route_reads_files_and_headers_guard_the_page(store: Store) -> None:
    with live_app(store) as url:
        for path in ("/static/../../etc/passwd", "/page.html", "/..%2f..%2fetc%2fpasswd", "/api/../server.py"):
            assert request(url + path)[0] == 404, path
        status, page = request(url + "/")
        assert status == 200 and "textContent" in page and "innerHTML" not in page
        import urllib.request

        with urllib.request.urlopen(url + "/") as res:
            csp = res.headers["content-security-policy"]
            assert "script-src 'nonce-" in csp and "default-src 'none'" in csp
            assert res.headers["x-frame-options"] == "DENY"
        # DNS rebinding: on loopback, a foreign Host header is refused.
        assert request(url + "/api/stats", headers={"Host": "evil.example"})[0] == 400


def test_a_token_guards_every_request(store: Store) -> None:
    with live_app(store, token="s3cret", loopback=False) as url:
        assert request(url + "/")[0] == 401
        assert request(url + "/api/next?reviewer=alice")[0] == 401
        assert request(url + "/api/next?reviewer=alice", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(url + "/api/next?reviewer=alice&token=s3cret")[0] == 401  # the query works for the page only
        assert request(url + "/api/next?reviewer=alice", headers={"Authorization": "Bearer s3cret"})[0] == 200
        import urllib.request

        with urllib.request.urlopen(url + "/?token=s3cret") as res:
            cookie = res.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        value = cookie.split(";")[0]
        assert request(url + "/api/stats", headers={"Cookie": value})[0] == 200


def test_binding_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(EngineError, match="--token"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", "t")
    done = subprocess.run([sys.executable, "-m", "engine", "feedback", "serve", str(tmp_path), "--host", "0.0.0.0"],
                          capture_output=True, text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin"}, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "ENGINE_FEEDBACK_TOKEN" in done.stderr
