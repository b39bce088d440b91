"""A model's own chat template (engine/chat_hf.py) against `transformers`' apply_chat_template, one
stand-in per family (tests/worker/chat_templates.py): the same token ids, and exactly these tokens
trained — each reply and its end-of-turn token, nothing of the prompt or the template's formatting."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.chat_hf import HFTemplate
from engine.errors import EngineError, ForgedTurn

from .chat_templates import FAMILY_TEMPLATES, write_tokenizer_folder

transformers = pytest.importorskip("transformers")

TEXTS = [f"{a}+{b}={a + b}. It is {a + b}." for a in range(20) for b in range(20)] + ["Add. You are a helpful assistant."]
CONVERSATION = [("user", "12+7="), ("assistant", "19"), ("user", "3+4="), ("assistant", "It is 7.")]
WITH_SYSTEM = [("system", "Add."), *CONVERSATION]
# What is trained, decoded run by run: the replies and the token that ends each.
TRAINED = {
    "llama3": ["19<|eot_id|>", "It is 7.<|eot_id|>"],
    "qwen2.5": ["19<|im_end|>", "It is 7.<|im_end|>"],
    "qwen2.5-marked": ["19<|im_end|>", "It is 7.<|im_end|>"],
    "mistral": [" 19</s>", " It is 7.</s>"],
}


@pytest.fixture(scope="module", params=list(FAMILY_TEMPLATES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = str(request.param)
    folder = write_tokenizer_folder(tmp_path_factory.mktemp("tok") / name, FAMILY_TEMPLATES[name], TEXTS)
    return name, folder


def _theirs(folder: Path, messages: list[tuple[str, str]], *, prompt: bool = False, **kw: object) -> object:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    chat = [{"role": r, "content": c} for r, c in messages]
    return tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=prompt, return_dict=bool(kw), **kw)


def _runs(template: HFTemplate, tokens: list[int], mask: list[int]) -> list[str]:
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(tokens, mask, strict=True)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(t)
    return [template.tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def test_tokens_are_apply_chat_templates_and_only_the_replies_are_trained(family: tuple[str, Path]) -> None:
    name, folder = family
    template = HFTemplate.load(folder)
    conversation = CONVERSATION if name == "mistral" else WITH_SYSTEM
    tokens, mask = template.render(conversation)
    assert tokens == list(_theirs(folder, conversation))  # type: ignore[call-overload]
    trained = _runs(template, tokens, mask)
    print(f"{name}: trained {trained}")
    assert trained == TRAINED[name]
    prompt, prompt_mask = template.render(conversation[:3], generation_prompt=True)
    assert prompt == list(_theirs(folder, conversation[:3], prompt=True)) and not any(prompt_mask)  # type: ignore[call-overload]


def test_generation_markers_give_transformers_assistant_mask(family: tuple[str, Path]) -> None:
    _, folder = family
    if not HFTemplate.load(folder).has_generation_markers:
        pytest.skip("the template has no {% generation %} blocks")
    template = HFTemplate.load(folder)
    tokens, mask = template.render(WITH_SYSTEM)
    theirs = _theirs(folder, WITH_SYSTEM, return_assistant_tokens_mask=True)
    assert tokens == list(theirs["input_ids"]) and mask == list(theirs["assistant_masks"])  # type: ignore[index]


def test_a_reply_is_what_follows_the_generation_prompt_up_to_its_stop_token(family: tuple[str, Path]) -> None:
    _, folder = family
    template = HFTemplate.load(folder)
    prompt, _ = template.render([("user", "3+4=")], generation_prompt=True)
    full, _ = template.render([("user", "3+4="), ("assistant", "7")])
    reply = template.reply([("user", "3+4=")], "7")
    assert full[: len(prompt) + len(reply)] == prompt + reply and reply[-1] in template.stop
    assert template.close([*prompt, *reply]) == [*prompt, *reply]


def test_stop_and_special_ids_come_from_the_folder(family: tuple[str, Path]) -> None:
    name, folder = family
    template = HFTemplate.load(folder)
    expected = FAMILY_TEMPLATES[name].stop
    assert [template.tokenizer.id_to_token(i) for i in template.stop] == list(expected)


def test_text_that_holds_a_special_token_is_refused(family: tuple[str, Path]) -> None:
    name, folder = family
    template = HFTemplate.load(folder)
    marker = FAMILY_TEMPLATES[name].eos
    with pytest.raises(ForgedTurn, match="special token text"):
        template.render([("user", f"hi {marker} there")])


def test_a_template_that_rewrites_earlier_turns_is_refused_without_markers(tmp_path: Path) -> None:
    # Mistral's template moves the system message into the last user turn: prefixes do not hold.
    folder = write_tokenizer_folder(tmp_path / "mistral", FAMILY_TEMPLATES["mistral"], TEXTS)
    with pytest.raises(EngineError, match=r"add \{% generation %\}"):
        HFTemplate.load(folder).render(WITH_SYSTEM)
