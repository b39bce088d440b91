"""Local stand-ins for the chat templates of the mapped families (no hub here): each has the shape and the
special tokens of the family's published template. Shared by the template tests and the tiny Qwen recipe.

    folder = write_tokenizer_folder(path, FAMILY_TEMPLATES["qwen2.5"], texts)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FamilyTemplate:
    specials: tuple[str, ...]
    source: str
    bos: str | None
    eos: str
    pad: str | None
    stop: tuple[str, ...]  # generation_config.json's eos_token_id


# Llama 3 Instruct's template: header tokens around the role, <|eot_id|> ends every turn.
LLAMA3 = FamilyTemplate(
    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    source=(
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
        "{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad=None,
    stop=("<|end_of_text|>", "<|eot_id|>"),
)
# Qwen2.5's ChatML: a default system message, <|im_start|>role\n … <|im_end|>\n.
CHATML = FamilyTemplate(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    source=(
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    stop=("<|im_end|>", "<|endoftext|>"),
)
# The same ChatML with the assistant's content in {% generation %} blocks (as TRL's templates mark it).
CHATML_MARKED = FamilyTemplate(
    specials=CHATML.specials,
    source=(
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
        "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
        "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    stop=("<|im_end|>", "<|endoftext|>"),
)
# Mistral v0.3's [INST]: the system message joins the last user turn; replies end with </s>.
MISTRAL = FamilyTemplate(
    specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
    source=(
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + "
        "message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- endif %}{%- endfor %}"
    ),
    bos="<s>",
    eos="</s>",
    pad=None,
    stop=("</s>",),
)
FAMILY_TEMPLATES = {"llama3": LLAMA3, "qwen2.5": CHATML, "qwen2.5-marked": CHATML_MARKED, "mistral": MISTRAL}


def write_tokenizer_folder(folder: Path, family: FamilyTemplate, texts: Iterable[str], vocab_size: int = 400) -> Path:
    """A byte-level BPE with the family's special tokens first, its tokenizer_config.json (chat template,
    bos/eos/pad) and a generation_config.json with its stop tokens: what `save_pretrained` writes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": family.source, "bos_token": family.bos,
        "eos_token": family.eos, "pad_token": family.pad, "clean_up_tokenization_spaces": False,
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    stop = [tok.token_to_id(t) for t in family.stop]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stop if len(stop) > 1 else stop[0]}))
    return folder
