"""`engine chat`: a multi-turn conversation with a trained policy in one CPU process.

The target is a run directory (its newest policy: the last of its ppo, sft and pretrain stages, in
plan order, that has a complete checkpoint), a stage's folder, or one checkpoint folder. The model is
built once through engine/hf/session.py, the same Megatron-Core GPTModel the workers train, and
answers with engine/worker/generate.py, the KV-cache sampler PPO's rollouts use.

Every turn renders the whole conversation with the checkpoint's chat template (engine/chat.py: the
engine's own, or the model's HF template) and the assistant's generation prompt, samples until a stop
token of the template (`<|end|>`/`<|eos|>`, `<|eot_id|>`, `<|im_end|>`, `</s>`) or `max_new_tokens`, and keeps
the decoded reply as the assistant's message. The model sees at most `seq_length` positions, so when
prompt and reply would not fit, the oldest turns are dropped (the system message stays).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import inside_run, plan_jobs, run_of
from .chat import Template, template_for
from .errors import EngineError, ForgedTurn
from .hf.to_hf import resolve_checkpoint, tokenizer_file
from .kinds import either, producing
from .worker import checkpoint

POLICY_KINDS = producing("policy")  # pretrain, sft, ppo: the kinds whose checkpoints chat can sample
PLAN = "plan.json"
Message = tuple[str, str]


@dataclass(frozen=True)
class Options:
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: half the model's sequence length
    seed: int | None = None
    system: str | None = None


@dataclass(frozen=True)
class Target:
    """A policy checkpoint to sample from (chat, the feedback app), its meta.json, its tokenizer and the
    run directory it belongs to, if any."""

    checkpoint: Path
    meta: dict[str, Any]
    tokenizer: Path
    run: Path | None = None

    @property
    def architecture(self) -> dict[str, Any]:
        """meta.json's architecture, which the model is built from (a user error naming the file if absent)."""
        arch = self.meta.get("architecture")
        if not isinstance(arch, dict):
            raise EngineError(f"{self.checkpoint / checkpoint.META}: the checkpoint's meta.json has no 'architecture' "
                              "section; restore it from a copy, or rerun the stage that wrote it")  # fmt: skip
        return arch


def newest_policy(run: Path) -> Path:
    """The newest complete checkpoint of the run's last policy stage in plan order (usually ppo, else sft,
    else pretrain)."""
    for job in reversed(plan_jobs(run)):
        if job.get("kind") in POLICY_KINDS:
            found = checkpoint.latest_checkpoint(run / job["name"] / "checkpoints")
            if found is not None:
                return found
    raise EngineError(
        f"{run} has no complete checkpoint of a {either(POLICY_KINDS[::-1])} stage; "
        f"train one first (engine run RECIPE --stages ...)"
    )


def locate(target: Path, tokenizer: Path | None = None) -> Target:
    """The checkpoint to sample from, its meta.json and its tokenizer; a scalar-head model is refused."""
    if not target.exists():
        raise EngineError(
            f"{target} does not exist; give a run directory (runs/<name>), a stage's folder or a checkpoint"
        )
    run = target if (target / PLAN).is_file() else None
    ckpt = newest_policy(target) if run is not None else resolve_checkpoint(target)
    run = run or run_of(ckpt)
    meta = checkpoint.read_meta(ckpt)
    if "head" in meta:
        raise EngineError(
            f"{ckpt} is a {meta.get('model', 'scalar-head')} checkpoint (a scalar head, no language-model output); "
            f"use a {either(POLICY_KINDS)} stage instead"
        )
    meta = checkpoint.read_object_meta(ckpt, required=("tokenizer",))
    found = tokenizer_file(meta, tokenizer or inside_run(run, meta.get("tokenizer", {}).get("path", "")))
    return Target(checkpoint=ckpt, meta=meta, tokenizer=found, run=run)


@dataclass
class Chat:
    """A loaded model and the conversation so far."""

    session: Any  # engine.hf.session.Session
    tok: Any  # tokenizers.Tokenizer
    seq_length: int
    vocab_size: int
    options: Options
    notify: Callable[[str], None]
    template: Template
    messages: list[Message] = field(default_factory=list)
    truncated_once: bool = False
    max_new: int = field(init=False)
    generator: Any = field(init=False)  # torch.Generator

    def __post_init__(self) -> None:
        import torch

        self.max_new = self.options.max_new_tokens or min(512, self.seq_length // 2)
        if self.max_new >= self.seq_length:
            raise EngineError(
                f"--max-new-tokens {self.max_new} leaves no room for a prompt: the model sees "
                f"{self.seq_length} tokens; use at most {self.seq_length - 8}"
            )
        self.generator = torch.Generator()
        if self.options.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.options.seed)

    def reset(self) -> None:
        self.messages.clear()

    def _prompt(self, messages: list[Message]) -> list[int]:
        system = [("system", self.options.system)] if self.options.system else []
        budget = self.seq_length - self.max_new
        while True:
            try:
                tokens, _ = self.template.render([*system, *messages], generation_prompt=True)
            except ForgedTurn as exc:
                raise EngineError(f"{exc}, which the chat template would parse as a turn marker; rephrase it") from None
            if len(tokens) <= budget:
                return tokens
            if len(messages) <= 1:
                raise EngineError(
                    f"the message is {len(tokens)} tokens with the template; the model sees {self.seq_length}, "
                    f"{self.max_new} of them for the reply: shorten it or lower --max-new-tokens"
                )
            if not self.truncated_once:
                self.notify(
                    f"(the conversation no longer fits the model's {self.seq_length} tokens with {self.max_new} "
                    "kept for the reply: dropping the oldest turns)"
                )
                self.truncated_once = True
            messages = messages[2:] if len(messages) > 2 else messages[1:]  # the oldest exchange

    def reply(self, text: str) -> str:
        """The assistant's answer to `text`; the turn joins the conversation only once answered."""
        from .worker.generate import Sampling, generate

        conversation = [*self.messages, ("user", text)]
        prompt = self._prompt(conversation)
        o = self.options
        stop = list(self.template.stop)
        out = generate(
            self.session.model, [prompt], max_new=self.max_new, sampling=Sampling(o.temperature, o.top_k, o.top_p),
            stop=stop, pad=self.template.pad, vocab_size=self.vocab_size, generator=self.generator,
        )  # fmt: skip
        start, n = int(out.prompt_lengths[0]), int(out.response_lengths[0])
        answer: str = self.tok.decode([t for t in out.tokens[0, start : start + n].tolist() if t not in stop])
        self.messages[:] = [*conversation, ("assistant", answer)]
        return answer


@contextmanager
def open_chat(target: Target, options: Options, notify: Callable[[str], None]) -> Iterator[Chat]:
    """The target's model built and loaded once; Megatron's start-up chatter goes to stderr."""
    from .corpus.tokenizer import load as load_tokenizer
    from .hf import session

    arch = target.architecture
    tok = load_tokenizer(target.tokenizer)
    with ExitStack() as stack:
        with redirect_stdout(sys.stderr):
            s = stack.enter_context(session.megatron("chat", arch))
            session.load(s, target.checkpoint)
        vocab = int(target.meta["tokenizer"].get("vocab_size") or arch["vocab_size"])
        template = template_for({**target.meta["tokenizer"], "path": str(target.tokenizer)}, tok)
        yield Chat(session=s, tok=tok, seq_length=int(arch["seq_length"]), vocab_size=vocab, options=options,
                   notify=notify, template=template)  # fmt: skip


def reader(console: Any) -> Callable[[], str]:
    """A line from the user after a prompt on `console`: with line editing at a terminal, echoed when piped
    (so a transcript shows both sides)."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (arrow keys and history for input())

        return lambda: str(console.input("[bold green]you>[/] "))

    def piped() -> str:
        line = str(console.input("[bold green]you>[/] "))
        console.print(line, markup=False, highlight=False)
        return line

    return piped


def say(text: str) -> None:
    """A reply on stdout, verbatim: one line per reply unless the model wrote newlines."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def interactive(chat: Chat, ask: Callable[[], str], show: Callable[[str], None], note: Callable[[str], None]) -> None:
    """Read a message, answer it, repeat: `/reset` forgets the conversation, `/exit`, EOF or Ctrl-C at the
    prompt leaves, Ctrl-C while the model answers drops that turn."""
    while True:
        try:
            text = ask().strip()
        except (EOFError, KeyboardInterrupt):
            note("")
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            chat.reset()
            note("(conversation cleared)")
            continue
        if not text:
            continue
        try:
            show(chat.reply(text))
        except KeyboardInterrupt:
            note("(interrupted; that turn is dropped)")
        except EngineError as exc:
            note(f"error: {exc.render()}")
