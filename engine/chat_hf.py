"""A model's own chat template: the Jinja `chat_template` of a Hugging Face tokenizer folder.

The folder is what `save_pretrained` writes for a tokenizer: tokenizer.json, tokenizer_config.json (its
`chat_template`, or a chat_template.jinja beside it; `bos_token`, `eos_token`, `pad_token`) and, from
the model, generation_config.json (`eos_token_id`: the tokens generation stops at, e.g. Llama 3.1's
<|eot_id|>, Qwen's <|im_end|>, Mistral's </s>).

Rendering is what `apply_chat_template` does: the template in a sandboxed Jinja environment with
`raise_exception`, `tojson`, `bos_token`/`eos_token` and `add_generation_prompt`, then the text
tokenised with the tokenizer's special tokens parsed and no post-processor tokens added (the template
writes them). `strftime_now` is left undefined, so templates that date their system prompt (Llama 3.1)
take their fixed default date and a conversation renders the same tokens every day.

The loss mask marks the assistant's tokens:

* where the template has `{% generation %}` … `{% endgeneration %}` blocks, the characters inside them;
* otherwise by rendering prefixes: the reply to the conversation's first k messages is what the
  rendering of k+1 messages adds to the rendering of k with the generation prompt. A template whose
  renderings are not prefixes of each other (one that rewrites earlier turns) is refused with that
  reason: add generation markers to it.

Either way the mask ends at the reply's first stop token, which is trained (the model learns to end its
turn); what a template writes after it (ChatML's newline) is formatting the model never generates.

A message whose text contains a special token's text is refused (`ForgedTurn`): parsed, it would
forge a turn.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EngineError, ForgedTurn

OPEN, CLOSE = "\x02", "\x03"  # markers the generation blocks render as (stripped before tokenising)
GENERATION = re.compile(r"\{%(-?)\s*generation\s*(-?)%\}")
END_GENERATION = re.compile(r"\{%(-?)\s*endgeneration\s*(-?)%\}")
CONFIG, JINJA, GENERATION_CONFIG = "tokenizer_config.json", "chat_template.jinja", "generation_config.json"


def _token_text(value: Any) -> str | None:
    """tokenizer_config's bos/eos/pad entries: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_source(folder: Path) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`
    (a string, or a list of named templates of which `default` is used)."""
    if (folder / JINJA).is_file():
        return (folder / JINJA).read_text(encoding="utf-8")
    if not (folder / CONFIG).is_file():
        return None
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EngineError(f"{folder / CONFIG} is not valid JSON ({exc})") from None
    found = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = named.get("default")
    return found if isinstance(found, str) else None


@dataclass
class HFTemplate:
    """A HF chat template over its tokenizer (see the module docstring)."""

    source: str
    tokenizer: Any  # tokenizers.Tokenizer, special tokens parsed
    bos_token: str | None
    eos_token: str | None
    pad: int
    stop: tuple[int, ...]
    specials: tuple[str, ...]  # the text of every special token, for ForgedTurn
    _compiled: Any = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def has_generation_markers(self) -> bool:
        return bool(GENERATION.search(self.source))

    @classmethod
    def load(cls, folder: Path, *, expect_sha256: str | None = None) -> HFTemplate:
        """The template of a HF tokenizer folder; `expect_sha256` checks it is the one a run recorded."""
        from tokenizers import Tokenizer

        source = template_source(folder)
        if source is None:
            raise EngineError(
                f"{folder} has no chat template (tokenizer_config.json 'chat_template' or {JINJA}); "
                "use a chat model's tokenizer folder, or the engine's template with `tokenizer: {kind: file}`"
            )
        if expect_sha256 is not None and hashlib.sha256(source.encode()).hexdigest() != expect_sha256:
            raise EngineError(f"{folder}: the chat template is not the one this run was trained with ({expect_sha256})")
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"{folder} has no tokenizer.json; save a fast tokenizer (`tokenizer.save_pretrained`)")
        tok = Tokenizer.from_file(str(path))
        tok.encode_special_tokens = False  # the template's special tokens are parsed; contents are checked
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8")) if (folder / CONFIG).is_file() else {}
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        pad_text = _token_text(config.get("pad_token"))

        def token_id(text: str | None, what: str) -> int | None:
            if text is None:
                return None
            found = tok.token_to_id(text)
            if found is None:
                raise EngineError(f"{folder / CONFIG}: {what} {text!r} is not a token of tokenizer.json")
            return int(found)

        eos_id = token_id(eos, "eos_token")
        stop: list[int] = []
        if (folder / GENERATION_CONFIG).is_file():
            given = json.loads((folder / GENERATION_CONFIG).read_text(encoding="utf-8")).get("eos_token_id")
            stop = [int(i) for i in (given if isinstance(given, list) else [given]) if isinstance(i, int)]
        if eos_id is not None and eos_id not in stop:
            stop.append(eos_id)
        if not stop:
            raise EngineError(
                f"{folder}: no stop token: set eos_token in {CONFIG} or eos_token_id in {GENERATION_CONFIG}"
            )
        pad = token_id(pad_text, "pad_token")
        specials = tuple(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
        return cls(source, tok, bos, eos, pad if pad is not None else stop[0], tuple(stop), specials)

    # ------------------------------------------------------------------------------------------ rendering
    def _template(self) -> Any:
        if self._compiled is None:
            from jinja2 import ext
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                       sort_keys: bool = False) -> str:  # fmt: skip
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)  # fmt: skip

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            source = GENERATION.sub(r"{%\1 if true \2%}{{ '" + OPEN + "' }}", self.source)
            source = END_GENERATION.sub(r"{{ '" + CLOSE + r"' }}{%\1 endif \2%}", source)
            try:
                self._compiled = env.from_string(source)
            except TemplateError as exc:
                raise EngineError(f"the chat template does not compile: {exc}") from None
        return self._compiled

    def text(self, messages: Sequence[tuple[str, str]], *, generation_prompt: bool) -> str:
        """The rendered text, generation markers included."""
        from jinja2.exceptions import TemplateError

        for _, content in messages:
            forged = [s for s in self.specials if s in content] + [m for m in (OPEN, CLOSE) if m in content]
            if forged:
                raise ForgedTurn(f"a message contains the special token text {forged[0]!r}")
        try:
            out: str = self._template().render(
                messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )  # fmt: skip
        except TemplateError as exc:
            raise EngineError(f"the chat template refused the conversation: {exc}") from None
        return out

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of rendered text and each token's first character."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [start for start, _ in enc.offsets]

    def _spans(self, messages: Sequence[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans of its assistant replies."""
        marked = self.text(messages, generation_prompt=False)
        if self.has_generation_markers:
            spans: list[tuple[int, int]] = []
            plain: list[str] = []
            open_at: int | None = None
            for ch in marked:
                if ch == OPEN:
                    open_at = len(plain)
                elif ch == CLOSE and open_at is not None:
                    spans.append((open_at, len(plain)))
                    open_at = None
                else:
                    plain.append(ch)
            return "".join(plain), spans
        spans = []
        for k, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            before = self.text(messages[:k], generation_prompt=True)
            after = self.text(messages[: k + 1], generation_prompt=False)
            if not (after.startswith(before) and marked.startswith(after)):
                raise EngineError(
                    "the chat template renders a conversation's turns differently once later turns follow, so "
                    "the assistant's tokens cannot be found by rendering prefixes; add {% generation %} "
                    "… {% endgeneration %} around the assistant's content in the template"
                )
            spans.append((len(before), len(after)))
        return marked, spans

    def render(
        self, messages: Sequence[tuple[str, str]], *, generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        if generation_prompt:
            tokens, _ = self._encode(self.text(messages, generation_prompt=True).replace(OPEN, "").replace(CLOSE, ""))
            return tokens, [0] * len(tokens)
        text, spans = self._spans(messages)
        tokens, starts = self._encode(text)
        mask = [0] * len(tokens)
        for lo, hi in spans:
            inside = [i for i, s in enumerate(starts) if lo <= s < hi]
            for i in inside:
                mask[i] = 1
                if tokens[i] in self.stop:
                    break  # the reply ends at its stop token; what follows is formatting
        return tokens, mask

    def reply(self, messages: Sequence[tuple[str, str]], text: str) -> list[int]:
        tokens, mask = self.render([*messages, ("assistant", text)])
        prompt, _ = self.render(messages, generation_prompt=True)
        if tokens[: len(prompt)] != prompt:
            raise EngineError("the chat template's generation prompt is not how it renders the start of a reply")
        last = max((i for i, m in enumerate(mask) if m), default=len(tokens) - 1)
        return tokens[len(prompt) : last + 1]

    def close(self, response: list[int]) -> list[int]:
        return response
