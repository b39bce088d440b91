"""A seeded mutation fuzz of what a user types: recipe files and command-line overrides, mutated as text.

Each case mutates a shipped recipe's YAML text (junk characters, cut or doubled lines, deep nesting, huge
numbers, bytes that are not UTF-8, YAML tags and anchors) or adds overrides (bad values, bad forms,
self-references), then runs `engine validate`, `engine plan` or `engine run --dry-run` in this process.
Every case must end with exit code 0 (the mutation left a valid recipe) or 2 (one clear message), never
with a traceback. A few file-level cases (a directory, a name too long, an empty file, a list) run too.

ENGINE_FUZZ_CASES sets the number of cases (default 300); the seed is fixed, so a failure reproduces.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app

from .conftest import RECIPES

SEED = 20261204
CASES = int(os.environ.get("ENGINE_FUZZ_CASES", "300"))
JUNK = ("{", "}", "[", "]", ":", ": ", "- ", "!!binary aGVsbG8=", "!!python/object:os.system", "&a ", "*a", "\t",
        "%", "@", "`", "'", '"', "\\", "${", "${stages}", "\x00", "? ", "|", ">", ",", "#", "\u2028", "\ufeff")  # fmt: skip
VALUES = ("!!binary aGVsbG8=", "{", "[", "}", "]", "1e999", "-1e999", "-1", "0", "${x}", "${description}",
          "${stages}", "{}", "[]", "null", "~", "'", '"', "a" * 5000, "9" * 400, "[" * 400 + "]" * 400,
          "{a: " * 300 + "1" + "}" * 300, "*a", "&a 1", "nan", ".inf", "-.inf", "true", "{kind: bogus}",
          "!!float x", "\x00", "${oc.env:HOME}", "${env:HOME}", "2e308", "1" + "0" * 30, "[1, 2, 3]")  # fmt: skip
KEYS = ("description", "name", "model", "model.seq_length", "model.num_layers", "model.hidden_size", "tokenizer",
        "tokenizer.vocab_size", "stages", "stages.pretrain", "stages.pretrain.training.steps", "stages.sft.training.lr",
        "stages.data.sources", "stages.data.sources[0]", "stages.data.sources[0].params", "stages.ppo.rollout",
        "stages.pretrain.parallelism.tp", "cluster", "allow_env", "run_dir", "stages.nope.kind", "x.y.z", "a[0]",
        "stages.pretrain.resources.nodes", "model.make_vocab_size_divisible_by", "stages.data.splits.train")  # fmt: skip


def _mutate_text(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines(keepends=True)
    kind = rng.choice(("insert", "delete", "dup", "drop", "truncate", "deep", "huge", "bytes", "value", "tab"))
    if kind == "insert":
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(JUNK) + text[at:]
    elif kind == "delete" and text:
        at = rng.randrange(len(text))
        text = text[:at] + text[at + rng.randint(1, 5) :]
    elif kind == "dup":
        at = rng.randrange(len(lines))
        text = "".join([*lines[: at + 1], lines[at], *lines[at + 1 :]])
    elif kind == "drop":
        at = rng.randrange(len(lines))
        text = "".join([*lines[:at], *lines[at + 1 :]])
    elif kind == "truncate":
        text = text[: rng.randrange(len(text) + 1)]
    elif kind == "deep":
        depth = rng.choice((50, 500, 5000))
        text = text.replace("description:", f"description: {'[' * depth}{']' * depth}\nx_description:", 1)
    elif kind == "huge":
        text = re.sub(r"\b\d+\b", lambda m: rng.choice(("9" * 400, "1e999", "-1", "0")) if rng.random() < 0.3 else m.group(0),
                      text)  # fmt: skip
    elif kind == "bytes":
        at = rng.randrange(len(text) + 1)
        return text[:at].encode() + rng.choice((b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80")) + text[at:].encode()
    elif kind == "value":
        values = [m.start() for m in re.finditer(r": \S", text)]
        if values:
            at = rng.choice(values) + 2
            end = text.find("\n", at)
            text = text[:at] + rng.choice(VALUES) + text[end if end >= 0 else len(text) :]
    else:
        text = text.replace("  ", "\t", 1)
    return text.encode("utf-8", errors="surrogatepass")


NUMBERS = ("9" * 400, "-1", "0", "1e308", "-1e308", "2.5", "1" + "0" * 30, "true", "'7'", "1e-320", "2147483648")


def _numeric_leaves(data: object, path: str = "") -> list[str]:
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in _numeric_leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in _numeric_leaves(v, f"{path}[{i}]")]
    return [path] if isinstance(data, int | float) and not isinstance(data, bool) else []


def _override(rng: random.Random, base: Path) -> str:
    if rng.random() < 0.4:  # an absurd number where the recipe has a number
        import yaml

        leaves = _numeric_leaves(yaml.safe_load(base.read_text(encoding="utf-8")))
        return f"{rng.choice(leaves)}={rng.choice(NUMBERS)}"
    key, value = rng.choice(KEYS), rng.choice(VALUES)
    return rng.choice((f"{key}={value}", f"{key}+={value}", f"~{key}", f"={value}", f"{key}=", key, f"{key}+=[{value}]"))


def _cases() -> list[tuple[int, str]]:
    rng = random.Random(SEED)
    return [(i, rng.choice(("validate", "plan", "run"))) for i in range(CASES)]


def _invoke(args: list[str]) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    crashed = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output, crashed


@pytest.mark.parametrize(("case", "command"), _cases(), ids=lambda v: str(v))
def test_a_mutated_recipe_or_override_is_a_plan_or_one_message(case: int, command: str, tmp_path: Path) -> None:
    rng = random.Random(SEED * 1000 + case)
    base = rng.choice(RECIPES)
    text = base.read_text(encoding="utf-8")
    recipe = tmp_path / base.name
    overrides: list[str] = [f"run_dir={tmp_path / 'run'}"]
    if rng.random() < 0.5:
        recipe.write_bytes(_mutate_text(rng, text))
    else:
        recipe.write_text(text, encoding="utf-8")
    if rng.random() < 0.6:
        overrides += [_override(rng, base) for _ in range(rng.randint(1, 3))]
    args = [command, str(recipe), *overrides] + (["--dry-run"] if command == "run" else [])
    code, output, crashed = _invoke(args)
    assert crashed is None, f"{args}: {type(crashed).__name__}: {crashed}"
    assert code in (0, 2), (args, code, output[-2000:])
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists() or command != "validate"


@pytest.mark.parametrize("what", ["directory", "long name", "empty", "list", "scalar", "not utf-8", "missing"])
def test_a_recipe_file_that_cannot_be_one_is_one_message(what: str, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    if what == "directory":
        path.mkdir()
    elif what == "long name":
        path = tmp_path / ("r" * 300 + ".yaml")
    elif what == "empty":
        path.write_text("")
    elif what == "list":
        path.write_text("- a\n- b\n")
    elif what == "scalar":
        path.write_text("just text\n")
    elif what == "not utf-8":
        path.write_bytes(b"name: \xff\xfe tiny\n")
    code, output, crashed = _invoke(["validate", str(path)])
    assert crashed is None, f"{what}: {type(crashed).__name__}: {crashed}"
    assert code == 2 and "error:" in output and "Traceback" not in output, output
