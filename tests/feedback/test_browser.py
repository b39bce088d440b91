"""Reviewers in a real browser (Debian's headless Chromium driven by Playwright) against `engine feedback
serve` on a freshly trained demo policy: ranking by keyboard and by mouse, a response holding a script
shown as text, the server SIGKILLed and restarted with every judgment kept and each reviewer's pending
item shown again; then AI feedback on top, the export, and a reward-model round trained on it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.feedback.store import ModelVersion, NewItem, Store

from ..conftest import REPO
from .helpers import CHROMIUM, CHROMIUM_ARGS, browser_or_fail, free_port, request, wait_for

pytestmark = pytest.mark.slow

# The demo recipe, shortened: a policy that adds well enough for exact-match rankings to tell answers apart.
TRAINING = ["stages.pretrain.training.eval_interval=200", "stages.pretrain.checkpointing.interval=400",
            "stages.sft.training.steps=100", "stages.sft.training.eval_interval=50",
            "stages.sft.checkpointing.interval=100"]  # fmt: skip
HOSTILE_PROMPT = "<b>7+1=</b>"
HOSTILE = ["<script>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned = 2">', "8", "9"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def engine(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=REPO, env=ENV,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"engine {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("feedback") / "run"
    engine("run", "recipes/tiny.yaml", f"run_dir={run}", "--stages", "data,pretrain,sft", *TRAINING)
    return run


@pytest.fixture(scope="module")
def db(run_dir: Path) -> Path:
    return run_dir / "feedback" / "feedback.db"


class Server:
    """`engine feedback serve` in a subprocess, every item offered to two reviewers."""

    def __init__(self, run: Path, db: Path) -> None:
        self.run, self.db, self.port = run, db, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.db.parent / "serve.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", "feedback", "serve", str(self.run), "--db",
                                      str(self.db), "--port", str(self.port), "--k", "4", "--overlap", "1",
                                      "--max-new-tokens", "8"], cwd=REPO, env=ENV, stdout=log, stderr=log)  # fmt: skip
        wait_for(self.url, timeout=180)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts; whatever still runs when it ends, failed or not, is stopped."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_playwright = browser_or_fail()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _saved(page: Any, count: int) -> None:
    """The page said saved; wait until the next item is on screen (it may still be sampling)."""
    from playwright.sync_api import expect  # locators, not evaluated strings: the page's CSP forbids eval

    expect(page.locator("#done")).to_have_text(str(count), timeout=60_000)
    assert page.text_content("#status").startswith("Saved")
    page.wait_for_selector("#review:not([hidden])")


def _judgments(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT item_id, reviewer, action, ranks, written FROM judgments ORDER BY id").fetchall()


def _alice(page: Any, url: str) -> None:
    """A new reviewer: the name form, then three items by keyboard (one with a written response)."""
    page.goto(url)
    page.fill("#name", "alice")
    page.keyboard.press("Enter")
    page.wait_for_selector("#review:not([hidden])")
    # The hostile item comes first: everything is text, nothing ran.
    assert page.text_content("#prompt") == HOSTILE_PROMPT
    assert page.locator("#responses pre").all_text_contents() == HOSTILE
    assert page.locator("#responses script, #responses img, #prompt b").count() == 0
    assert page.evaluate("window.__pwned") is None
    for keys, count in ((["3", "4", "1"], 1), (["2", "1", "4", "3"], 2)):
        for key in keys:
            page.keyboard.press(key)
        page.keyboard.press("Enter")  # with three of four placed, the last goes last
        _saved(page, count)
    page.keyboard.press("w")
    page.keyboard.type("10")
    page.keyboard.press("Escape")
    for key in ("1", "2", "3", "4", "Backspace", "Backspace", "4", "3"):
        page.keyboard.press(key)
    assert page.text_content("#order") == "1 > 2 > 4 > 3"
    page.keyboard.press("Enter")
    _saved(page, 3)


def _bob(page: Any, url: str) -> None:
    """A second reviewer by mouse: the overlap items first, two rankings and a skip."""
    page.goto(url + "/?reviewer=bob")
    page.wait_for_selector("#review:not([hidden])")
    assert page.text_content("#prompt") == HOSTILE_PROMPT
    for order, count in (([2, 3, 1, 0], 1), ([1, 0, 2, 3], 2)):
        for idx in order:
            page.locator(f"#responses .card[data-idx='{idx}']").click()
        page.click("#submit")
        _saved(page, count)
    page.click("#skip")
    _saved(page, 3)


# `browser` comes first: without Chromium the test fails before the policy is trained.
def test_reviewers_rank_in_the_browser_and_every_judgment_survives_sigkill(
    browser: Any, run_dir: Path, db: Path, servers: list[Server]
) -> None:
    store = Store(db)  # a hand-made item ahead of the sampled ones: a model that writes markup
    hand = store.model_id(ModelVersion("hand-written", None, "0" * 64))
    store.add_items([NewItem(HOSTILE_PROMPT, "8", 0, HOSTILE)], prompt_set="hostile", model_id=hand,
                    sampling={}, origin="human", overlap=1.0)  # fmt: skip
    store.close()
    server = Server(run_dir, db)
    servers.append(server)
    server.start()
    alice, bob = browser.new_page(), browser.new_page()
    _alice(alice, server.url)
    pending_alice = alice.text_content("#item-id")
    _bob(bob, server.url)
    pending_bob = bob.text_content("#item-id")
    from playwright.sync_api import expect

    expect(bob.locator("#agreement tbody")).to_contain_text("alice · bob", timeout=30_000)
    server.kill()  # the moment after the last acknowledged judgment

    rows = _judgments(db)
    assert len(rows) == 6  # every judgment the page reported saved
    assert rows[0][1:4] == ("alice", "rank", "[2, 3, 0, 1]") and rows[2][3:] == ("[0, 1, 3, 2]", "10")
    assert rows[3][1:4] == ("bob", "rank", "[3, 2, 0, 1]") and rows[5][1:3] == ("bob", "skip")
    assert {r[0] for r in rows if r[1] == "bob"} <= {r[0] for r in rows if r[1] == "alice"} | {4}

    server.start()
    for page, pending, judged in ((alice, pending_alice, "3"), (bob, pending_bob, "3")):
        page.reload()
        page.wait_for_selector("#review:not([hidden])")
        assert page.text_content("#item-id") == pending  # the same pending item, none judged twice
        assert page.text_content("#done") == judged
    _, stats = request(server.url + "/api/stats")
    pair = stats["agreement"]["pairs"][0]
    assert pair["reviewers"] == ["alice", "bob"] and pair["items"] == 2
    print(f"\nagreement alice·bob on {pair['items']} items: pairwise {pair['pairwise_agreement']:.2f}, "
          f"Kendall tau {pair['kendall_tau']:.2f}")  # fmt: skip
    server.kill()
    assert len(_judgments(db)) == 6


def test_acknowledged_api_judgments_survive_sigkill_under_load(
    run_dir: Path, tmp_path: Path, servers: list[Server]
) -> None:
    import threading

    server = Server(run_dir, tmp_path / "load.db")
    servers.append(server)
    server.start()
    acknowledged: list[int] = []
    stop = threading.Event()

    def reviewer(name: str) -> None:
        while not stop.is_set():
            try:
                _, data = request(f"{server.url}/api/next?reviewer={name}")
                if data["item"] is None:
                    stop.wait(0.1)  # the sampler is catching up
                    continue
                status, ok = request(server.url + "/api/judgments", {"reviewer": name, "item": data["item"]["id"],
                                                                     "action": "rank", "ranks": [3, 1, 0, 2]})  # fmt: skip
                if status == 200:
                    acknowledged.append(ok["id"])
            except (OSError, ValueError, KeyError):
                return  # the server is gone

    threads = [threading.Thread(target=reviewer, args=(f"r{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) >= 30
    stored = {r[0] for r in sqlite3.connect(tmp_path / "load.db").execute("SELECT id FROM judgments")}
    assert set(acknowledged) <= stored
    print(f"\n{len(acknowledged)} judgments acknowledged before SIGKILL, {len(stored)} stored, none lost")


def test_a_reward_model_round_learns_the_exported_feedback(run_dir: Path, db: Path, tmp_path: Path) -> None:
    engine("feedback", "ai", str(run_dir), "--reward", "exact_match", "--k", "8", "--n", "400",
           "--max-new-tokens", "8", "--db", str(db))  # fmt: skip
    out = tmp_path / "export"
    engine("feedback", "export", str(db), "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    prefs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    human = [p for p in prefs if not p["reviewer"].startswith("ai:")]
    sft = sorted((run_dir / "sft" / "checkpoints").glob("step_*"))[-1]
    recipe = {
        "name": "feedback-round", "cluster": "local", "run_dir": str(tmp_path / "round2"),
        "tokenizer": {"kind": "file", "path": str(run_dir / "data" / "tokenizer" / "tokenizer.json")},
        "model": {"preset": "tiny", "seq_length": 64},
        "stages": {
            "data": {"kind": "data", "dedup": {"near": False}, "splits": {"train": 0.8, "valid": 0.2, "test": 0.0},
                     "sources": [{"name": "feedback", "plugin": "feedback", "records": "preference",
                                  "params": {"path": str(out)}},
                                 {"name": "questions", "plugin": "arithmetic", "records": "prompt",
                                  "params": {"max_operand": 30, "num_samples": 400, "seed": 4}}]},
            "reward": {"kind": "reward_model", "init_from": str(sft), "data": "data", "resources": {"gpus_per_node": 2},
                       "training": {"steps": 60, "global_batch_size": 32, "micro_batch_size": 8, "lr": 5.0e-4,
                                    "warmup_steps": 5, "weight_decay": 0.0, "eval_interval": 20}},
        },
    }  # fmt: skip
    (tmp_path / "round.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    engine("run", str(tmp_path / "round.yaml"))
    evals = [m for m in map(json.loads, (tmp_path / "round2" / "reward" / "metrics.jsonl").read_text().splitlines())
             if "val_accuracy" in m]  # fmt: skip
    first, last = evals[0]["val_accuracy"], evals[-1]["val_accuracy"]
    print(f"\n{manifest['preferences']} preference pairs ({len(human)} from the browser reviewers); reward model "
          f"held-out pair accuracy {first:.3f} at step 0 → {last:.3f} after {evals[-1]['step']} steps")  # fmt: skip
    assert human and manifest["preferences"] >= 300
    assert last >= 0.6 and last >= first + 0.1
