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

`--breakdown` also has every run write its steps' parts (ENGINE_STEP_TIMES, engine/worker/loop.py) and
prints, per stage and configuration, the medians of: forward + backward per micro-batch, the gradient
reduction (waits for the slower rank included), the reduction of the reported values and the optimizer
step; then the compute-only ceiling of DP2/DP1, the ratio of their forward + backward time per step,
which is what DP2 would reach if its gradient reduction and its optimizer step cost nothing.

    .venv/bin/python bench/chat_dp_speed.py [--steps 120] [--repeats 3] [--one-thread] [--breakdown] [--out results.json]
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
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
TARGET = 1.3
PARENTS = {"pretrain": ["data"], "sft": ["data", "pretrain"], "reward": ["data", "pretrain", "sft"]}


def engine(*args: str, threads: int | None = None, step_times: Path | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the engine's own default
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if step_times is not None:
        env["ENGINE_STEP_TIMES"] = str(step_times)
    cmd = [sys.executable, "-m", "engine", "run", str(RECIPE), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def measure(
    base: Path, work: Path, stage: str, *, nproc: int, steps: int, threads: int | None, breakdown: bool
) -> tuple[float, dict[str, float]]:
    """Median real tokens/s per step of one run of `stage` with `nproc` processes, in a fresh copy of `base`;
    with `breakdown`, the medians of its steps' parts on rank 0 (forward + backward per micro-batch)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for parent in PARENTS[stage]:
        shutil.copytree(base / parent, work / parent)
    times = work / "step_times" if breakdown else None
    engine("--stages", stage, f"run_dir={work}", f"stages.{stage}.resources.gpus_per_node={nproc}",
           f"stages.{stage}.training.steps={steps}", f"stages.{stage}.training.eval_interval={steps}",
           f"stages.{stage}.checkpointing.interval={steps}", threads=threads, step_times=times)  # fmt: skip
    lines = [json.loads(x) for x in (work / stage / "metrics.jsonl").read_text().splitlines()]
    per_step = [float(r["real_tokens_per_s"]) for r in lines
                if "real_tokens_per_s" in r and 1 < r["step"] < steps]  # fmt: skip
    parts: dict[str, float] = {}
    if times is not None:
        rows = [json.loads(x) for x in Path(f"{times}.0").read_text().splitlines()][1:]  # the first: start-up
        training = yaml.safe_load(RECIPE.read_text())["stages"][stage]["training"]
        micro = training["global_batch_size"] // (training["micro_batch_size"] * nproc)
        parts = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        parts["forward_backward_per_microbatch_s"] = parts["forward_backward_s"] / micro
    return statistics.median(per_step), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="steps per measured run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-thread", action="store_true", help="also measure DP1 with one thread")
    parser.add_argument("--breakdown", action="store_true", help="also time each step's parts (ENGINE_STEP_TIMES)")
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
        parts: dict[str, dict[str, list[dict[str, float]]]] = {s: {c: [] for c, _, _ in configs} for s in stages}
        for r in range(args.repeats):
            order = configs if r % 2 == 0 else configs[::-1]  # interleaved, alternating which goes first
            for stage in stages:
                for name, nproc, threads in order:
                    tps, got = measure(base, Path(tmp) / "work", stage, nproc=nproc, steps=args.steps, threads=threads,
                                       breakdown=args.breakdown)  # fmt: skip
                    found[stage][name].append(tps)
                    parts[stage][name].append(got)
                    print(f"repeat {r + 1} {stage:8s} {name:12s} {tps:8.0f} real tokens/s", flush=True)
    cores = len(os.sched_getaffinity(0))
    summary: dict[str, dict[str, Any]] = {}
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
    if args.breakdown:
        print("\nstep parts, ms (medians over steps, then repeats; rank 0): forward+backward per micro-batch, "
              "gradient reduction, values' reduction, optimizer")  # fmt: skip
        for stage in stages:
            ms = {name: {k: statistics.median(p[k] for p in runs) * 1e3 for k in runs[0]}
                  for name, runs in parts[stage].items()}  # fmt: skip
            for name, m in ms.items():
                print(f"  {stage:8s} {name:12s} {m['forward_backward_per_microbatch_s']:6.1f} {m['grad_sync_s']:6.1f} "
                      f"{m['reduce_s']:6.1f} {m['optimizer_s']:6.1f}")  # fmt: skip
            ceiling = ms["dp1"]["forward_backward_s"] / ms["dp2"]["forward_backward_s"]
            summary[stage]["compute_only_ceiling"] = ceiling
            summary[stage]["parts_ms"] = ms
            print(f"  {stage:8s} compute-only ceiling of dp2/dp1 (free gradient reduction and optimizer): {ceiling:.2f}")
    passed = all(summary[s]["dp2_over_dp1"] >= TARGET for s in ("sft", "reward"))
    print(f"target: SFT and reward model dp2/dp1 ≥ {TARGET}: {'PASS' if passed else 'FAIL'}")
    if args.out is not None:
        args.out.write_text(json.dumps({"cores": cores, "steps": args.steps, "repeats": args.repeats,
                                        "runs": found, "summary": summary, "target": TARGET, "passed": passed},
                                       indent=2) + "\n")  # fmt: skip
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
