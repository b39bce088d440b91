"""The alignment algorithms side by side on the demo: DPO, PPO (GAE), RLOO and GRPO with DAPO's options,
each from the same SFT checkpoint of recipes/tiny.yaml, on the same held-out prompts.

The parents (data, pretrain, SFT, the reward model: the demo's own settings) are built once, or copied
from `--from RUN` (a finished `make demo` run, runs/tiny). Then each method runs as the engine runs it,
`engine run --stages <stage>`, in a fresh copy:

* ppo    the demo's PPO stage (GAE with the critic, reward model + exact match), 30 iterations
* rloo   the same with ppo.advantage=rloo (no critic)
* grpo   the same with ppo.advantage=grpo, clip_high 0.28, token-level aggregation and dynamic sampling
* dpo    the demo's DPO stage (100 steps on the ranked pairs, with RPO's NLL term on the chosen reply), then
         its policy is measured by a PPO stage started from it whose step 0 is that evaluation (held-out
         prompts, greedy and sampled 4×)
* dpo_nll0  the same without the NLL term (rpo_alpha null: plain DPO)

"Before" is the SFT policy, measured by every RL run's step 0 (the same prompts and seeds). Printed:
held-out exact-match accuracy greedy and sampled, held-out reward (reward model + exact match) greedy and
sampled, the mean per-sequence KL to the SFT policy of the last iteration's rollouts (for DPO: of rollouts
sampled from its policy by a PPO iteration whose reference is the SFT checkpoint), and the stage's wall
time. The check: DPO raises greedy exact match above the SFT policy's.

    .venv/bin/python bench/alignment.py [--from runs/tiny] [--methods dpo,grpo] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
PARENTS = ("data", "sft", "reward")
METHODS: dict[str, tuple[str, list[str]]] = {
    "ppo": ("ppo", []),
    "rloo": ("ppo", ["stages.ppo.ppo.advantage=rloo"]),
    "grpo": ("ppo", ["stages.ppo.ppo.advantage=grpo", "stages.ppo.ppo.clip_high=0.28",
                     "stages.ppo.ppo.loss_aggregation=token_mean", "stages.ppo.ppo.dynamic_sampling=true"]),
    "dpo": ("dpo", []),
    "dpo_nll0": ("dpo", ["stages.dpo.rpo_alpha=null"]),
}  # fmt: skip
KEYS = ("val_accuracy", "val_sampled_accuracy", "val_reward", "val_sampled_reward")


def engine(*args: str) -> float:
    """Run `engine run RECIPE args` and return its wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "engine", "run", str(RECIPE), *args]
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def metrics(run: Path, stage: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def fresh_copy(base: Path, work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    for stage in PARENTS:
        shutil.copytree(base / stage, work / stage)
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", type=Path, help="a finished demo run to take data, SFT and RM from")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    args = ap.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        if args.source is not None:
            fresh_copy(args.source.resolve(), base)
        else:
            seconds = engine("--stages", "data,pretrain,sft,reward", f"run_dir={base}")
            print(f"parents (the demo's data, pretrain, SFT, reward model): {seconds:.0f}s", flush=True)
        chosen = args.methods.split(",")
        for method, (stage, overrides) in METHODS.items():
            if method not in chosen:
                continue
            work = fresh_copy(base, Path(tmp) / method)
            seconds = engine("--stages", stage, f"run_dir={work}", *overrides)
            lines = metrics(work, stage)
            if stage == "dpo":
                policy = sorted((work / "dpo" / "checkpoints").glob("step_*"))[-1]
                probe = fresh_copy(base, Path(tmp) / "dpo-probe")
                # One iteration whose reference is the SFT policy: step 0 evaluates the DPO policy, step 1's
                # KL is that of its rollouts to SFT (measured before its update, as every RL run's is).
                sft = sorted((base / "sft" / "checkpoints").glob("step_*"))[-1]
                engine("--stages", "ppo", f"run_dir={probe}", f"stages.ppo.policy={policy}",
                       f"stages.ppo.reference={sft}", "stages.ppo.training.steps=1")  # fmt: skip
                probed = metrics(probe, "ppo")
                rows[method] = {"after": {k: probed[0][k] for k in KEYS}, "kl": probed[1]["kl"], "seconds": seconds,
                                "val_accuracy_pairs": lines[-1]["val_accuracy"]}  # fmt: skip
            else:
                start, end = lines[0], lines[-1]
                rows["sft"] = {"after": {k: start[k] for k in KEYS}, "kl": 0.0, "seconds": 0.0}
                kls = [m["kl"] for m in lines if "kl" in m and m["step"] > 0]
                rows[method] = {"after": {k: end[k] for k in KEYS}, "kl": kls[-1], "seconds": seconds}
            print(f"{method}: {seconds:.0f}s", flush=True)
        if "sft" not in rows:  # no RL method ran: the SFT policy's step 0 on its own
            probe = fresh_copy(base, Path(tmp) / "sft-probe")
            engine("--stages", "ppo", f"run_dir={probe}", "stages.ppo.training.steps=1")
            rows["sft"] = {"after": {k: metrics(probe, "ppo")[0][k] for k in KEYS}, "kl": 0.0, "seconds": 0.0}
    before = rows["sft"]["after"]

    def pair(key: str, after: dict[str, float]) -> str:
        return f"{before[key]:.3f} → {after[key]:.3f}"

    print("\nheld out (49 prompts; sampled: 4 responses each), from the same SFT policy:")
    print(f"{'method':8}  {'exact match greedy':20}  {'exact match sampled':20}  {'reward greedy':16}  "
          f"{'reward sampled':16}  {'KL to SFT':9}  wall")  # fmt: skip
    for method in (m for m in METHODS if m in rows):
        r = rows[method]
        kl = f"{r['kl']:.3f}" if r["kl"] is not None else "n/a"
        print(f"{method:8}  {pair('val_accuracy', r['after']):20}  {pair('val_sampled_accuracy', r['after']):20}  "
              f"{pair('val_reward', r['after']):16}  {pair('val_sampled_reward', r['after']):16}  {kl:9}  "
              f"{r['seconds']:.0f}s")  # fmt: skip
    raised = rows["dpo"]["after"]["val_accuracy"] > before["val_accuracy"] if "dpo" in rows else None
    if raised is not None:
        print(f"check: DPO raises held-out greedy exact match above the SFT policy's: {'PASS' if raised else 'FAIL'}")
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows, "dpo_raises_greedy_exact_match": raised}, indent=2) + "\n")


if __name__ == "__main__":
    main()
