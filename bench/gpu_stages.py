"""Every stage of the tiny recipe on one GPU through the real worker: data, pretrain, SFT, reward model, PPO.

The second part of the GPU check (bench/gpu_check.sh runs it after bench/gpu_check.py). It compiles
recipes/tiny.yaml, shortened (SHORT below), for a one-GPU cluster profile — NCCL, bf16 (`dtype: auto` on
a GPU), Megatron-Core's local layer spec where Transformer Engine is missing — and runs each job as
`engine run` does: the data job as `python -m engine.worker`, every training job under torchrun with one
process and the job's environment. For each stage it records the exit code, the wall time, the last
metrics line (loss, held-out values, peak allocated GPU memory) and the plan's memory estimate, and
writes gpu_stages_<label>.json and .md. What it shows is that each stage runs on a GPU (the device
moves, NCCL collectives and sampling on the device included), not how well the tiny model learns.

    python bench/gpu_stages.py --out bench/results            # on the GPU machine
    .venv/bin/python bench/gpu_stages.py --cpu --out /tmp/x    # CPU dry run: gloo, fp32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Shorter than the demo: enough steps for every code path of each stage (training steps, validation,
# checkpoints, rollouts, scoring, PPO updates), in about two minutes on one GPU.
SHORT = [
    "stages.pretrain.training.steps=40", "stages.pretrain.training.warmup_steps=4",
    "stages.sft.training.steps=20", "stages.sft.training.warmup_steps=2",
    "stages.reward.training.steps=20", "stages.reward.training.warmup_steps=2",
    "stages.ppo.training.steps=2", "stages.ppo.eval_prompts=32",
]  # fmt: skip
GIB = 1024**3


def profile(path: Path) -> Path:
    """A one-GPU cluster profile for this card, run by the local launcher (the local layer spec without TE)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        import transformer_engine.pytorch  # noqa: F401

        env = ""
    except ImportError:
        env = "env: {ENGINE_LAYER_SPEC: local}\n"
    path.write_text(
        f"name: gpu1\nlauncher: local\ndevice: cuda\ngpus_per_node: 1\npeak_tflops_bf16: 989\n"
        f"hbm_gib: {props.total_memory / GIB:.1f}\nassumed_mfu: 0.4\n{env}"
    )
    return path


def compile_plan(work: Path, cluster: str) -> Any:
    from engine.compile import compile_recipe
    from engine.load import load_recipe

    stages = ("pretrain", "sft", "reward", "ppo")
    overrides = [f"run_dir={work / 'run'}", f"cluster={cluster}", *SHORT,
                 *(f"stages.{s}.resources.gpus_per_node=1" for s in stages)]  # fmt: skip
    plan = compile_recipe(load_recipe(REPO / "recipes" / "tiny.yaml", overrides))
    (work / "run").mkdir(parents=True, exist_ok=True)
    (work / "run" / "plan.json").write_text(plan.to_json())
    return plan


def command(job: Any, plan_path: Path) -> list[str]:
    worker = ["-m", "engine.worker", str(plan_path), "--job", job.name]
    if job.layout is None:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", *worker]


def run_stage(job: Any, plan_path: Path, log: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, **job.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    began = time.perf_counter()
    with log.open("w") as out:
        try:
            done = subprocess.run(command(job, plan_path), stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, cwd=REPO, check=False)  # fmt: skip
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return {"rc": rc, "seconds": round(time.perf_counter() - began, 1)}


def last_metrics(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    last = rows[-1]
    peak = max((r.get("gpu_max_allocated_bytes", 0) for r in rows), default=0)
    keep = ("step", "loss", "val_loss", "val_accuracy", "val_reward", "reward", "kl", "tokens_per_s")
    return {**{k: last[k] for k in keep if k in last}, "gpu_max_allocated_bytes": peak or None}


def check(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    gpu = not args.cpu
    kind = re.search(r"\b(?:[ABH]|GB)\d+\b", torch.cuda.get_device_name(0)) if gpu else None
    label = "cpu-dry-run" if not gpu else (kind.group(0).lower() if kind else "gpu")
    plan = compile_plan(work, str(profile(work / "gpu1.yaml")) if gpu else "local")
    plan_path = work / "run" / "plan.json"
    stages = []
    for job in plan.jobs:
        print(f"[gpu_stages] {job.name} ({job.kind})", flush=True)
        result = run_stage(job, plan_path, work / f"{job.name}.log", args.timeout)
        est = job.estimate.memory.total if job.estimate is not None else None
        row = {"stage": job.name, "kind": job.kind, **result, "estimated_bytes": est,
               "metrics": last_metrics(Path(job.outputs[0].path).parent)}  # fmt: skip
        if result["rc"] != 0:
            row["log_tail"] = (work / f"{job.name}.log").read_text(errors="replace")[-3000:]
        stages.append(row)
        if args.keep_logs:
            (args.out / f"gpu_stages_{label}.{job.name}.log").write_text(
                (work / f"{job.name}.log").read_text(errors="replace")
            )
        if result["rc"] != 0:
            break  # the next stages need this one's output
    precision = next((j.precision.dtype for j in plan.jobs if j.precision is not None), None)
    return {"label": label, "cpu_dry_run": args.cpu, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
            "precision": precision, "overrides": SHORT, "stages": stages,
            "all_ran": len(stages) == len(plan.jobs) and all(s["rc"] == 0 for s in stages)}  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Every tiny-recipe stage on one device: {r['label']}", "",
             f"Device: {r['device']}; precision {r['precision']}; recipes/tiny.yaml with {' '.join(r['overrides'])}.",
             "", "| stage | kind | exit | seconds | last step | loss | held-out | peak GPU memory | estimate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in r["stages"]:
        m = s["metrics"]
        held = next((f"{k} {m[k]:.4g}" for k in ("val_loss", "val_accuracy", "val_reward") if k in m), "-")
        peak = f"{m['gpu_max_allocated_bytes'] / GIB:.2f} GiB" if m.get("gpu_max_allocated_bytes") else "-"
        est = f"{s['estimated_bytes'] / GIB:.2f} GiB" if s["estimated_bytes"] else "-"
        loss = f"{m['loss']:.4g}" if "loss" in m else "-"
        lines.append(f"| {s['stage']} | {s['kind']} | {s['rc']} | {s['seconds']} | {m.get('step', '-')} | {loss} | "
                     f"{held} | {peak} | {est} |")  # fmt: skip
    lines += ["", "Every stage ran." if r["all_ran"] else "Not every stage ran: see the log tail in the JSON."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_stages_<label>.json and .md")
    parser.add_argument("--cpu", action="store_true", help="dry run: gloo, fp32")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds allowed per stage")
    parser.add_argument("--keep-logs", action="store_true", help="copy each stage's log next to the report")
    args = parser.parse_args()
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --cpu for the dry run")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_stages_") as tmp:
        report = check(args, Path(tmp))
    stem = args.out / f"gpu_stages_{report['label']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    sys.exit(0 if report["all_ran"] else 1)


if __name__ == "__main__":
    main()
