"""Data-parallel speed of SFT and the reward model on CPU: real tokens/s per step at DP2 against DP1.

The tiny recipe's data stage, a short pretrain and a short SFT run once (the parents; speed does not
depend on their weights). Then, interleaved and repeated, each measured stage (pretrain as the
reference, SFT, reward model) runs as the engine runs it, `engine run --stages <stage>`, with 1 and with
2 gloo processes on the demo's data, batch and sequence lengths, each time in a fresh copy of the run
directory. The engine's defaults set the threads: each process gets its share of the cores (2 threads
for one process on 2 cores, 1 each for two). `--one-thread` adds DP1 with one thread, which separates
what data parallelism gains per process from what one process already gains from threads.

Per run, the number is the median of the per-step `real_tokens_per_s` (padding excluded), skipping the
first step and the steps that validate or save; per configuration, the median over repeats. The target
is DP2 ≥ 1.3 × DP1 for SFT and the reward model.

    .venv/bin/python bench/chat_dp_speed.py [--steps 120] [--repeats 3] [--one-thread] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
TARGET = 1.3
PARENTS = {"pretrain": ["data"], "sft": ["data", "pretrain"], "reward": ["data", "pretrain", "sft"]}


def engine(*args: str, threads: int | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the engine's own default
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "engine", "run", str(RECIPE), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def measure(base: Path, work: Path, stage: str, *, nproc: int, steps: int, threads: int | None) -> float:
    """Median real tokens/s per step of one run of `stage` with `nproc` processes, in a fresh copy of `base`."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for parent in PARENTS[stage]:
        shutil.copytree(base / parent, work / parent)
    engine("--stages", stage, f"run_dir={work}", f"stages.{stage}.resources.gpus_per_node={nproc}",
           f"stages.{stage}.training.steps={steps}", f"stages.{stage}.training.eval_interval={steps}",
           f"stages.{stage}.checkpointing.interval={steps}", threads=threads)  # fmt: skip
    lines = [json.loads(x) for x in (work / stage / "metrics.jsonl").read_text().splitlines()]
    per_step = [float(r["real_tokens_per_s"]) for r in lines
                if "real_tokens_per_s" in r and 1 < r["step"] < steps]  # fmt: skip
    return statistics.median(per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="steps per measured run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-thread", action="store_true", help="also measure DP1 with one thread")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    configs: list[tuple[str, int, int | None]] = [("dp1", 1, None), ("dp2", 2, None)]
    if args.one_thread:
        configs.append(("dp1_1thread", 1, 1))
    stages = ["pretrain", "sft", "reward"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        began = time.perf_counter()
        engine("--stages", "data,pretrain,sft", f"run_dir={base}", "stages.pretrain.training.steps=30",
               "stages.sft.training.steps=20")  # fmt: skip
        print(f"parents (data, 30 pretrain steps, 20 SFT steps): {time.perf_counter() - began:.0f}s", flush=True)
        found: dict[str, dict[str, list[float]]] = {s: {c: [] for c, _, _ in configs} for s in stages}
        for r in range(args.repeats):
            order = configs if r % 2 == 0 else configs[::-1]  # interleaved, alternating which goes first
            for stage in stages:
                for name, nproc, threads in order:
                    tps = measure(base, Path(tmp) / "work", stage, nproc=nproc, steps=args.steps, threads=threads)
                    found[stage][name].append(tps)
                    print(f"repeat {r + 1} {stage:8s} {name:12s} {tps:8.0f} real tokens/s", flush=True)
    cores = len(os.sched_getaffinity(0))
    summary: dict[str, dict[str, float]] = {}
    print(f"\nmedians over {args.repeats} repeats, {args.steps} steps each, {cores} cores:")
    for stage in stages:
        med = {name: statistics.median(v) for name, v in found[stage].items()}
        ratios = [b / a for a, b in zip(found[stage]["dp1"], found[stage]["dp2"], strict=True)]
        summary[stage] = {**med, "dp2_over_dp1": med["dp2"] / med["dp1"],
                          "dp2_over_dp1_per_repeat_median": statistics.median(ratios)}  # fmt: skip
        line = f"  {stage:8s} dp1 {med['dp1']:7.0f}  dp2 {med['dp2']:7.0f}  dp2/dp1 {med['dp2'] / med['dp1']:.2f}"
        if "dp1_1thread" in med:
            line += f"  (dp1, 1 thread {med['dp1_1thread']:7.0f}: dp2/that {med['dp2'] / med['dp1_1thread']:.2f})"
        print(line)
    passed = all(summary[s]["dp2_over_dp1"] >= TARGET for s in ("sft", "reward"))
    print(f"target: SFT and reward model dp2/dp1 ≥ {TARGET}: {'PASS' if passed else 'FAIL'}")
    if args.out is not None:
        args.out.write_text(json.dumps({"cores": cores, "steps": args.steps, "repeats": args.repeats,
                                        "runs": found, "summary": summary, "target": TARGET, "passed": passed},
                                       indent=2) + "\n")  # fmt: skip
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
