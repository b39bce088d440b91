"""What the feedback app and AI feedback sample from: a policy checkpoint, its tokenizer and a prompt set.

The target is a run directory (its newest policy: the last ppo, sft or pretrain stage in plan order
with a complete checkpoint), a stage's folder or one checkpoint folder. A run that was moved keeps
working: the tokenizer and data paths recorded at training time are read relative to the run.

Prompts come from a JSONL file (`{"prompt": ..., "reference": ...}` per line) or, by default, from the
run's data stage: the prompt shards of its `prompt` sources (checked against the manifest's sha256), the
same records PPO answers. Sampling is PPO's and chat's: the chat template's generation prompt
(engine/chat.py), KV-cache generation (engine/worker/generate.py) until `<|end|>` or `<|eos|>`, the
stop tokens dropped when decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts import inside_run, plan_jobs, read_manifest
from ..errors import EngineError
from ..kinds import producing
from .store import ModelVersion

if TYPE_CHECKING:  # chat_session builds models: imported where a model is located, not at start-up
    from ..chat_session import Target

PLAN = "plan.json"


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    reference: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)  # what reward functions may need of the prompt


@dataclass(frozen=True)
class PromptSet:
    name: str  # where the prompts came from and a hash of their texts: the store's cursor key
    rows: list[PromptRow]


def model_version(target: Target) -> ModelVersion:
    """What the store records of the model behind a response: its checkpoint, step and meta.json's hash."""
    sha = hashlib.sha256((target.checkpoint / "meta.json").read_bytes()).hexdigest()
    return ModelVersion(str(target.checkpoint), target.meta.get("step"), sha)


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: half the model's sequence length, at most 256
    seed: int = 0


# ---- prompt sets ------------------------------------------------------------------------------------
def _named(source: str, rows: list[PromptRow]) -> PromptSet:
    if not rows:
        raise EngineError(f"{source} holds no prompts")
    digest = hashlib.sha256(json.dumps([[r.prompt, r.reference] for r in rows]).encode()).hexdigest()[:16]
    return PromptSet(name=f"{source}#{digest}", rows=rows)


def prompts_file(path: Path) -> PromptSet:
    """`{"prompt": ..., "reference": ...}` per line; a line without a prompt is an error naming it."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EngineError(f"cannot read --prompts {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            reference, metadata = row.get("reference"), row.get("metadata")
            rows.append(PromptRow(str(row["prompt"]), None if reference is None else str(reference),
                                  metadata if isinstance(metadata, dict) else {}))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EngineError(f'{path}:{number}: not a {{"prompt": ..., "reference": ...}} line ({exc})') from None
    return _named(f"file:{path.resolve()}", rows)


def run_prompts(run: Path | None, split: str = "train") -> PromptSet:
    """The prompt records of the run's data stage (every source with `records: prompt`), one split."""
    if run is None:
        raise EngineError(
            "the model is not inside a run directory, so there are no run prompts; pass --prompts FILE.jsonl"
        )
    rows: list[PromptRow] = []
    for job in plan_jobs(run):
        if job.get("kind") not in producing("data"):
            continue
        outputs = job.get("outputs")
        found = [a["path"] for a in (outputs if isinstance(outputs, list) else [])
                 if isinstance(a, dict) and a.get("kind") == "dataset" and "path" in a]  # fmt: skip
        if not found:
            continue
        data = inside_run(run, str(found[0]))
        if (data / "manifest.json").is_file():
            rows += [PromptRow(r["prompt_text"], r.get("reference"), r.get("metadata") or {})
                     for r in _prompt_shards(data, split)]  # fmt: skip
    return _named(f"run:{run.resolve()}:{split}", rows)


def _prompt_shards(root: Path, split: str) -> Iterator[dict[str, Any]]:
    manifest = read_manifest(root)
    for name, source in manifest["sources"].items():
        if source["records"] != "prompt":
            continue
        for shard in source["splits"].get(split, {}).get("shards", []):
            raw = (root / name / split / shard["path"]).read_bytes()
            if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
                raise EngineError(
                    f"shard {root / name / split / shard['path']} does not match its manifest; rerun the data stage"
                )
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for member in tar:
                    f = tar.extractfile(member) if member.name.endswith(".json") else None
                    if f is not None:
                        yield json.loads(f.read())


def setup(target: Path, prompts: Path | None, split: str, db: Path | None,
          tokenizer: Path | None = None) -> tuple[Target, PromptSet, Path]:  # fmt: skip
    """The model to sample, the prompt set (a file, else the run's) and the database (default: RUN/feedback/)."""
    from ..chat_session import locate

    found = locate(target, tokenizer)
    prompt_set = prompts_file(prompts) if prompts is not None else run_prompts(found.run, split)
    default_db = (found.run / "feedback" if found.run is not None else Path(".")) / "feedback.db"
    return found, prompt_set, db or default_db


# ---- sampling ---------------------------------------------------------------------------------------
class Sampler:
    """K responses per prompt from a loaded policy, one batch of prompts at a time."""

    def __init__(self, session: Any, tok: Any, target: Target, options: SamplingOptions) -> None:
        from ..chat import template_for

        self.session, self.tok, self.target, self.options = session, tok, target, options
        arch = target.architecture
        self.seq_length = int(arch["seq_length"])
        self.vocab = int(target.meta["tokenizer"].get("vocab_size") or arch["vocab_size"])
        self.template = template_for({**target.meta["tokenizer"], "path": str(target.tokenizer)}, tok)
        self.stop = list(self.template.stop)
        self.max_new = options.max_new_tokens or min(256, self.seq_length // 2)
        if self.max_new >= self.seq_length:
            raise EngineError(
                f"--max-new-tokens {self.max_new} leaves no room for a prompt in {self.seq_length} tokens"
            )

    @property
    def sampling(self) -> dict[str, Any]:
        o = self.options
        return {"temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p, "max_new_tokens": self.max_new,
                "seed": o.seed}  # fmt: skip

    def encode(self, prompt: str) -> list[int] | None:
        """The generation prompt's tokens, or None when it leaves no room for a response (or its text holds a
        special token of the template)."""
        from ..errors import ForgedTurn

        try:
            tokens, _ = self.template.render([("user", prompt)], generation_prompt=True)
        except ForgedTurn:
            return None
        return tokens if len(tokens) + self.max_new <= self.seq_length else None

    def responses(self, prompts: list[list[int]], k: int, *, seed: int) -> list[list[str]]:
        """k sampled responses to each tokenised prompt; `seed` fixes the draw (the store's prompt index)."""
        import torch

        from ..worker.generate import Sampling, generate

        o = self.options
        gen = torch.Generator().manual_seed(o.seed * 1_000_003 + seed)
        rows = [p for p in prompts for _ in range(k)]
        out = generate(self.session.model, rows, max_new=self.max_new, sampling=Sampling(o.temperature, o.top_k, o.top_p),
                       stop=self.stop, pad=self.template.pad, vocab_size=self.vocab, generator=gen)  # fmt: skip
        texts = []
        for r in range(len(rows)):
            start, n = int(out.prompt_lengths[r]), int(out.response_lengths[r])
            texts.append(self.tok.decode([t for t in out.tokens[r, start : start + n].tolist() if t not in self.stop]))
        return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


@contextmanager
def open_sampler(target: Target, options: SamplingOptions) -> Iterator[Sampler]:
    """The target's model built and loaded once in this process; Megatron's start-up chatter goes to stderr."""
    from ..corpus.tokenizer import load as load_tokenizer
    from ..hf import session

    tok = load_tokenizer(target.tokenizer)
    with redirect_stdout(sys.stderr), session.megatron("feedback", target.architecture) as s:
        session.load(s, target.checkpoint)
        yield Sampler(s, tok, target, options)
