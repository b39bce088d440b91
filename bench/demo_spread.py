"""How much the demo's held-out numbers move between machines: the whole tiny recipe run so that only the
order of floating-point sums differs.

On one machine a run repeats bit for bit (a test reruns a stage and compares every logged number and the
checkpoint bytes). Another machine may differ in its core count, and so in the threads each process
gets, and in its CPU kernels; where the order of floating-point sums changes, the last bits of the first
step differ and training carries the difference on. This script runs the demo in configurations that
change that order on this machine without oversubscribing its cores: the demo as shipped (2 processes ×
1 thread on 2 cores), and every stage in 1 process with 2 threads and with 1 thread. Data parallelism
changes the order in which gradients and losses are summed (and PPO samples with one stream per rank);
threads may change the order inside a product. Prints each held-out number per run and its range; --out
writes them as JSON.

With --keep DIR the run directories stay under DIR, and a configuration that already finished there is
skipped by the engine's cache.

    .venv/bin/python bench/demo_spread.py [--keep DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")
# (label, processes per stage, CPU threads per process): the shipped demo first
CONFIGS = [("2 proc × 1 thr", 2, 1), ("1 proc × 2 thr", 1, 2), ("1 proc × 1 thr", 1, 1)]
# (label, stage, metric, which line): the numbers the demo's final table shows
NUMBERS = [
    ("pretrain val loss", "pretrain", "val_loss", -1),
    ("SFT val loss, start", "sft", "val_loss", 0),
    ("SFT val loss, end", "sft", "val_loss", -1),
    ("reward model pair accuracy, start", "reward", "val_accuracy", 0),
    ("reward model pair accuracy, end", "reward", "val_accuracy", -1),
    ("DPO val loss, end", "dpo", "val_loss", -1),
    ("DPO implicit-reward accuracy, end", "dpo", "val_accuracy", -1),
    ("PPO greedy reward, start", "ppo", "val_reward", 0),
    ("PPO greedy reward, end", "ppo", "val_reward", -1),
    ("PPO greedy accuracy, start", "ppo", "val_accuracy", 0),
    ("PPO greedy accuracy, end", "ppo", "val_accuracy", -1),
    ("PPO sampled reward, start", "ppo", "val_sampled_reward", 0),
    ("PPO sampled reward, end", "ppo", "val_sampled_reward", -1),
    ("PPO sampled accuracy, start", "ppo", "val_sampled_accuracy", 0),
    ("PPO sampled accuracy, end", "ppo", "val_sampled_accuracy", -1),
]


def held_out(run_dir: Path) -> dict[str, float]:
    out = {}
    for label, stage, key, which in NUMBERS:
        lines = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        with_key = [r for r in lines if key in r]
        out[label] = float(with_key[which][key])
    return out


def machine() -> str:
    """The CPU the numbers came from: its model name, the kernels torch picks and the cores."""
    import torch

    model = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                  if x.startswith("model name")), platform.processor() or "unknown CPU")  # fmt: skip
    return f"{model}, torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories and logs under DIR")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    runs: dict[str, dict[str, float]] = {}
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for label, processes, threads in CONFIGS:
            run_dir = root / f"dp{processes}-threads-{threads}"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            layout = [] if processes == 2 else [f"stages.{s}.resources.gpus_per_node={processes}" for s in STAGES]
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "engine", "run", str(RECIPE), f"run_dir={run_dir}", *layout],
                                  env=env, capture_output=True, text=True, cwd=REPO)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"the demo failed as {label}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            walls[label] = time.perf_counter() - began
            (root / f"{run_dir.name}.log").write_text(done.stdout)
            runs[label] = held_out(run_dir)
            print(f"{label}: {walls[label]:.0f}s", flush=True)
    labels = [c[0] for c in CONFIGS]
    print(f"machine: {machine()}")
    print(f"\n{'held-out number':36s}" + "".join(f"{x:>16s}" for x in labels) + "    range")
    spread = {}
    for label, *_ in NUMBERS:
        values = [runs[x][label] for x in labels]
        spread[label] = max(values) - min(values)
        print(f"{label:36s}" + "".join(f"{v:16.3f}" for v in values) + f"  {spread[label]:7.3f}")
    if args.out is not None:
        args.out.write_text(
            json.dumps({"machine": machine(), "runs": runs, "range": spread, "wall_s": walls}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
