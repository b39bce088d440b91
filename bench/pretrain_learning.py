"""Learning of the engine's pretrain stage against a bare Megatron-Core loop with Megatron's own init, on CPU.

The tiny recipe's data stage runs once; then, for each seed, interleaved, the engine's pretrain job
and bench/bare_megatron.py train the same model on the same blended data with the same batch,
optimizer, schedule and steps, under torchrun with the job's gloo processes. The bare loop initialises
the way Megatron-Core does on one process (torch.manual_seed + model_parallel_cuda_manual_seed); the
engine draws every tensor from (seed, name) so that all layouts get the same weights. Both report the
token-weighted loss over the same validation batches after the last step. The engine passes when its
mean final validation loss is at most the bare loop's mean + 1 standard deviation.

    .venv/bin/python bench/pretrain_learning.py [--seeds 1234 1235 1236] [--steps 400] [--out results.json]
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


def run(*cmd: str, nproc: int | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // (nproc or 1)))}
    if nproc is not None:
        cmd = (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def curve(losses: dict[int, float], steps: int, points: int = 4, window: int = 10) -> list[float]:
    """The mean training loss over the `window` steps before each of `points` evenly spaced steps."""
    marks = [steps * (i + 1) // points for i in range(points)]
    return [statistics.fmean(losses[s] for s in range(max(1, m - window + 1), m + 1)) for m in marks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--steps", type=int, default=None, help="pretrain steps (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from engine.compile import compile_recipe
    from engine.load import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        began = time.perf_counter()
        run(sys.executable, "-m", "engine", "run", str(RECIPE), "--stages", "data", f"run_dir={run_dir}")
        print(f"data stage: {time.perf_counter() - began:.0f}s", flush=True)
        rows: list[dict[str, object]] = []
        for seed in args.seeds:
            overrides = [f"run_dir={run_dir}", f"stages.pretrain.training.seed={seed}"]
            if args.steps is not None:
                overrides.append(f"stages.pretrain.training.steps={args.steps}")
            plan = compile_recipe(load_recipe(RECIPE, overrides))
            job = plan.job("pretrain")
            assert job.layout is not None
            assert job.estimate is not None
            nproc, steps = job.layout.world_size, job.estimate.steps
            plan_path = Path(tmp) / f"plan-{seed}.json"
            plan_path.write_text(plan.to_json())

            run("-m", "engine.worker", str(plan_path), "--job", "pretrain", nproc=nproc)
            lines = [json.loads(x) for x in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
            engine_losses = {int(r["step"]): float(r["loss"]) for r in lines if "loss" in r}
            engine_val = float(
                next(r["val_loss"] for r in reversed(lines) if r.get("step") == steps and "val_loss" in r)
            )
            shutil.rmtree(run_dir / "pretrain")

            out = [json.loads(x) for x in run("bench/bare_megatron.py", str(plan_path), nproc=nproc).splitlines()
                   if x.startswith("{")]  # fmt: skip
            bare_losses = {int(r["step"]): float(r["loss"]) for r in out if "step" in r}
            bare_val = float(next(r["val_loss"] for r in out if "val_loss" in r))
            row = {
                "seed": seed, "engine_val_loss": engine_val, "bare_val_loss": bare_val,
                "engine_curve": curve(engine_losses, steps), "bare_curve": curve(bare_losses, steps),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)

    engine_vals = [float(r["engine_val_loss"]) for r in rows]  # type: ignore[arg-type]
    bare_vals = [float(r["bare_val_loss"]) for r in rows]  # type: ignore[arg-type]
    e_mean, b_mean = statistics.fmean(engine_vals), statistics.fmean(bare_vals)
    e_std = statistics.stdev(engine_vals) if len(rows) > 1 else 0.0
    b_std = statistics.stdev(bare_vals) if len(rows) > 1 else 0.0
    marks = [steps * (i + 1) // 4 for i in range(4)]
    print(
        f"\n{len(rows)} seeds, {steps} steps, {nproc} gloo processes; training loss (mean of 10 steps) at steps {marks}"
    )
    for name, key in (("engine", "engine_curve"), ("bare Megatron-Core", "bare_curve")):
        means = [statistics.fmean(float(r[key][i]) for r in rows) for i in range(4)]  # type: ignore[index]
        print(f"  {name:20s}: " + "  ".join(f"{v:.3f}" for v in means))
    print(f"final val loss, engine            : {e_mean:.4f} ± {e_std:.4f}")
    print(f"final val loss, bare Megatron-Core: {b_mean:.4f} ± {b_std:.4f}")
    ok = e_mean <= b_mean + b_std
    print(f"engine mean ≤ bare mean + 1 std ({b_mean + b_std:.4f}): {'yes' if ok else 'NO'}")
    if args.out is not None:
        summary = {"steps": steps, "nproc": nproc, "runs": rows, "engine": [e_mean, e_std], "bare": [b_mean, b_std],
                   "passed": ok}  # fmt: skip
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
