"""How much the demo's held-out numbers move between machines: the whole tiny recipe at several CPU thread
counts per process.

On one machine at one thread count a run repeats bit for bit (a test reruns a stage and compares every
logged number and the checkpoint bytes). Another machine differs in its core count, and so in the thread
count the engine gives each process, and a matrix product sums in a different order at another thread
count: the last bits of the first step differ, and training carries the difference on. Running the demo
at 1, 2 and 3 threads per process measures that spread here. Prints each held-out number per run and its
range, and writes them as JSON with --out.

    .venv/bin/python bench/demo_spread.py [--threads 1 2 3] [--keep DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
# (label, stage, metric, which line): the numbers the demo's final table shows
NUMBERS = [
    ("pretrain val loss", "pretrain", "val_loss", -1),
    ("SFT val loss, start", "sft", "val_loss", 0),
    ("SFT val loss, end", "sft", "val_loss", -1),
    ("reward model pair accuracy, start", "reward", "val_accuracy", 0),
    ("reward model pair accuracy, end", "reward", "val_accuracy", -1),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3], help="CPU threads per process")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories and logs under DIR")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    runs: dict[int, dict[str, float]] = {}
    walls: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for threads in args.threads:
            run_dir = root / f"threads-{threads}"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "engine", "run", str(RECIPE), f"run_dir={run_dir}"],
                                  env=env, capture_output=True, text=True, cwd=REPO)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"the demo failed at {threads} threads:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            walls[threads] = time.perf_counter() - began
            (root / f"threads-{threads}.log").write_text(done.stdout)
            runs[threads] = held_out(run_dir)
            print(f"{threads} thread(s) per process: {walls[threads]:.0f}s", flush=True)
    print(f"\n{'held-out number':36s}" + "".join(f"{f'{t} thr':>9s}" for t in args.threads) + "    range")
    spread = {}
    for label, *_ in NUMBERS:
        values = [runs[t][label] for t in args.threads]
        spread[label] = max(values) - min(values)
        print(f"{label:36s}" + "".join(f"{v:9.3f}" for v in values) + f"  {spread[label]:7.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"runs": runs, "range": spread, "wall_s": walls}, indent=2) + "\n")


if __name__ == "__main__":
    main()
