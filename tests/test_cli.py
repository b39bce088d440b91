"""The command line as a user meets it: exit codes, messages without tracebacks, no side effects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.load import load_recipe

from .conftest import RECIPES, REPO, TINY

ENGINE = Path(sys.executable).with_name("engine")
H405 = REPO / "recipes" / "h100" / "llama31_405b.yaml"
H8 = REPO / "recipes" / "h100" / "llama3_8b.yaml"


def engine(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENGINE), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_validate_passes_every_shipped_recipe() -> None:
    for path in RECIPES:
        done = engine("validate", path)
        assert done.returncode == 0, done.stderr
        assert "valid" in done.stdout


def test_plan_prints_one_row_per_job_with_memory() -> None:
    done = engine("plan", H405)
    assert done.returncode == 0, done.stderr
    for stage in ("data", "pretrain", "sft", "reward", "ppo"):
        assert f"│ {stage} " in done.stdout
    assert "8/8/2/8/8" in done.stdout and "GiB" in done.stdout and "fp8 (delayed)" in done.stdout


def test_plan_json_is_the_plan() -> None:
    done = engine("plan", TINY, "--json")
    assert done.returncode == 0
    assert done.stdout == (REPO / "tests" / "golden" / "tiny.plan.json").read_text()
    assert json.loads(done.stdout)["jobs"][1]["layout"]["dp"] == 2


def test_impossible_tp_exits_2_naming_the_path_without_traceback() -> None:
    done = engine("plan", H8, "stages.pretrain.parallelism.tp=3")
    assert done.returncode == 2
    assert "stages.pretrain.parallelism.tp=3 must divide model.num_attention_heads=32" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_bad_override_and_missing_file_exit_2() -> None:
    assert engine("validate", TINY, "stages.sft.training.lr").returncode == 2
    done = engine("validate", REPO / "recipes" / "nope.yaml")
    assert done.returncode == 2 and "not found" in done.stderr and "Traceback" not in done.stderr


def test_memory_refusal_and_force() -> None:
    done = engine("plan", H8, "stages.pretrain.training.micro_batch_size=16")
    assert done.returncode == 2 and "exceeds the 79.1 GiB" in done.stderr
    assert engine("plan", H8, "stages.pretrain.training.micro_batch_size=16", "--force").returncode == 0


def test_run_refuses_an_impossible_layout_before_starting(tmp_path: Path) -> None:
    done = engine("run", TINY, "stages.ppo.parallelism.pp=4", "stages.ppo.resources.gpus_per_node=4", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "stages.ppo.parallelism.pp" in done.stderr and "num_layers" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, not even the data stage


def test_every_shipped_h100_recipe_dry_runs_every_stage(tmp_path: Path) -> None:
    """The 8B, 70B and 405B recipes, their RL stages at pp=8 and pp=16 included: one command per stage."""
    for recipe in sorted((REPO / "recipes" / "h100").glob("*.yaml")):
        done = engine("run", recipe, "--dry-run", cwd=tmp_path)
        assert done.returncode == 0, (recipe.name, done.stderr[-2000:])
        stages = len(load_recipe(recipe).stages)
        assert done.stdout.count("# command") == stages and "dry run: nothing was submitted" in done.stdout, recipe.name
    assert not (tmp_path / "runs").exists()


def test_run_rejects_unknown_stage_names(tmp_path: Path) -> None:
    done = engine("run", TINY, "--stages", "pretrian", cwd=tmp_path)
    assert done.returncode == 2 and "--stages: names no stage: pretrian" in done.stderr


def test_dry_run_shows_commands_and_launches_nothing(tmp_path: Path) -> None:
    done = engine("run", TINY, "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "torchrun --standalone --nproc-per-node=2 -m engine.worker runs/tiny/plan.json --job pretrain" in done.stdout
    assert "nothing was launched" in done.stdout
    assert not (tmp_path / "runs").exists()


def test_schema_check_and_write(tmp_path: Path) -> None:
    assert engine("schema", "--check").returncode == 0
    out = tmp_path / "s.json"
    assert engine("schema", "--out", out).returncode == 0
    assert out.read_text() == (REPO / "schema" / "recipe.schema.json").read_text()
    out.write_text("{}")
    assert engine("schema", "--check", "--out", out).returncode == 1


def test_plugins_lists_built_ins() -> None:
    done = engine("plugins")
    assert done.returncode == 0
    for name in ("arithmetic", "jsonl", "text_files", "exact_match", "regex", "length_penalty"):
        assert name in done.stdout


def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, check=True)
    assert "validate" in done.stdout and "plan" in done.stdout


def test_dry_run_refuses_what_run_refuses() -> None:
    done = engine("run", REPO / "recipes" / "h100" / "llama3_70b.yaml", "--dry-run", "--stages", "data,pretrian")
    assert done.returncode == 2 and "--stages: names no stage: pretrian" in done.stderr
    assert "dry run" not in done.stdout
    assert engine("run", REPO / "recipes" / "h100" / "llama3_70b.yaml", "--dry-run", "--stages", "data,pretrain").returncode == 0


def test_dry_run_commands_are_shell_quoted(tmp_path: Path) -> None:
    import shlex

    run_dir = tmp_path / "a b'c"
    done = engine("run", TINY, "--dry-run", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("pretrain: "))
    assert shlex.split(line.removeprefix("pretrain: "))[-3] == f"{run_dir}/plan.json"


@pytest.mark.parametrize(
    "args",
    [["runs", "/nonexistent/folder"], ["chat", "runs/tiny", "--temperature", "inf"], ["chat", "runs/tiny", "--top-p", "nan"],
     ["import", "/nonexistent", "--out", "/tmp/x", "--seq-length", "1000000000000"],
     ["feedback", "serve", "runs/tiny", "--temperature", "inf"]],
)  # fmt: skip
def test_absurd_command_line_values_exit_2(args: list[str]) -> None:
    done = engine(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
