"""`engine chat` against the sampler itself: a small random-weight policy in a run directory, answered
through the CLI (one `--prompt`, and a piped multi-turn session) and directly by engine.worker.generate
on the same checkpoint; the replies must be the same tokens. The checks of target resolution,
truncation and the interactive loop need no model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.chat import SPECIAL_TOKENS, template_for
from engine.chat_session import Chat, Options, interactive, locate, newest_policy
from engine.errors import EngineError

from ..conftest import REPO

MAX_NEW = "8"
MOVED = "runs/chat-test-moved"  # the run directory recorded in plan.json and meta.json: not where it is now
MAKE_CHECKPOINT = """
import json, math, sys
from pathlib import Path
from engine.artifacts import write_json_atomic
from engine.hf import session
from engine.worker.handoff import meta_for
ckpt, info = Path(sys.argv[1]), json.loads(sys.argv[2])
arch = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
            ffn_hidden_size=176, seq_length=64, position_embedding="rope", rotary_base=10000.0,
            normalization="rmsnorm", activation="swiglu", tie_embeddings=False, add_bias_linear=False,
            norm_epsilon=1e-5, init_method_std=0.3, vocab_size=info["vocab_size"],
            padded_vocab_size=64 * math.ceil(info["vocab_size"] / 64))
ckpt.mkdir(parents=True)
with session.megatron("sft", arch) as s:
    session.save(s, ckpt)
    meta = meta_for(s.ctx, info, [])
write_json_atomic(ckpt / "meta.json", {**meta, "step": 1, "consumed_samples": 0})
"""
REFERENCE = """
import json, sys, torch
from pathlib import Path
from engine.chat import SpecialIds, render
from engine.corpus.tokenizer import load
from engine.hf import session
from engine.worker.checkpoint import read_meta
from engine.worker.generate import Sampling, generate
ckpt, tok, max_new = Path(sys.argv[1]), load(Path(sys.argv[2])), int(sys.argv[3])
meta = read_meta(ckpt)
ids = SpecialIds.lookup(tok.token_to_id)
stop = [ids.end, ids.eos]
def answer(model, messages, sampling, seed):
    prompt, _ = render(messages, lambda t: tok.encode(t, add_special_tokens=False).ids, ids, generation_prompt=True)
    out = generate(model, [prompt], max_new=max_new, sampling=sampling, stop=stop, pad=ids.pad,
                   vocab_size=meta["tokenizer"]["vocab_size"], generator=torch.Generator().manual_seed(seed))
    p, n = int(out.prompt_lengths[0]), int(out.response_lengths[0])
    return tok.decode([t for t in out.tokens[0, p : p + n].tolist() if t not in stop])
with session.megatron("reference", meta["architecture"]) as s:
    session.load(s, ckpt)
    greedy = Sampling(0.0)
    first = answer(s.model, [("user", "3+4=")], greedy, 0)
    replies = {
        "first": first,
        "second": answer(s.model, [("user", "3+4="), ("assistant", first), ("user", "1+1=")], greedy, 0),
        "fresh": answer(s.model, [("user", "5+5=")], greedy, 0),
        "sampled": answer(s.model, [("user", "3+4=")], Sampling(0.9, 20, 0.95), 7),
    }
print(json.dumps(replies))
"""


def _python(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, encoding="utf-8",
                          timeout=timeout, env=env, cwd=REPO)  # fmt: skip


def _chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return _python("-m", "engine", "chat", *args, stdin=stdin)


def _moved_run(run: Path) -> dict[str, Any]:
    """A run directory moved since it ran (plan.json and meta.json name the old place) with its tokenizer,
    a reward model's meta.json and an unfinished ppo stage; returns meta.json's tokenizer record."""
    from engine.corpus.tokenizer import describe, load, train_bpe

    tok_path = run / "data" / "tokenizer" / "tokenizer.json"
    tok_path.parent.mkdir(parents=True)
    texts = [f"{a}+{b}={a + b}" for a in range(31) for b in range(31)]
    train_bpe(texts, vocab_size=300, min_frequency=2).save(str(tok_path))
    info = {**describe(tok_path, load(tok_path)), "path": f"{MOVED}/data/tokenizer/tokenizer.json"}
    reward = run / "reward" / "checkpoints" / "step_00000002"
    reward.mkdir(parents=True)
    reward_meta = {"kind": "reward_model", "model": "reward_model", "head": {"outputs": 1}, "tokenizer": info}
    (reward / "meta.json").write_text(json.dumps(reward_meta))
    (run / "ppo" / "checkpoints" / "step_00000003").mkdir(parents=True)  # no meta.json: incomplete
    jobs = [("pretrain", "pretrain"), ("sft", "sft"), ("reward", "reward_model"), ("ppo", "ppo")]
    plan = {"run_dir": MOVED, "jobs": [{"name": n, "kind": k} for n, k in jobs]}
    (run / "plan.json").write_text(json.dumps(plan))
    return info


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The moved run with a random-weight sft checkpoint."""
    run = tmp_path_factory.mktemp("chat") / "run"
    info = _moved_run(run)
    done = _python("-c", MAKE_CHECKPOINT, str(run / "sft" / "checkpoints" / "step_00000001"), json.dumps(info))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def reference(run: Path) -> dict[str, str]:
    ckpt = run / "sft" / "checkpoints" / "step_00000001"
    done = _python("-c", REFERENCE, str(ckpt), str(run / "data" / "tokenizer" / "tokenizer.json"), MAX_NEW)
    assert done.returncode == 0, done.stderr[-3000:]
    replies: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    assert replies["first"] != replies["fresh"]  # the prompts matter, so the comparisons below do too
    return replies


@pytest.mark.slow
def test_prompt_answers_like_the_sampler(run: Path, reference: dict[str, str]) -> None:
    greedy = [_chat(str(run), "--prompt", "3+4=", "--temperature", "0", "--max-new-tokens", MAX_NEW) for _ in range(2)]
    for done in greedy:
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout == reference["first"] + "\n"
    sampled = _chat(str(run / "sft"), "--prompt", "3+4=", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95",
                    "--seed", "7", "--max-new-tokens", MAX_NEW)  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout == reference["sampled"] + "\n"


@pytest.mark.slow
def test_interactive_keeps_the_conversation_until_reset(run: Path, reference: dict[str, str]) -> None:
    done = _chat(str(run), "--temperature", "0", "--max-new-tokens", MAX_NEW, stdin="3+4=\n1+1=\n/reset\n5+5=\n/exit\n")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "".join(reference[k] + "\n" for k in ("first", "second", "fresh"))
    assert "step_00000001" in done.stderr and "conversation cleared" in done.stderr
    eof = _chat(str(run), "--temperature", "0", "--max-new-tokens", MAX_NEW, stdin="5+5=\n")  # Ctrl-D
    assert eof.returncode == 0 and eof.stdout == reference["fresh"] + "\n", eof.stderr[-3000:]


@pytest.mark.slow
def test_user_errors_are_one_line(tmp_path: Path) -> None:
    _moved_run(tmp_path / "run")
    for target, says in (
        (tmp_path / "nowhere", "does not exist"),
        (tmp_path / "run" / "reward", "is a reward_model checkpoint (a scalar head"),
        (tmp_path / "run", "has no complete checkpoint of a ppo, dpo, sft or pretrain stage"),
    ):
        done = _chat(str(target), "--prompt", "1+1=")
        assert done.returncode == 2, (target, done.stderr[-3000:])
        assert done.stdout == "" and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def _stage(run: Path, name: str, step: int, *, complete: bool = True) -> Path:
    folder = run / name / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "meta.json").write_text("{}")
    return folder


def test_the_newest_policy_of_a_run(tmp_path: Path) -> None:
    jobs = [{"name": n, "kind": k} for n, k in (("base", "pretrain"), ("tune", "sft"), ("rm", "reward_model"),
                                                ("rl", "ppo"))]  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps({"run_dir": "runs/x", "jobs": jobs}))
    with pytest.raises(EngineError, match="no complete checkpoint of a ppo, dpo, sft or pretrain stage"):
        newest_policy(tmp_path)
    base = _stage(tmp_path, "base", 400)
    assert newest_policy(tmp_path) == base
    _stage(tmp_path, "tune", 100)
    tune = _stage(tmp_path, "tune", 200)
    _stage(tmp_path, "tune", 300, complete=False)
    _stage(tmp_path, "rm", 500)
    assert newest_policy(tmp_path) == tune  # the reward model is no policy; step 300 is unfinished
    rl = _stage(tmp_path, "rl", 10)
    assert newest_policy(tmp_path) == rl


def test_a_moved_run_finds_its_own_tokenizer(tmp_path: Path) -> None:
    info = _moved_run(tmp_path)
    sft = tmp_path / "sft" / "checkpoints" / "step_00000001"
    sft.mkdir(parents=True)
    (sft / "meta.json").write_text(json.dumps({"kind": "sft", "tokenizer": info}))
    target = locate(tmp_path)
    assert target.checkpoint == sft and target.tokenizer == tmp_path / "data" / "tokenizer" / "tokenizer.json"
    assert locate(sft).tokenizer == target.tokenizer  # from the checkpoint up to its run
    loose = tmp_path / "copies" / "of" / "checkpoints" / sft.name  # outside any run: only meta.json's path
    shutil.copytree(sft, loose)
    with pytest.raises(EngineError, match="is not found"):
        locate(loose)
    assert locate(loose, target.tokenizer).tokenizer == target.tokenizer  # --tokenizer


class _Tokenizer:
    """One token per character: ids 0-6 are the chat template's, the rest are bytes + 7."""

    def token_to_id(self, token: str) -> int | None:
        return SPECIAL_TOKENS.index(token) if token in SPECIAL_TOKENS else None

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        return type("Encoding", (), {"ids": [7 + b for b in text.encode()]})()


def test_the_oldest_turns_are_dropped_once_the_context_is_full() -> None:
    notes: list[str] = []
    tok = _Tokenizer()
    chat = Chat(session=None, tok=tok, seq_length=32, vocab_size=300, notify=notes.append,
                options=Options(max_new_tokens=8, system="Add."), template=template_for({}, tok))  # fmt: skip
    # 24 tokens for the prompt: <|bos|>, the system message (6), each message (6), <|assistant|>. Five
    # messages need 38, three 26: whole exchanges go, so the new question remains alone.
    turns = [("user", "1+1="), ("assistant", "2222"), ("user", "2+2="), ("assistant", "4444"), ("user", "3+3=")]
    system, question = [7 + b for b in b"Add."], [7 + b for b in b"3+3="]
    assert chat._prompt(turns) == [1, 4, *system, 3, 5, *question, 3, 6]
    assert len(chat._prompt(turns[2:])) == 26 - 6 * 2 and len(notes) == 1  # said once
    assert "dropping the oldest turns" in notes[0]
    with pytest.raises(EngineError, match="shorten it or lower --max-new-tokens"):
        chat._prompt([("user", "9" * 30)])


def test_the_loop_survives_an_interrupted_reply() -> None:
    lines = ["1+1=", "2+2=", "/reset", "", "3+3="]
    said: list[str] = []
    notes: list[str] = []

    class Fake:
        resets = 0

        def reply(self, text: str) -> str:
            if text == "2+2=":
                raise KeyboardInterrupt  # Ctrl-C while the model answers
            return f"answer to {text}"

        def reset(self) -> None:
            self.resets += 1

    def ask() -> str:
        if not lines:
            raise EOFError  # Ctrl-D
        return lines.pop(0)

    fake = Fake()
    interactive(fake, ask, said.append, notes.append)  # type: ignore[arg-type]
    assert said == ["answer to 1+1=", "answer to 3+3="] and fake.resets == 1
    assert any("interrupted" in n for n in notes)


def _corrupt(path: Path, how: str) -> None:
    text = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(text[: len(text) // 3])
    elif how == "binary":
        path.write_bytes(b"\xff\xfe\x00\x01" + text[:40])
    elif how == "wrong shape":
        path.write_text("[1, 2, 3]")
    elif how == "architecture":  # meta.json says 3 layers; the checkpoint holds 2
        meta = json.loads(text)
        path.write_text(json.dumps({**meta, "architecture": {**meta["architecture"], "num_layers": 3}}))


def _one_message(done: subprocess.CompletedProcess[str], names: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and names in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_a_damaged_plan_or_meta_json_is_one_message_naming_it(run: Path, tmp_path: Path) -> None:
    """Every command that reads them; each way a file can be damaged is tests/test_damaged_files.py's."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _corrupt(copy / "plan.json", "truncated")
    for command in (["chat", str(copy), "--prompt", "1+1="], ["report", str(copy), "--out", str(tmp_path / "r.html")],
                    ["status", str(copy)], ["feedback", "ai", str(copy), "--reward", "exact_match", "--n", "1",
                                             "--db", str(tmp_path / "f.db")]):  # fmt: skip
        _one_message(_python("-m", "engine", *command), "plan.json")
    meta = copy / "sft" / "checkpoints" / "step_00000001" / "meta.json"
    _corrupt(meta, "wrong shape")
    for command in (["chat", str(copy / "sft"), "--prompt", "1+1="],
                    ["export", str(copy / "sft"), "--format", "hf", "--out", str(tmp_path / "hf")]):  # fmt: skip
        _one_message(_python("-m", "engine", *command), "meta.json")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_a_checkpoint_that_does_not_match_its_meta_json_is_one_message(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "sft" / "checkpoints" / "step_00000001"
    _corrupt(ckpt / "meta.json", "architecture")
    _one_message(_chat(str(copy / "sft"), "--prompt", "1+1="), f"checkpoint {ckpt} cannot be loaded")
    shutil.copy(run / "sft" / "checkpoints" / "step_00000001" / "meta.json", ckpt / "meta.json")
    for data in ckpt.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:100])  # a torn copy
    done = _python("-m", "engine", "export", str(copy / "sft"), "--format", "hf", "--out", str(tmp_path / "hf"),
                   "--tokenizer", str(copy / "data" / "tokenizer" / "tokenizer.json"))  # fmt: skip
    _one_message(done, f"checkpoint {ckpt} cannot be loaded")
    assert not (tmp_path / "hf").exists()
