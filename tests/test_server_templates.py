"""A model stops where its template says a turn ends, and a turn marker never reaches the client as text.

A GGUF without a chat template is prompted in its architecture's format (`runtime.models.builtin_templates`); the
markers of the template in force also end an answer when a model spells one out in plain text pieces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sealbox.runtime.models.builtin_templates import CHATML, GEMMA, LLAMA2, LLAMA3, MISTRAL, PHI3, template_for, turn_markers
from sealbox.runtime.models.gguf_facts import read_header
from sealbox.runtime.server.chat_template import ChatTemplate
from server_support import ServerProcess


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"general.architecture": "gemma3"}, GEMMA),
        ({"general.architecture": "gemma2"}, GEMMA),
        ({"general.architecture": "gemma"}, GEMMA),
        ({"general.architecture": "qwen2"}, CHATML),
        ({"general.architecture": "phi3"}, PHI3),
        ({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"}, LLAMA3),
        ({"general.architecture": "llama", "tokenizer.ggml.model": "llama"}, LLAMA2),
        ({"general.architecture": "llama", "tokenizer.ggml.model": "llama", "general.name": "Mistral 7B Instruct"},
         MISTRAL),
        ({"general.architecture": "somethingnew"}, CHATML),
    ],
    ids=lambda value: value.name if hasattr(value, "name") else None,
)
def test_a_gguf_without_a_template_gets_its_architectures_format(metadata: dict, expected: object) -> None:
    assert template_for(metadata) is expected


def test_gemma_is_prompted_in_gemmas_turns_with_the_system_message_in_the_first_user_turn() -> None:
    rendered = ChatTemplate(GEMMA.source, bos_token="<bos>").render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    )  # fmt: skip
    assert rendered == (
        "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
        "<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n"
    )
    assert turn_markers(GEMMA.source) == ("<end_of_turn>", "<start_of_turn>")


def test_the_real_gemma_file_has_no_template_and_is_given_gemmas(gemma_model: Path) -> None:
    metadata = read_header(gemma_model).metadata
    assert "tokenizer.chat_template" not in metadata
    assert template_for(metadata) is GEMMA


SAYS_A_MARKER = {"type": "object", "properties": {"say": {"const": "one <|im_end|> two"}}, "required": ["say"]}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("appliance")
    with ServerProcess(root, models=[tiny_model], policy_text="[limits]\ncontext = 512\nmax_tokens = 64\n",
                       no_auth=True) as server:  # fmt: skip
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as client:
            yield client


def test_a_turn_marker_spelt_out_as_text_ends_the_answer_and_is_not_shown(client: openai.OpenAI) -> None:
    # The grammar makes the model write "<|im_end|>" in plain pieces (the marker's own token is end-of-generation).
    response_format = {"type": "json_schema", "json_schema": {"name": "say", "schema": SAYS_A_MARKER}}
    options = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=40,
                   response_format=response_format)  # fmt: skip
    whole = client.chat.completions.create(**options)  # type: ignore[call-overload]
    assert whole.choices[0].finish_reason == "stop"
    content = whole.choices[0].message.content or ""
    assert content.endswith('"one ') and "<|im_end|>" not in content and "two" not in content, content
    chunks = list(client.chat.completions.create(stream=True, **options))  # type: ignore[call-overload]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed.endswith('"one ') and "<|im_end|>" not in streamed, streamed
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
