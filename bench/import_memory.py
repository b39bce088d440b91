"""Peak memory of `engine import` against the size of the model it imports.

A random Llama (about 150M parameters; bf16 safetensors in shards of 200 MB, as published checkpoints
are) is written once. Then, each in a fresh process and interleaved over repeats, three imports run and
report their peak RSS (ru_maxrss):

* tiny      the same import of a 2-layer, 64-wide model: the fixed cost (Python, torch, Megatron-Core)
* stream    `engine import` of the big model: tensors read one at a time from the memory-mapped shards
* whole     the reference, what loading a checkpoint whole costs: every tensor read into a dict first
            (safetensors' load_file, as fp32), then converted and copied into the same model

The numbers are (peak - tiny's peak) / the model's fp32 bytes: 1.0 means the model is held once. The
engine's import builds the Megatron model in fp32, so "the model once" is 4 bytes a parameter.

    .venv/bin/python bench/import_memory.py [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
           vocab_size=32768)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)  # fmt: skip

IMPORT = """
import resource, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
from engine.hf import from_hf
if sys.argv[3] == "whole":  # the reference: read every tensor first, then convert and copy
    from safetensors.torch import load_file
    from engine.hf import convert, session
    def whole(s, shards, arch):
        tensors = {}
        for path in shards.files:
            tensors |= {k: v.float() for k, v in load_file(str(path)).items()}
        session.set_weights(s, convert.from_hf(tensors, arch))
    from_hf._load_weights = whole
from_hf.import_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def write_model(folder: Path, sizes: dict[str, int], tokenizer: Path) -> int:
    """A random LlamaForCausalLM in bf16 shards; returns its parameter count."""
    import shutil

    import torch
    import transformers

    config = transformers.LlamaConfig(**sizes, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200MB")
    shutil.copyfile(tokenizer, folder / "tokenizer.json")
    return sum(p.numel() for p in model.parameters())


def peak(source: Path, out: Path, how: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", IMPORT, str(source), str(out), how], capture_output=True, text=True,
                          env=env, cwd=REPO)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"import ({how}) failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from engine.corpus.tokenizer import train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)]
        train_bpe(texts, vocab_size=400, min_frequency=2).save(str(root / "tokenizer.json"))
        big, tiny = root / "big", root / "tiny"
        params = write_model(big, BIG, root / "tokenizer.json")
        write_model(tiny, TINY, root / "tokenizer.json")
        file_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))
        fp32 = 4 * params
        print(f"model: {params / 1e6:.1f}M parameters, {file_bytes / 2**20:.0f} MiB of bf16 shards, "
              f"{fp32 / 2**20:.0f} MiB in fp32")  # fmt: skip
        runs: dict[str, list[int]] = {"tiny": [], "stream": [], "whole": []}
        for r in range(args.repeats):
            for how in ("tiny", "stream", "whole") if r % 2 == 0 else ("whole", "stream", "tiny"):
                out = root / f"out-{how}-{r}"
                runs[how].append(peak(tiny if how == "tiny" else big, out, "whole" if how == "whole" else "stream"))
                print(f"repeat {r + 1} {how:6} peak RSS {runs[how][-1] / 2**20:7.0f} MiB", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        ratio = {k: (med[k] - med["tiny"]) / fp32 for k in ("stream", "whole")}
        print(f"\nmedians over {args.repeats} repeats (peak RSS - the tiny import's, in fp32 model sizes):")
        print(f"  stream (engine import)  {ratio['stream']:.2f}x the model")
        print(f"  whole  (reference)      {ratio['whole']:.2f}x the model")
        print(f"target: the import holds the model once (≤ 1.5x): {'PASS' if ratio['stream'] <= 1.5 else 'FAIL'}")
        if args.out:
            result = {"params": params, "fp32_bytes": fp32, "file_bytes": file_bytes, "peak_rss": runs,
                      "median_over_model": ratio}  # fmt: skip
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
