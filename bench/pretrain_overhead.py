"""Throughput of the engine's pretrain stage against a bare Megatron-Core loop, in one run, on CPU.

Both train the same model on the same data with the same batch for the same steps, under torchrun
with the same number of gloo processes. Steady-state time per step is measured over the middle steps
(the first few warm up; the engine's last step also evaluates and checkpoints). Prints both
throughputs and the ratio engine/bare (target: ≥ 0.95).

    .venv/bin/python bench/pretrain_overhead.py [--steps 40] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = """
name: bench
cluster: local
tokenizer: {kind: file, path: unused.json, vocab_size: 512}
model: {num_layers: 4, hidden_size: 256, num_attention_heads: 8, num_query_groups: 4, ffn_hidden_size: 704,
        seq_length: 256}
stages:
  data: {kind: data, sources: [{name: web, plugin: arithmetic, records: text}]}
  pretrain:
    kind: pretrain
    data: data
    resources: {gpus_per_node: NPROC}
    training: {steps: STEPS, global_batch_size: 16, micro_batch_size: 4, lr: 1.0e-3, weight_decay: 0.0}
"""


def write_data(folder: Path, tokens: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        prefix = folder / "web" / split
        prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
        for _ in range(tokens // 500 if split == "train" else 40):
            doc = rng.integers(2, 512, size=499).astype(np.int32)
            builder.add_document(np.append(doc, 1), [500])
        builder.finalize(f"{prefix}.idx")
    manifest = {"tokenizer": {"sha256": "bench", "vocab_size": 512, "eod": 1, "pad": 0}, "sources": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def torchrun(nproc: int, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=REPO).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    sys.path.insert(0, str(REPO))
    from engine.compile import compile_recipe
    from engine.load import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "bench.yaml"
        recipe.write_text(RECIPE.replace("NPROC", str(args.nproc)).replace("STEPS", str(args.steps)))
        plan = compile_recipe(load_recipe(recipe, [f"run_dir={tmp}/run"]))
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(plan.to_json())
        write_data(Path(plan.job("data").outputs[0].path), tokens=args.steps * 16 * 257 + 50_000)
        first, last = 5, args.steps - 1  # steady state: after warm-up, before the final eval + save

        bare = [json.loads(line) for line in torchrun(args.nproc, "bench/bare_megatron.py", str(plan_path)).splitlines()
                if line.startswith("{")]  # fmt: skip
        bare_time = sum(r["seconds"] for r in bare if first < r["step"] <= last)

        torchrun(args.nproc, "-m", "engine.worker", str(plan_path), "--job", "pretrain")
        rows = {
            r["step"]: r for r in map(json.loads, (Path(tmp) / "run/pretrain/metrics.jsonl").read_text().splitlines())
        }
        engine_time = rows[last]["elapsed_s"] - rows[first]["elapsed_s"]

    tokens = (last - first) * 16 * 256
    e, b = tokens / engine_time, tokens / bare_time
    print(f"steps {first + 1}..{last} of {args.steps}, {args.nproc} gloo processes, {tokens} tokens")
    print(f"bare Megatron-Core loop : {b:10.1f} tokens/s")
    print(f"engine pretrain stage   : {e:10.1f} tokens/s")
    print(f"ratio engine/bare       : {e / b:.3f}")


if __name__ == "__main__":
    main()
