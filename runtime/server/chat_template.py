"""Chat templates from the GGUF, rendered in jinja2's immutable sandbox.

A template is code that came with a model file: in the sandbox it can read the messages it is given and nothing
else (no attribute walk to `__globals__`, no mutation of the caller's objects). A model without a template gets
ChatML, which is what most instruction-tuned GGUFs use. Tools are offered to the template only when the template
mentions them, since a template that ignores `tools` would drop them without a word.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(Exception):
    """The template does not compile, raised an exception of its own, or cannot render these messages."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda fmt: datetime.now(UTC).strftime(fmt)
        environment.filters["tojson"] = _tojson
        try:
            self._template = environment.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.source

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opened.

        Raises:
            ChatTemplateError: the template refused the messages or failed while rendering.
        """
        variables: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": True,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            variables["tools"] = tools
        try:
            return self._template.render(**variables)
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template is foreign code: any failure of it is the template's, not ours
            raise ChatTemplateError(f"the model's chat template failed on these messages: {exc}") from exc
