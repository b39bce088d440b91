"""Peak memory per task of the sharded data stage: 1 shard against 4 shards of the same corpus.

A generated JSONL corpus (`--mb`, in 8 files, with exact and near duplicates) goes through the stage's
passes (engine.worker.stages.sharded) with exact and near dedup, each task in a fresh process, as the
tasks of a Slurm job run on their own nodes; printed per pass: the largest peak RSS among its tasks, and
the same for a process that only imports what the tasks import (the floor: the engine, datasketch,
tokenizers, webdataset). With 4 shards every task
should hold about a quarter of what the one task of 1 shard holds above that floor: the spooled records,
signatures and dedup keys of its shard or partition, never the corpus's.

    .venv/bin/python bench/data_shards_memory.py [--mb 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = """
name: shardmem
tokenizer: {kind: file, path: TOKENIZER}
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, seq_length: 64}
stages:
  data:
    kind: data
    shards: SHARDS
    dedup: {near: true, decontaminate: false}
    sources: [{name: corpus, plugin: jsonl, records: text, params: {glob: "CORPUS/*.jsonl"}}]
"""

TASK = """
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from engine.compile import compile_recipe
from engine.load import load_recipe
from engine.worker.context import Context, job_spec
from engine.worker.env import rank_info
from engine.worker.stages import collect, sharded
plan = compile_recipe(load_recipe(sys.argv[1], ["run_dir=" + sys.argv[2]]))
ctx = Context(plan=plan, job=plan.job("data"), info=rank_info({}), device="cpu")
spec, root, step, i = job_spec(ctx.job), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if step == "floor":  # what every task imports, with no data
    import datasketch, tokenizers, webdataset  # noqa: F401, E401
    datasketch.MinHashLSH(threshold=0.8, num_perm=128)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if step == "shard":
    sharded.shard_pass(spec, root, i, stage="data")
elif step == "dedup":
    sharded.dedup_pass(spec, root, i, stage="data")
elif step == "write":
    tok, info = collect.tokenizer(ctx, spec.sources, root, root)
    sharded.write_pass(spec, root, i, tok, info, stage="data")
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "floor_mb": before / 1024}))
"""


def corpus(folder: Path, megabytes: float) -> int:
    """Eight JSONL files; a tenth of the documents copy an earlier one, a tenth copy one with a word changed."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    folder.mkdir(parents=True)
    docs: list[str] = []
    size = 0
    while size < megabytes * 1e6:
        u = rng.random()
        if docs and u < 0.1:
            text = docs[int(rng.integers(len(docs)))]
        elif docs and u < 0.2:
            words = docs[int(rng.integers(len(docs)))].split()
            words[int(rng.integers(len(words)))] = "changed"
            text = " ".join(words)
        else:
            text = " ".join(rng.choice(vocab, size=int(rng.integers(100, 300)), p=weights))
        docs.append(text)
        size += len(text) + 12
    per = -(-len(docs) // 8)
    for f in range(8):
        (folder / f"{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[f * per : (f + 1) * per]))
    return len(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40.0)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from engine.corpus.tokenizer import train_bpe

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        n = corpus(tmp / "corpus", args.mb)
        sample = [json.loads(line)["text"] for line in (tmp / "corpus" / "0.jsonl").open()][:2000]
        train_bpe(sample, vocab_size=4096, min_frequency=2).save(str(tmp / "tokenizer.json"))
        results: dict[int, dict[str, tuple[float, float]]] = {}
        for shards in (1, 4):
            recipe = tmp / f"r{shards}.yaml"
            recipe.write_text(RECIPE.replace("TOKENIZER", str(tmp / "tokenizer.json")).replace("CORPUS", str(tmp / "corpus"))
                              .replace("SHARDS", str(shards)))  # fmt: skip
            root = tmp / f"run{shards}" / ".shards"
            root.mkdir(parents=True)
            results[shards] = {}
            for step in ("floor", "shard", "dedup", "write"):
                peaks = []
                for i in range(shards if step != "floor" else 1):
                    done = subprocess.run([sys.executable, "-c", TASK, str(recipe), str(tmp / f"run{shards}"), str(root),
                                           step, str(i)], capture_output=True, text=True, check=True, cwd=REPO)  # fmt: skip
                    got = json.loads(done.stdout.strip().splitlines()[-1])
                    peaks.append(got["rss_mb"])
                results[shards][step] = (max(peaks), min(peaks))
    print(f"corpus: {n} documents, {args.mb:g} MB in 8 JSONL files (generated); exact and near dedup")
    print("pass     1 shard: peak RSS   4 shards: largest task's peak RSS   (above the floor: 1 shard / 4 shards)")
    floor1, floor4 = results[1]["floor"][0], results[4]["floor"][0]
    for step in ("floor", "shard", "dedup", "write"):
        one, four = results[1][step][0], results[4][step][0]
        extra = "" if step == "floor" else f"   ({one - floor1:.0f} MB / {four - floor4:.0f} MB = {(one - floor1) / max(four - floor4, 1e-9):.1f}x)"
        print(f"{step:8s} {one:10.0f} MB {four:26.0f} MB{extra}")


if __name__ == "__main__":
    main()
