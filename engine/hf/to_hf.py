"""`engine export`: a training stage's checkpoint → a Hugging Face folder of a mapped family.

The folder holds what `transformers` loads as the family's causal LM (LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM; engine/hf/convert.py) and `AutoTokenizer`.
A model trained with its own HF tokenizer folder (`tokenizer: {kind: hf}`) gets that folder's files back
as they were (its chat template, special tokens) and generation_config.json's stop tokens. Otherwise:
model.safetensors, config.json, generation_config.json, and the engine's own tokenizer.json with a
tokenizer_config.json (PreTrainedTokenizerFast; bos/eos/pad from the chat template's special tokens;
the chat template of engine/chat.py as a Jinja `chat_template`). Generation stops at `<|end|>`, the
end of an assistant turn, or at `<|eos|>`.

A scalar-head checkpoint (a reward model, PPO's critic) is refused: it is no causal language model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..chat import BOS, END, EOS, PAD, ROLES
from ..compile.resolve import recorded_architecture
from ..errors import EngineError
from ..kinds import either, producing
from ..worker import checkpoint
from . import convert, session

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_checkpoint(artifact: Path) -> Path:
    """A checkpoint folder (with meta.json), or the newest complete one under a stage's folder
    (`runs/<run>/<stage>`) or its `checkpoints/`, chosen as the training loop chooses it."""
    if (artifact / checkpoint.META).is_file():
        return artifact
    for root in (artifact, artifact / "checkpoints"):
        found = checkpoint.latest_checkpoint(root)
        if found is not None:
            return found
    raise EngineError(
        f"{artifact} holds no complete checkpoint; give a stage's folder (runs/<run>/<stage>), "
        "its checkpoints/ folder, or one checkpoint folder with a meta.json"
    )


def chat_template() -> str:
    """engine/chat.py's template in Jinja: <|bos|>, each message as <role>content<|end|>, then
    <|assistant|> for a generation prompt or <|eos|> after a whole conversation."""
    roles = ", ".join(f"'{role}': '{token}'" for role, token in ROLES.items())
    return (
        "{% set roles = {" + roles + "} %}{{ '" + BOS + "' }}{% for message in messages %}"
        "{% if message['role'] not in roles %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
        "{{ roles[message['role']] + message['content'] + '" + END + "' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ roles['assistant'] }}{% else %}{{ '" + EOS + "' }}{% endif %}"
    )


def tokenizer_file(meta: dict[str, Any], given: Path | None) -> Path:
    """The checkpoint's tokenizer.json, checked against the hash recorded at training time."""
    want = meta.get("tokenizer", {}).get("sha256")
    path = given or Path(meta.get("tokenizer", {}).get("path", ""))
    if not path.is_file():
        raise EngineError(
            f"the checkpoint's tokenizer {str(path)!r} is not found (relative paths: from the directory the run "
            "started in); run from there, or pass --tokenizer PATH"
        )
    have = hashlib.sha256(path.read_bytes()).hexdigest()
    if have != want:
        raise EngineError(f"{path} has sha256 {have}, the checkpoint was trained with {want}; pass its tokenizer.json")
    return path


def _tokenizer_files(folder: Path, source: Path, meta: dict[str, Any]) -> None:
    tok, arch = meta["tokenizer"], meta["architecture"]
    shutil.copyfile(source, folder / "tokenizer.json")
    if (tok.get("template") or {}).get("kind") == "hf":  # the model's own template and special tokens, as imported
        from .from_hf import TOKENIZER_FILES

        for name in TOKENIZER_FILES[1:]:
            if (source.parent / name).is_file() and name != "generation_config.json":
                shutil.copyfile(source.parent / name, folder / name)
        generation = {"bos_token_id": tok.get("bos"), "eos_token_id": tok["template"]["stop"], "pad_token_id": tok.get("pad")}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        return
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": arch["seq_length"],
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(),
    }
    generation = {
        "bos_token_id": tok.get("bos"),
        "eos_token_id": [tok.get("end"), tok.get("eod")],
        "pad_token_id": tok.get("pad"),
    }
    for name, data in (
        ("tokenizer_config", config),
        ("special_tokens_map", special),
        ("generation_config", generation),
    ):
        (folder / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def imported_model_type(meta: dict[str, Any], *, depth: int = 32) -> str | None:
    """The HF model_type the checkpoint's lineage was imported from: its own meta.json's `source`, or its
    first parent's, up the chain while the parents are still on disk."""
    for _ in range(depth):
        source = meta.get("source")
        if isinstance(source, dict) and isinstance(source.get("config"), dict):
            found = source["config"].get("model_type")
            return found if isinstance(found, str) else None
        parents = meta.get("parents") or []
        parent = Path(str(parents[0])) / checkpoint.META if parents else None
        if parent is None or not parent.is_file():
            return None
        try:
            meta = json.loads(parent.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
    return None


def _refusals(meta: dict[str, Any], family: str | None) -> tuple[convert.Family | None, list[str]]:
    if "head" in meta:
        return None, [
            f"it is a {meta.get('model', 'scalar-head')} checkpoint (a scalar head, no language-model output); "
            f"export a {either(producing('policy'))} stage instead"
        ]
    arch = recorded_architecture(meta.get("architecture", {}))
    if family is None:  # the family the model came from, where it still fits
        origin = imported_model_type(meta)
        fits = [f.name for f in convert.FAMILIES.values() if f.model_type == origin]
        family = fits[0] if fits and not convert.export_family(arch, fits[0])[1] else None
    chosen, problems = convert.export_family(arch, family)
    return chosen, ([f"no HF family expresses {', '.join(problems)}"] if problems else [])


def export_checkpoint(
    artifact: Path, out: Path, *, dtype: str = "fp32", tokenizer: Path | None = None, family: str | None = None
) -> tuple[Path, str]:
    """Write the newest checkpoint of `artifact` to `out` as a HF folder of `family` (default: the family it
    was imported from, else the one whose switches the architecture has: llama, qwen2 for q/k/v biases,
    qwen3 for q/k norms); returns the checkpoint used and the HF class written."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(artifact)
    meta = checkpoint.read_model_meta(ckpt)
    chosen, refused = _refusals(meta, family)
    if refused or chosen is None:
        raise EngineError(f"cannot export {ckpt}: " + "; ".join(refused))
    source = tokenizer_file(meta, tokenizer)
    arch = recorded_architecture(meta["architecture"])
    with session.staged(out) as folder:
        with session.megatron("export", arch) as s:
            session.load(s, ckpt)
            tensors = {k: v.to(DTYPES[dtype]) for k, v in convert.to_hf(session.weights(s), arch).items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = convert.hf_config(chosen, arch, meta["tokenizer"], str(DTYPES[dtype]).removeprefix("torch."))
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _tokenizer_files(folder, source, meta)
    return ckpt, chosen.hf_class
