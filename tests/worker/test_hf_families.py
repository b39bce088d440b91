"""Every mapped Hugging Face family against `transformers` itself, on tiny random configs built from the
config classes (tests/worker/hf_families_check.py): Megatron's logits of the import equal transformers'
logits of the source, the export loads as the source's class with the same logits, and import → export
gives back the source's tensors bit for bit. Then what the mapping cannot express is refused, naming
the config.json key and value, and a Qwen2.5-style import (q/k/v biases, tied embeddings) trained one
SFT step at TP2 and at PP2 exports and loads in transformers with Megatron's logits, as does a Qwen3 one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from engine.corpus.tokenizer import train_bpe
from engine.errors import EngineError
from engine.hf import convert

from ..conftest import REPO
from .helpers import MEGATRON_LOGITS

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5  # fp32 logits, max abs difference
CHECK = REPO / "tests" / "worker" / "hf_families_check.py"
VARIANTS = ("llama3", "llama3.1", "llama3.2", "qwen2.5", "qwen3", "mistral")


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _texts() -> list[str]:
    return [f"{a}+{b}={a + b}" for a in range(31) for b in range(31)] + ["What is the sum?", "The answer is"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("families")
    train_bpe(_texts(), vocab_size=300, min_frequency=2).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def checked(work: Path) -> dict[str, Any]:
    done = _run(str(CHECK), str(work / "tokenizer.json"), str(work))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    for name, r in results.items():
        print(f"{name:9} {r['class']:19} import {r['import_diff']:.1e}  export {r['export_diff']:.1e}  "
              f"(logits up to {r['logit_scale']:.1f})  bit-identical {r['bit_identical']}")  # fmt: skip
    return results


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_family_imports_and_exports_as_transformers_computes_it(checked: dict[str, Any], variant: str) -> None:
    r = checked[variant]
    assert r["import_diff"] <= TOLERANCE, r
    assert r["export_diff"] <= TOLERANCE and r["bit_identical"], r
    assert r["class"] == r["source_class"]  # Mistral exports as Mistral: the import's lineage says so
    if variant in ("llama3.1", "llama3.2"):  # the scaling matters on these tokens: ignoring it would fail
        assert r["rope_scaling_effect"] > 1000 * TOLERANCE, r


@pytest.mark.slow
def test_the_recipe_section_states_each_family_switch(checked: dict[str, Any]) -> None:
    model = {name: r["section"]["model"] for name, r in checked.items()}
    assert "rope_scaling_factor" not in model["llama3"] and model["llama3.1"]["rope_scaling_factor"] == 8.0
    assert model["llama3.2"]["rope_scaling_factor"] == 32.0 and model["llama3.2"]["tie_embeddings"] is True
    assert model["qwen2.5"]["qkv_bias"] is True and model["qwen2.5"]["rotary_base"] == 1e6
    assert model["qwen3"]["qk_layernorm"] is True and model["qwen3"]["kv_channels"] == 32
    assert "kv_channels" not in model["mistral"] and "qkv_bias" not in model["mistral"]
    assert model["qwen2.5"]["vocab_rows"] == 330 and "make_vocab_size_divisible_by" not in model["qwen2.5"]
    others = [m for name, m in model.items() if name != "qwen2.5"]
    assert all(m["make_vocab_size_divisible_by"] == 64 and "vocab_rows" not in m for m in others)  # 300 → 320 rows


BASE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)  # fmt: skip


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=True"),
        ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]}, "layer_types="),
        ({"model_type": "llama", "attention_bias": True}, "attention_bias=True"),
        ({"model_type": "llama", "mlp_bias": True}, "mlp_bias=True"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}},
         "rope_scaling.high_freq_factor=2.0"),
        ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"model_type": "qwen2_moe", "num_experts": 8}, "model_type='qwen2_moe'"),
        ({"model_type": "mllama"}, "model_type='mllama'"),
    ],
)  # fmt: skip
def test_what_the_mapping_cannot_express_is_refused_by_key_and_value(config: dict[str, Any], named: str) -> None:
    with pytest.raises(EngineError) as info:
        convert.architecture_from_hf({**BASE, **config}, vocab_size=300, padded_vocab_size=320, seq_length=64)
    assert named in str(info.value)


def test_qkv_biases_fuse_per_group_like_the_weights() -> None:
    arch = {"num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 4}
    q, k, v = torch.randn(32), torch.randn(8), torch.randn(8)
    fused = convert.fuse_qkv(q, k, v, arch)
    assert torch.equal(fused[:16], q[:16]) and torch.equal(fused[16:20], k[:4]) and torch.equal(fused[20:24], v[:4])
    assert all(torch.equal(a, b) for a, b in zip(convert.split_qkv(fused, arch), (q, k, v), strict=True))


def test_export_refuses_an_architecture_no_family_has() -> None:
    arch = {**convert.FIXED, "qkv_bias": True, "qk_layernorm": True}
    assert convert.export_family(arch, None)[0] is None
    _, problems = convert.export_family({**convert.FIXED, "qkv_bias": True}, "llama")
    assert problems and "family 'llama'" in problems[0]
    assert convert.export_family({**convert.FIXED, "qkv_bias": True}, None)[0] is convert.FAMILIES["qwen2"]




@pytest.mark.slow
@pytest.mark.parametrize(("variant", "hf_class"), [("qwen2.5", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_an_import_trained_at_tp2_and_pp2_exports_with_megatrons_logits(
    checked: dict[str, Any], work: Path, tmp_path: Path, variant: str, hf_class: str
) -> None:
    """Qwen2.5 (q/k/v biases split over TP, tied embeddings across PP stages, vocab_rows) and Qwen3 (per-head
    q/k norms and kv_channels ≠ hidden/heads under TP)."""
    imported = work / variant / "imported"
    section = checked[variant]["section"]
    sft = {"kind": "sft", "init_from": str(imported), "data": "data", "resources": {"gpus_per_node": 2},
           "training": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0}}  # fmt: skip
    recipe = {
        "name": "qwenimport", "run_dir": str(tmp_path / "run"), **section,
        "stages": {
            "data": {"kind": "data", "splits": {"train": 0.8, "valid": 0.1, "test": 0.1}, "dedup": {"near": False},
                     "sources": [{"name": "chats", "plugin": "arithmetic", "records": "conversation",
                                  "params": {"num_samples": 100}}]},
            "sft_tp2": {**sft, "parallelism": {"tp": 2}},
            "sft_pp2": {**sft, "parallelism": {"pp": 2}},
        },
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = _run("-m", "engine", "run", str(tmp_path / "recipe.yaml"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    torch.save(tokens, tmp_path / "tokens.pt")
    stages = [tmp_path / "run" / s for s in ("sft_tp2", "sft_pp2")]
    done = _run("-c", MEGATRON_LOGITS, str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt"), *map(str, stages))
    assert done.returncode == 0, done.stderr[-3000:]
    ours = torch.load(tmp_path / "logits.pt")
    for stage in stages:
        meta = json.loads(next((stage / "checkpoints").glob("step_*/meta.json")).read_text())
        assert meta["step"] == 1 and meta["parents"] == [str(imported)]
        out = tmp_path / f"{stage.name}-hf"
        done = _run("-m", "engine", "export", str(stage), "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        assert hf_class in done.stdout
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = model(tokens).logits
        moved = float((ours[str(stage)] - model_logits_of(imported, tokens)).abs().max())
        diff = float((theirs - ours[str(stage)]).abs().max())
        print(f"{stage.name}: export vs Megatron {diff:.1e}; one step moved the logits by {moved:.2e}")
        assert diff <= TOLERANCE and moved > 1e-3


def model_logits_of(imported: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits of the source the import came from (the model before the SFT step)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(imported.parent / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        out: torch.Tensor = model(tokens).logits
    return out


@pytest.mark.slow
def test_import_writes_a_fine_tuning_recipe_for_the_cluster_that_validates(
    checked: dict[str, Any], work: Path, tmp_path: Path
) -> None:
    source = work / "qwen2.5" / "hf"
    recipe = tmp_path / "finetune.yaml"
    done = _run("-m", "engine", "import", str(source), "--out", str(tmp_path / "imported"), "--cluster", "h100",
                "--recipe", str(recipe))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    written = yaml.safe_load(recipe.read_text())
    assert yaml.safe_load(done.stdout.split("\n", 1)[1]) == written  # printed and written alike
    assert written["cluster"] == "h100" and list(written["stages"]) == ["data", "sft", "reward", "ppo"]
    assert written["stages"]["sft"]["init_from"] == str(tmp_path / "imported")
    assert written["stages"]["sft"]["parallelism"] == {"tp": 2} and written["model"]["qkv_bias"] is True
    done = _run("-m", "engine", "validate", str(recipe))
    assert done.returncode == 0 and "valid" in done.stdout, done.stderr
    again = _run("-m", "engine", "import", str(source), "--out", str(tmp_path / "other"), "--recipe", str(recipe))
    assert again.returncode == 2 and "exists" in again.stderr and not (tmp_path / "other").exists()
    assert yaml.safe_load(recipe.read_text()) == written  # never overwritten
