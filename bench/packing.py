"""SFT on length-skewed conversations: packed vs bucketed vs padded rows, in one run.

Conversation lengths are drawn the way chat data has them: most short (log-normal, median ~40 tokens),
a tenth of them long, near `seq_length` (256); the SFT start-up line printed says what they came to. The
same data stage and the same initial checkpoint feed three SFT runs of `--steps` steps each, `batching`
packed, bucketed and padded, repeated `--repeats` times in rotating order (interleaved, so that a slow
moment of this machine falls on every variant).

Throughput is real tokens over wall time across whole bucketing windows: bucketed batching sorts each
window of 16 global batches by length and shuffles its batches, so a window holds a few slow steps of long
conversations among many fast short ones. The median of per-step rates would leave those slow steps out and
flatter bucketing; the time-weighted mean over the steps of whole windows (the first window left out:
start-up; and the final step, which validates) counts every token once. Printed per variant: the median
over runs of that throughput, the median per-step rate for comparison, the mean `pad_fraction`, and the
final training loss; then the ratios of packed to bucketed and to padded. The goal: packed ≥ 1.5× bucketed.

    .venv/bin/python bench/packing.py [--steps 49] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from engine.worker.batches import WINDOW  # noqa: E402  (global batches per length-sorting window)

VARIANTS = ("packed", "bucketed", "padded")
SEQ = 256

RECIPE = """
name: packing-bench
cluster: local
tokenizer: {{kind: train, vocab_size: 384}}
model: {{preset: tiny, seq_length: {seq}}}
stages:
  data:
    kind: data
    sources:
      - {{name: text, plugin: jsonl, records: text, params: {{glob: "{root}/text.jsonl"}}}}
      - {{name: chats, plugin: jsonl, records: conversation, params: {{glob: "{root}/chats.jsonl"}}}}
    dedup: {{near: false}}
    splits: {{train: 0.95, valid: 0.05, test: 0.0}}
  pretrain:
    kind: pretrain
    data: data
    resources: {{gpus_per_node: 2}}
    training: {{steps: 2, global_batch_size: 8, micro_batch_size: 4, lr: 1.0e-3, warmup_steps: 1}}
  sft:
    kind: sft
    init_from: pretrain
    data: data
    resources: {{gpus_per_node: 2}}
    training: {{steps: {steps}, global_batch_size: 32, micro_batch_size: 8, lr: 1.0e-3, warmup_steps: 2,
                eval_interval: 100000}}
"""


def words(rng: np.random.Generator, n: int) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, int(rng.integers(2, 7)))) for _ in range(max(n, 1)))


def write_inputs(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with (root / "text.jsonl").open("w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": words(rng, 60)}) + "\n")
    with (root / "chats.jsonl").open("w") as f:
        for _ in range(n):
            # Words, not tokens: a word is about four tokens of the trained tokenizer (with the template's
            # tokens, 62 words come near 256).
            total = int(rng.integers(50, 62)) if rng.random() < 0.1 else int(min(rng.lognormal(2.2, 0.6), 50))
            ask = max(total // 4, 1)
            messages = [{"role": "user", "content": words(rng, ask)},
                        {"role": "assistant", "content": words(rng, total - ask)}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")


def engine(recipe: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "engine", "run", str(recipe), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def last_timed(steps: int) -> int:
    """The last step timed: the end of the last whole window before the final step (which also validates)."""
    return (steps - 1) // WINDOW * WINDOW


def measure(base: Path, recipe: Path, variant: str, work: Path) -> dict[str, float]:
    if work.exists():
        shutil.rmtree(work)
    for stage in ("data", "pretrain"):
        shutil.copytree(base / stage, work / stage)
    began = time.perf_counter()
    out = engine(recipe, "--stages", "sft", f"run_dir={work}", f"stages.sft.batching={variant}")
    if variant == "padded":
        print(next((x for x in out.splitlines() if "training conversations" in x), ""), flush=True)
    lines = [json.loads(x) for x in (work / "sft" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "real_tokens_per_s" in m]
    last = last_timed(len(trained))
    # Each step's seconds: the growth of elapsed_s (the loop's clock; logging is ~1 ms of a step).
    timed = [(m, m["elapsed_s"] - p["elapsed_s"]) for p, m in itertools.pairwise(trained)]
    span = [(m, dt) for m, dt in timed if WINDOW < m["step"] <= last]
    seconds = sum(dt for _, dt in span)
    return {"real_tokens_per_s": sum(m["real_tokens_per_s"] * dt for m, dt in span) / seconds,
            "step_median": statistics.median(m["real_tokens_per_s"] for m, _ in span),
            "pad_fraction": statistics.fmean(m["pad_fraction"] for m, _ in span), "loss": lines[-1]["loss"],
            "seconds": time.perf_counter() - began}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps",
        type=int,
        default=3 * WINDOW + 1,
        help=f"more than {2 * WINDOW}: whole windows after the first are timed, not the final step",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=3000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.steps <= 2 * WINDOW:
        ap.error(f"--steps must be more than {2 * WINDOW}: the first window of {WINDOW} steps is start-up")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_inputs(root, args.conversations)
        recipe = root / "recipe.yaml"
        recipe.write_text(RECIPE.format(seq=SEQ, root=root, steps=args.steps))
        base = root / "base"
        engine(recipe, "--stages", "data,pretrain", f"run_dir={base}")
        for r in range(args.repeats):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for variant in order:
                runs[variant].append(measure(base, recipe, variant, root / f"{variant}-{r}"))
                print(f"repeat {r + 1} {variant}: {runs[variant][-1]['real_tokens_per_s']:.0f} real tokens/s, "
                      f"pad fraction {runs[variant][-1]['pad_fraction']:.3f}", flush=True)  # fmt: skip
    summary: dict[str, Any] = {}
    for variant, values in runs.items():
        summary[variant] = {k: statistics.median(v[k] for v in values) for k in values[0]}
    print(f"\nSFT, {args.conversations} conversations (10% near seq_length {SEQ}, the rest log-normal), "
          f"{args.steps} steps (timed: {WINDOW + 1}..{last_timed(args.steps)}) × {args.repeats} repeats, medians:")  # fmt: skip
    print(f"{'batching':9}  {'real tokens/s':>13}  {'step median':>11}  {'pad fraction':>12}  {'final loss':>10}")
    for variant in VARIANTS:
        s = summary[variant]
        print(f"{variant:9}  {s['real_tokens_per_s']:13.0f}  {s['step_median']:11.0f}  {s['pad_fraction']:12.3f}  "
              f"{s['loss']:10.3f}")  # fmt: skip
    vs_bucketed = summary["packed"]["real_tokens_per_s"] / summary["bucketed"]["real_tokens_per_s"]
    vs_padded = summary["packed"]["real_tokens_per_s"] / summary["padded"]["real_tokens_per_s"]
    print(f"packed / bucketed: {vs_bucketed:.2f}x   packed / padded: {vs_padded:.2f}x")
    print(f"goal packed >= 1.5x bucketed: {'PASS' if vs_bucketed >= 1.5 else 'FAIL'}")
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "runs": runs, "packed_over_bucketed": vs_bucketed,
                                        "packed_over_padded": vs_padded}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
