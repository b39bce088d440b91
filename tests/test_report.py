"""`engine report`: the HTML page of a run, from a run directory the tests write themselves (no training).

The browser test opens the page in Debian's headless Chromium and checks the screenshot shows the
tables and the plotted curves; without Chromium it fails, naming the package to install.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from engine.artifacts import mark_done
from engine.compile import Plan
from engine.errors import EngineError
from engine.report import PALETTE, nice_ticks, read_metrics, render_report, write_report

from .conftest import compile_with

ENGINE = Path(sys.executable).with_name("engine")
CHROMIUM_INSTALL = "apt-get install -y --no-install-recommends chromium"
INJECTED = '<script>alert("x")</script>'
RECIPE_TEXT = f"name: tiny\ndescription: '</pre>{INJECTED}'\n"


def _write_metrics(path: Path, lines: Iterable[dict[str, Any] | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")


def make_run(root: Path, *, ppo: bool = True, description: str | None = None) -> Plan:
    """A run directory as `engine run` leaves it: plan.json, the recipe, metrics of every training stage."""
    plan = compile_with(f"run_dir={root}")
    if description is not None:
        plan = plan.model_copy(update={"description": description})
    root.mkdir(parents=True)
    (root / "plan.json").write_text(plan.to_json(), encoding="utf-8")
    (root / "recipe.resolved.yaml").write_text(RECIPE_TEXT, encoding="utf-8")
    pretrain = [{"step": s, "loss": 6 - 0.2 * s, "lr": 1e-3 * s} for s in range(1, 21)]
    pretrain[9] |= {"val_loss": 4.0}
    pretrain[19] |= {"val_loss": 2.5}
    pretrain[6]["loss"] = float("nan")  # left out of the plot
    # A resume logs steps 15.. again after the first 15 lines: the later line of a step wins.
    resumed = [*pretrain[:15], {"step": 15, "loss": 99.0}, *pretrain[14:], '{"step": 21, "lo']
    _write_metrics(root / "pretrain" / "metrics.jsonl", resumed)
    mark_done(root / "pretrain", plan.job("pretrain").cache_key)
    sft = [{"step": 0, "val_loss": 5.0}, *({"step": s, "loss": 4 - 0.1 * s, "lr": 1e-4} for s in range(1, 11))]
    sft[-1] |= {"val_loss": 3.25}
    _write_metrics(root / "sft" / "metrics.jsonl", sft)
    reward = [{"step": 0, "val_loss": 0.69, "val_accuracy": 0.5}]
    reward += [{"step": s, "loss": 0.7, "accuracy": 0.5 + 0.02 * s} for s in range(1, 11)]
    reward[-1] |= {"val_loss": 0.55, "val_accuracy": 0.75, INJECTED: 1.0}
    _write_metrics(root / "reward" / "metrics.jsonl", reward)
    if ppo:
        lines: list[dict[str, Any]] = [
            {"step": 0, "val_reward": 0.125, "val_accuracy": 0.25, "val_sampled_reward": 0.0}
        ]
        for s in (1, 2, 3):
            lines.append({"step": s, "reward": 0.2 * s, "kl": 0.01 * s, "kl_coef": 0.05, "policy_loss": -0.01, "lr": 1e-5,
                          "val_reward": 0.125 + 0.25 * s, "val_accuracy": 0.25 * (s + 1), "val_sampled_reward": 0.1 * s,
                          "val_sampled_accuracy": 0.2 * s})  # fmt: skip
        _write_metrics(root / "ppo" / "metrics.jsonl", lines)
    return plan


def section(page: str, name: str) -> str:
    found = re.search(rf'<section id="stage-{name}">(.*?)</section>', page, re.S)
    assert found, f"no section for stage {name}"
    return found.group(1)


def summary(page: str) -> str:
    return page.split('<h2 id="summary">', 1)[1].split("<section", 1)[0]


def polylines(html_text: str) -> dict[str, list[tuple[float, float]]]:
    lines = re.findall(r'<polyline data-series="([^"]+)"[^>]* points="([^"]*)"', html_text)
    return {name: [tuple(map(float, p.split(","))) for p in pts.split()] for name, pts in lines}  # type: ignore[misc]


def test_page_has_the_plan_every_stage_and_the_recipe(tmp_path: Path) -> None:
    plan = make_run(tmp_path / "run")
    page = render_report(tmp_path / "run")
    assert page.startswith("<!DOCTYPE html>") and "<title>tiny · run report</title>" in page
    for title in ('<h2 id="plan">Plan</h2>', '<h2 id="summary">Held-out metrics</h2>', '<h2 id="recipe">Recipe</h2>'):
        assert title in page
    for job in plan.jobs:
        assert f'<section id="stage-{job.name}">' in page
    plan_table = page.split('<h2 id="plan">', 1)[1].split("<h2", 1)[0]
    assert plan_table.count("<tr>") == 1 + len(plan.jobs)
    pretrain_row = re.search(r"<tr><td>pretrain</td>.*?</tr>", plan_table)
    assert pretrain_row and "1/1/1/2" in pretrain_row.group(0) and "finished" in pretrain_row.group(0)
    assert "<details><summary>recipe.resolved.yaml</summary>" in page
    # Self-contained: no script, no stylesheet or image fetched.
    assert not re.search(r"<script|<link|<img|https?://(?!www\.w3\.org/2000/svg)", page, re.I)


def test_strings_from_the_run_directory_are_escaped(tmp_path: Path) -> None:
    make_run(tmp_path / "run", description="<img src=x onerror=alert(1)>")
    page = render_report(tmp_path / "run")
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in section(page, "reward")  # a metric's name
    assert "&lt;/pre&gt;&lt;script&gt;" in page.split('<h2 id="recipe">', 1)[1]  # the recipe text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # the recipe's description


def test_curves_have_one_point_per_logged_step(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    page = render_report(tmp_path / "run")
    pretrain = polylines(section(page, "pretrain"))
    assert {k: len(v) for k, v in pretrain.items()} == {"loss": 19, "val_loss": 2, "lr": 20}  # NaN left out
    xs = [x for x, _ in pretrain["loss"]]
    assert xs == sorted(xs) and all(0 <= x <= 540 and 0 <= y <= 280 for x, y in pretrain["loss"])
    # The resumed step 15 drew its later value (a point on the falling line), not the 99 logged before.
    ys = [y for _, y in pretrain["loss"]]
    assert min(ys) == ys[0] and max(ys) == ys[-1]  # SVG y grows downwards: step 1's loss is the highest
    reward = {k: len(v) for k, v in polylines(section(page, "reward")).items()}
    assert reward == {"loss": 10, "val_loss": 2, "accuracy": 10, "val_accuracy": 2}  # no lr logged: no lr chart
    ppo = {k: len(v) for k, v in polylines(section(page, "ppo")).items()}
    assert ppo == {"reward": 3, "val_reward": 4, "val_sampled_reward": 4, "kl": 3, "val_accuracy": 4,
                   "val_sampled_accuracy": 3, "kl_coef": 3, "policy_loss": 3, "lr": 3}  # fmt: skip
    assert section(page, "pretrain").count("<svg") == 2 and section(page, "ppo").count("<svg") == 6


def test_metrics_later_line_of_a_step_wins_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[14]["loss"] == pytest.approx(3.0) and math.isnan(rows[6]["loss"])
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_summary_shows_held_out_metrics_first_and_last(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    table = summary(render_report(tmp_path / "run"))

    def row(stage: str, metric: str) -> list[str]:
        found = re.search(rf"<tr><td>{stage}</td><td>{re.escape(metric)}</td>(.*?)</tr>", table)
        assert found, f"no summary row {stage} / {metric}"
        return re.findall(r"<td[^>]*>(.*?)</td>", found.group(1))

    assert row("pretrain", "val loss") == ["4 (step 10)", "2.5 (step 20)"]
    assert row("pretrain", "perplexity exp(val loss)") == [
        f"{math.exp(4.0):.4g} (step 10)", f"{math.exp(2.5):.4g} (step 20)"
    ] == ["54.6 (step 10)", "12.18 (step 20)"]  # fmt: skip
    assert row("sft", "val loss") == ["5 (step 0)", "3.25 (step 10)"]
    assert row("reward", "val accuracy") == ["0.5 (step 0)", "0.75 (step 10)"]
    assert row("ppo", "val reward (greedy)") == ["0.125 (step 0)", "0.875 (step 3)"]
    assert row("ppo", "val accuracy (greedy)") == ["0.25 (step 0)", "1 (step 3)"]
    assert row("ppo", "val accuracy (sampled)") == ["0.2 (step 1)", "0.6 (step 3)"]


def test_stages_without_metrics_show_as_not_run(tmp_path: Path) -> None:
    make_run(tmp_path / "run", ppo=False)
    page = render_report(tmp_path / "run")
    assert "not run" in section(page, "ppo") and "<svg" not in section(page, "ppo")
    assert re.search(r"<tr><td>ppo</td><td colspan=\"3\" class=\"missing\">not run</td></tr>", summary(page))
    assert re.search(r"<tr><td>ppo</td>.*?not run.*?</tr>", page.split('<h2 id="summary">')[0])
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "run" / "plan.json", bare / "plan.json")
    page = render_report(bare)
    assert page.count('<span class="state not-run">not run</span>') == 2 * 6  # plan table and section heading
    assert "no recipe.resolved.yaml" in page


def test_render_is_pure(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert render_report(tmp_path / "run") == render_report(tmp_path / "run")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_missing_or_broken_run_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="not a run directory"):
        render_report(tmp_path / "nowhere")
    (tmp_path / "plan.json").write_text('{"jobs": []}', encoding="utf-8")
    with pytest.raises(EngineError, match=r"plan\.json this engine version reads"):
        render_report(tmp_path)


def test_ticks_are_round_and_cover_the_data() -> None:
    assert nice_ticks(0, 30, min_step=1) == [0, 10, 20, 30]
    assert nice_ticks(1, 3, min_step=1) == [1, 2, 3]
    assert nice_ticks(2.3, 5.9) == [2, 3, 4, 5, 6]
    assert nice_ticks(0.69, 0.75) == pytest.approx([0.68, 0.7, 0.72, 0.74, 0.76])
    one = nice_ticks(0.5, 0.5)
    assert one[0] < 0.5 < one[-1]


def engine(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENGINE), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_writes_the_report_and_prints_its_path(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    done = engine("report", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'run' / 'report.html'}\n"
    assert (tmp_path / "run" / "report.html").read_text(encoding="utf-8") == render_report(tmp_path / "run")
    done = engine("report", tmp_path / "run", "--out", tmp_path / "out" / "page.html")
    assert done.returncode == 0 and (tmp_path / "out" / "page.html").is_file()
    done = engine("report", tmp_path / "nowhere")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "not a run directory" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_report_imports_no_torch(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    probe = (
        "import sys; from pathlib import Path; from engine.report import render_report; "
        f"render_report(Path({str(tmp_path / 'run')!r})); "
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'numpy'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == ""


def _chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if exe is None:
        pytest.fail(f"Debian's chromium is needed to render the report: {CHROMIUM_INSTALL}")
    return exe


def screenshot(page: Path, png: Path, profile: Path) -> None:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    cmd = [_chromium(), *flags, f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,2000"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(profile)}
    try:
        done = subprocess.run([*cmd, page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("headless chromium took over 120 s to take the screenshot")
    assert png.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"


def near(rgb: tuple[int, ...], hex_color: str, tol: int = 40) -> bool:
    target = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return all(abs(a - b) <= tol for a, b in zip(rgb, target, strict=True))


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    make_run(tmp_path / "run")
    page = write_report(tmp_path / "run", tmp_path / "report.html")
    png = tmp_path / "shot.png"
    screenshot(page, png, tmp_path / "profile")
    with Image.open(png) as img:
        assert img.size == (1280, 2000)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 24)
    assert colors is not None
    total = 1280 * 2000
    white = sum(n for n, c in colors if c == (255, 255, 255))
    dark = sum(n for n, c in colors if max(c) < 100)  # text and axes
    blue = sum(n for n, c in colors if near(c, PALETTE[0]))  # the first curve of every chart
    red = sum(n for n, c in colors if near(c, PALETTE[1]))  # the val_loss curves
    print(f"screenshot: {len(colors)} colours, {1 - white / total:.1%} not white, {dark} dark, {blue} blue, {red} red")
    assert len(colors) > 100, "a blank or flat page"
    assert 0.03 < 1 - white / total < 0.6
    assert dark > 5000 and blue > 2000 and red > 500
