"""Helpers for worker tests: small indexed datasets, plans in a temp folder, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engine.artifacts import text_prefix
from engine.compile import Plan, compile_recipe
from engine.load import load_recipe

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "pretrain.yaml"
VOCAB, EOD, PAD = 96, 1, 0

# Run as `python -c MEGATRON_LOGITS tokens.pt out.pt ARTIFACT...`: the logits Megatron-Core computes for a batch of
# token ids with each artifact's newest checkpoint, saved as {artifact: [batch, seq, vocab]}.
MEGATRON_LOGITS = """
import sys, torch
from pathlib import Path
from engine.hf import session
from engine.hf.to_hf import resolve_checkpoint
from engine.worker.checkpoint import read_meta
tokens = torch.load(sys.argv[1])
out = {}
for artifact in sys.argv[3:]:
    ckpt = resolve_checkpoint(Path(artifact))
    with session.megatron("probe", read_meta(ckpt)["architecture"]) as s:
        session.load(s, ckpt)
        out[artifact] = session.logits(s, tokens)
torch.save(out, sys.argv[2])
"""


def synthetic_docs(seed: int, n: int) -> list[list[int]]:
    """Learnable streams: each token is (3·previous + 7) mod 90 + 2, with 10% noise."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        tok = int(rng.integers(2, VOCAB))
        doc = []
        for _ in range(int(rng.integers(20, 60))):
            doc.append(tok)
            tok = (3 * tok + 7) % 90 + 2 if rng.random() > 0.1 else int(rng.integers(2, VOCAB))
        docs.append([*doc, EOD])
    return docs


def write_dataset(folder: Path, sources: dict[str, int]) -> None:
    """Indexed train/valid/test splits per source plus the manifest the pretrain stage reads."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for i, (name, n) in enumerate(sources.items()):
        for j, split in enumerate(("train", "valid", "test")):
            prefix = text_prefix(folder, name, split)
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
            for doc in synthetic_docs(100 * i + j, n if split == "train" else max(8, n // 10)):
                builder.add_document(np.array(doc, dtype=np.int32), [len(doc)])
            builder.finalize(prefix + ".idx")
    manifest = {"tokenizer": {"sha256": "synthetic", "vocab_size": VOCAB, "eod": EOD, "pad": PAD}, "sources": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def make_plan(run_dir: Path, *overrides: str) -> tuple[Plan, Path]:
    recipe = load_recipe(RECIPE, [f"run_dir={run_dir}", *overrides])
    plan = compile_recipe(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(plan.to_json())
    data = Path(plan.job("data").outputs[0].path)
    if not (data / "manifest.json").exists():
        write_dataset(data, {"a": 200, "b": 100})
    return plan, path


def torchrun(
    plan_path: Path, job: str, nproc: int, *, timeout: float = 300, fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ENGINE_FAULT", None)
    if fault:
        env["ENGINE_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "engine.worker", str(plan_path), "--job", job]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def metrics(run_dir: Path, stage: str = "pretrain") -> list[dict[str, float]]:
    lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def probe(plan_path: Path, nproc: int, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "engine.worker.probe", str(plan_path), "--job", "pretrain", "--out", str(out)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def losses(run_dir: Path, stage: str = "pretrain") -> dict[int, float]:
    """Loss per step; for steps logged twice (a killed run and its resume) the later line wins."""
    return {int(m["step"]): m["loss"] for m in metrics(run_dir, stage)}


def masking_check(tmp_path: Path, check: str, *, port: int) -> dict[str, Any]:
    """Run tests/worker/masking_check.py's `check` (labels or packing) on a fresh pretrain plan's model, in its
    own process, and return the JSON it prints."""
    _, plan_path = make_plan(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, str(HERE / "masking_check.py"), str(plan_path), check],
                          capture_output=True, text=True, timeout=300, env=env, cwd=HERE.parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
