"""Device discipline, checked in the source because the CPU tests cannot see it: NCCL has no collectives
for CPU tensors, so worker code reaches torch.distributed only through engine/worker/comm.py (and
engine/worker/context.py, which starts and ends the process group). Imports no torch."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

ALLOWED = {"engine/worker/comm.py", "engine/worker/context.py"}
# Not a collective: the exception type torch's checkpoint loader raises.
IMPORTS_OK = {"torch.distributed.checkpoint.api"}


def _distributed_uses(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.startswith("torch.distributed") and a.name not in IMPORTS_OK]  # fmt: skip
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            if node.module not in IMPORTS_OK and node.module != "torch.distributed.run":
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            found.append("from torch import distributed")
        elif (isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.distributed.")
              and not ast.unparse(node).startswith(tuple(IMPORTS_OK))):  # fmt: skip
            found.append(ast.unparse(node))
    return [f"{path.relative_to(root)}:{use}" for use in found]


def test_workers_reach_torch_distributed_only_through_comm() -> None:
    files = [p for d in ("engine/worker", "engine/hf") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 25
    uses = [u for p in sorted(files) if str(p.relative_to(REPO)) not in ALLOWED for u in _distributed_uses(p)]
    assert uses == []


def test_the_check_sees_a_direct_call(tmp_path: Path) -> None:
    sample = REPO / "engine" / "worker" / "comm.py"
    assert _distributed_uses(sample)  # comm itself uses it, as it must
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nimport torch\ntorch.distributed.all_reduce(x)\n")
    assert _distributed_uses(bad, tmp_path) == ["bad.py:import torch.distributed", "bad.py:torch.distributed.all_reduce"]
