"""Chat templates for GGUF files that carry none, chosen by the model's architecture (`general.architecture`).

A model only stops when it is prompted in the turn format it was trained on: it ends its turn with its own marker
(`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`…), which its vocabulary marks end-of-generation, and the engine stops
there. Prompted in another format (ChatML for Gemma), it never emits a marker it knows, runs to `max_tokens`, and
writes the foreign marker out as text. So a model without a template gets the format of its family, as llama.cpp
knows them; ChatML only for architectures this table does not name.

`turn_markers` names the markers a template uses, so that the server can also stop on them as text: a model that
spells a marker out in plain pieces must not show it to the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BuiltinTemplate:
    name: str
    source: str


# Gemma (1, 2, 3, 3n): no system role; a system message is folded into the first user turn. The assistant is "model".
GEMMA = BuiltinTemplate(
    "gemma",
    "{{ bos_token }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}"
    "{% set system.text = system.text + message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' and system.text %}{{ system.text }}{% set system.text = '' %}{% endif %}"
    "{{ (message['content'] or '') | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if system.text %}{{ '<start_of_turn>user\n' + system.text | trim + '<end_of_turn>\n' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
)

CHATML = BuiltinTemplate(
    "chatml",
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{{ '<|im_start|>' + role + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
)

LLAMA3 = BuiltinTemplate(
    "llama3",
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + (message['content'] or '') | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
)

# Llama 2 chat: the system prompt sits in <<SYS>> inside the first [INST]; each exchange is its own BOS…EOS.
LLAMA2 = BuiltinTemplate(
    "llama2",
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}"
    "{% set system.text = system.text + message['content'] %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + (message['content'] or '') | trim + ' ' + eos_token }}"
    "{% else %}"
    "{{ bos_token + '[INST] ' }}"
    "{% if system.text %}{{ '<<SYS>>\n' + system.text + '\n<</SYS>>\n\n' }}{% set system.text = '' %}{% endif %}"
    "{{ (message['content'] or '') | trim + ' [/INST]' }}"
    "{% endif %}"
    "{% endfor %}",
)

# Mistral (v0.1-v0.3 instruct): like Llama 2 without <<SYS>>; a system message opens the first user turn.
MISTRAL = BuiltinTemplate(
    "mistral",
    "{{ bos_token }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}"
    "{% set system.text = system.text + message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ (message['content'] or '') | trim + eos_token }}"
    "{% else %}"
    "{{ '[INST] ' + system.text + (message['content'] or '') | trim + '[/INST]' }}{% set system.text = '' %}"
    "{% endif %}"
    "{% endfor %}",
)

PHI3 = BuiltinTemplate(
    "phi3",
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{{ '<|' + role + '|>\n' + (message['content'] or '') + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
)

TEMPLATES = {template.name: template for template in (GEMMA, CHATML, LLAMA3, LLAMA2, MISTRAL, PHI3)}

_BY_ARCHITECTURE = {
    "gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA, "gemma3n": GEMMA, "gemma-embedding": GEMMA,
    "qwen": CHATML, "qwen2": CHATML, "qwen2moe": CHATML, "qwen2vl": CHATML, "qwen3": CHATML, "qwen3moe": CHATML,
    "internlm2": CHATML, "orion": CHATML, "minicpm": CHATML, "smollm3": CHATML,
    "phi3": PHI3, "phimoe": PHI3,
    "mistral": MISTRAL,
}  # fmt: skip


def template_for(metadata: Mapping[str, Any]) -> BuiltinTemplate:
    """The template for a GGUF without one, from its header's metadata.

    `llama` names several families: a byte-level BPE vocabulary (`tokenizer.ggml.model` = gpt2) is Llama 3's, a
    SentencePiece one Llama 2's or, when the model says so in its name, Mistral's.
    """
    architecture = str(metadata.get("general.architecture", "")).lower()
    if architecture == "llama":
        if str(metadata.get("tokenizer.ggml.model", "")) == "gpt2":
            return LLAMA3
        name = f"{metadata.get('general.name', '')} {metadata.get('general.basename', '')}".lower()
        return MISTRAL if "mistral" in name else LLAMA2
    return _BY_ARCHITECTURE.get(architecture, CHATML)


MARKERS = (
    "<|im_end|>", "<|im_start|>",
    "<end_of_turn>", "<start_of_turn>",
    "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
    "[INST]", "[/INST]",
)  # fmt: skip
"""Turn markers of the known chat formats: never a thing a model means to say to a user."""


def turn_markers(template_source: str) -> tuple[str, ...]:
    """The turn markers `template_source` writes: where the model's answer must end if it writes one as text."""
    return tuple(marker for marker in MARKERS if marker in template_source)
