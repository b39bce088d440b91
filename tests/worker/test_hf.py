"""Hugging Face export and import against `transformers` itself: a tiny random LlamaForCausalLM is
imported (Megatron's logits equal transformers'), fine-tuned by an SFT stage that starts from the
import at TP2, and exported again (transformers' logits equal Megatron's), on CPU in fp32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from engine.chat import SpecialIds, render
from engine.corpus.tokenizer import train_bpe
from engine.errors import EngineError
from engine.hf import convert

from ..conftest import REPO
from .helpers import MEGATRON_LOGITS

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
HF_VOCAB = 320  # the tokenizer's 300 ids padded to a multiple of 64: the import keeps every row


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return _run("-m", "engine", *args)


def _texts() -> list[str]:
    return [f"{a}+{b}={a + b}" for a in range(31) for b in range(31)] + ["What is the sum?", "The answer is"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM (GQA, untied, non-default rope theta and epsilon) and its tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    folder.mkdir()
    train_bpe(_texts(), vocab_size=300, min_frequency=2).save(str(folder / "tokenizer.json"))
    config = transformers.LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_theta=50000.0, rms_norm_eps=1e-6,
        initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(hf_dir: Path) -> tuple[Path, str]:
    out = hf_dir.parent / "imported"
    done = _engine("import", str(hf_dir), "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(1))


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits: torch.Tensor = model(tokens).logits
    return logits


def _megatron_logits(tokens: torch.Tensor, tmp: Path, *artifacts: Path) -> dict[str, torch.Tensor]:
    torch.save(tokens, tmp / "tokens.pt")
    done = _run("-c", MEGATRON_LOGITS, str(tmp / "tokens.pt"), str(tmp / "logits.pt"), *map(str, artifacts))
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, torch.Tensor] = torch.load(tmp / "logits.pt")
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_import_gives_transformers_logits(hf_dir: Path, imported: tuple[Path, str], tokens: torch.Tensor) -> None:
    out, printed = imported
    meta = json.loads((out / "meta.json").read_text())
    assert meta["architecture"]["padded_vocab_size"] == HF_VOCAB and meta["architecture"]["vocab_size"] == 300
    assert meta["architecture"]["rotary_base"] == 50000.0 and meta["tokenizer"]["path"] == str(out / "tokenizer.json")
    ours = _megatron_logits(tokens, out.parent, out)[str(out)]
    theirs = _hf_logits(hf_dir, tokens)
    diff = _max_diff(ours, theirs)
    print(f"import: max abs logit difference {diff:.2e} (logits up to {theirs.abs().max():.2f})")
    assert diff <= TOLERANCE
    recipe = yaml.safe_load(printed.split("\n", 1)[1])  # the fine-tuning recipe `engine import` prints
    assert recipe["stages"]["sft"]["init_from"] == str(out) and recipe["model"]["make_vocab_size_divisible_by"] == 64
    assert list(recipe["stages"]) == ["data", "sft", "reward", "ppo"] and recipe["tokenizer"]["kind"] == "file"


def test_export_round_trip_and_tokenizer(hf_dir: Path, imported: tuple[Path, str], tokens: torch.Tensor) -> None:
    out = imported[0].parent / "exported"
    done = _engine("export", str(imported[0]), "--format", "hf", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(_hf_logits(out, tokens), _hf_logits(hf_dir, tokens)) <= TOLERANCE
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = SpecialIds.lookup(tok.convert_tokens_to_ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids.bos, ids.eos, ids.pad)
    messages = [("system", "Add."), ("user", "12+7="), ("assistant", "19")]

    def encode(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    chat = [{"role": r, "content": c} for r, c in messages]
    for convo, prompt in ((chat, False), (chat[:2], True)):
        want, _ = render([(m["role"], m["content"]) for m in convo], encode, ids, generation_prompt=prompt)
        got = tok.apply_chat_template(convo, tokenize=True, add_generation_prompt=prompt, return_dict=False)
        assert list(got) == want
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids.end, ids.eos]


def _recipe(tmp: Path, imported: Path, printed: str) -> Path:
    """Data (arithmetic conversations, the imported tokenizer) and an SFT stage at TP2 from the import."""
    printed_recipe = yaml.safe_load(printed.split("\n", 1)[1])
    sections = {k: printed_recipe[k] for k in ("tokenizer", "model")}
    recipe: dict[str, Any] = {
        "name": "hfimport", "run_dir": str(tmp / "run"), **sections,
        "stages": {
            "data": {"kind": "data", "splits": {"train": 0.8, "valid": 0.1, "test": 0.1}, "dedup": {"near": False},
                     "sources": [{"name": "chats", "plugin": "arithmetic", "records": "conversation",
                                  "params": {"num_samples": 200}}]},
            "sft": {"kind": "sft", "init_from": str(imported), "data": "data",
                    "resources": {"gpus_per_node": 2}, "parallelism": {"tp": 2},
                    "training": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3}},
        },
    }  # fmt: skip
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_sft_starts_from_the_import_and_its_tp2_checkpoint_exports(
    imported: tuple[Path, str], tokens: torch.Tensor, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, *imported)
    done = _engine("run", str(recipe))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "val_loss" in lines[0]  # the imported model, measured before training
    meta = json.loads(next((tmp_path / "run" / "sft" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["parents"] == [str(imported[0])] and meta["layout"]["tp"] == 2
    out = tmp_path / "exported"
    done = _engine("export", str(tmp_path / "run" / "sft"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    ours = _megatron_logits(tokens, tmp_path, tmp_path / "run" / "sft")[str(tmp_path / "run" / "sft")]
    diff = _max_diff(_hf_logits(out, tokens), ours)
    print(f"export of the TP2 SFT checkpoint: max abs logit difference {diff:.2e}")
    assert diff <= TOLERANCE


def test_export_refuses_a_reward_model(imported: tuple[Path, str], tmp_path: Path) -> None:
    fake = tmp_path / "reward"
    shutil.copytree(imported[0], fake)
    meta = json.loads((fake / "meta.json").read_text())
    (fake / "meta.json").write_text(json.dumps({**meta, "model": "reward_model", "head": {"outputs": 1}}))
    done = _engine("export", str(fake), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "reward_model checkpoint (a scalar head" in done.stderr and not (tmp_path / "out").exists()


def test_import_refuses_a_tokenizer_without_the_chat_tokens(hf_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path / "plain"
    shutil.copytree(hf_dir, folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_texts(), trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    done = _engine("import", str(folder), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "lacks the chat template's special tokens" in done.stderr and "resize_token_embeddings" in done.stderr


def test_qkv_and_vocabulary_layouts() -> None:
    arch = {"num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 4}
    q, k, v = torch.randn(32, 16), torch.randn(8, 16), torch.randn(8, 16)
    fused = convert.fuse_qkv(q, k, v, arch)
    # group 0: query heads 0-3, then key head 0, then value head 0
    assert torch.equal(fused[:16], q[:16]) and torch.equal(fused[16:20], k[:4]) and torch.equal(fused[20:24], v[:4])
    assert all(torch.equal(a, b) for a, b in zip(convert.split_qkv(fused, arch), (q, k, v), strict=True))
    assert convert.vocab_divisor(300, 320, None) == 64 and convert.vocab_divisor(128256, 128256, None) == 128
    assert convert.vocab_divisor(300, 300, None) == 4  # 300 = 4·75: no padding row
    assert convert.vocab_divisor(300, 330, None) is None  # no divisor pads 300 to 330: the recipe keeps vocab_rows
    with pytest.raises(EngineError, match="pads the tokenizer's 300 tokens to 320 rows, the model has 330"):
        convert.vocab_divisor(300, 330, 64)
    with pytest.raises(EngineError, match="only 200 embedding rows"):
        convert.vocab_divisor(300, 200, None)
