"""The recipe, the compiler and the CLI import no torch: `engine plan` must answer in well under a second."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

PROBE = """
import sys
from pathlib import Path
from engine.load import load_recipe
from engine.compile import compile_recipe
import engine.cli, engine.launch, engine.schema.jsonschema
for path in sorted(Path("recipes").rglob("*.yaml")):
    if "# requires: " not in path.read_text():  # its model is imported first (tests/conftest.py)
        compile_recipe(load_recipe(path))
engine.schema.jsonschema.render()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "transformer_engine", "numpy"))
print(",".join(heavy))
"""


def test_compiler_imports_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "", f"heavy modules imported: {done.stdout.strip()}"
