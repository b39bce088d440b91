"""recipes/finetune_tiny_qwen.yaml end to end: scripts/make_tiny_qwen.py builds a random tiny Qwen2.5-style
HF model with a ChatML tokenizer and imports it; the recipe runs data → SFT → reward model → PPO on CPU
with the model's own template; the PPO policy exports as a Qwen2ForCausalLM that generates, greedily in
transformers, the replies `engine chat --temperature 0` gives."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ..conftest import REPO

transformers = pytest.importorskip("transformers")

RECIPE = REPO / "recipes" / "finetune_tiny_qwen.yaml"
PROMPTS = ("3+4=", "What is 12+7?", "12+19=")


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-qwen")
    done = _run("scripts/make_tiny_qwen.py", "--out", str(root / "model"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    imported = root / "model" / "imported"
    done = _run("-m", "engine", "run", str(RECIPE), f"run_dir={root / 'run'}", f"tokenizer.path={imported}",
                f"stages.sft.init_from={imported}")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _metrics(run: Path, stage: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "run" / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_chain_trains_with_the_models_own_template(run: Path) -> None:
    sft = [r for r in _metrics(run, "sft") if "val_loss" in r]
    print(f"SFT val loss {sft[0]['val_loss']:.3f} → {sft[-1]['val_loss']:.3f}")
    assert sft[-1]["val_loss"] < 0.5 * sft[0]["val_loss"]
    manifest = json.loads((run / "run" / "data" / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["template"]["kind"] == "hf"
    # One SFT record as the data stage wrote it: the reply and <|im_end|> are trained, nothing else.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "model" / "imported" / "tokenizer.json"))
    shard = run / "run" / "data" / "data" / "chats" / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        sample = json.load(io.TextIOWrapper(tar.extractfile(member)))  # type: ignore[arg-type]
    text = tok.decode(sample["tokens"], skip_special_tokens=False)
    trained = tok.decode([t for t, m in zip(sample["tokens"], sample["loss_mask"], strict=True) if m],
                         skip_special_tokens=False)  # fmt: skip
    reply = text.split("<|im_start|>assistant\n")[-1].split("<|im_end|>")[0]
    print(f"rendered {text!r}; trained {trained!r}")
    assert text.startswith("<|im_start|>system\n") and trained == reply + "<|im_end|>"


@pytest.mark.slow
def test_the_export_generates_what_engine_chat_generates(run: Path) -> None:
    out = run / "exported"
    done = _run("-m", "engine", "export", str(run / "run" / "ppo"), "--out", str(out))
    assert done.returncode == 0 and "Qwen2ForCausalLM" in done.stdout, done.stderr[-3000:]
    ours = []
    for prompt in PROMPTS:
        done = _run("-m", "engine", "chat", str(run / "run" / "ppo"), "--prompt", prompt, "--temperature", "0",
                    "--max-new-tokens", "12")  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        ours.append(done.stdout.rstrip("\n"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)  # fmt: skip
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1] :]
        theirs.append(tok.decode(new, skip_special_tokens=True))
    print(f"engine chat {ours}; transformers {theirs}")
    assert ours == theirs and any(ours)
