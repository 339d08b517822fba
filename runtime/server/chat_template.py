"""Chat templates from the GGUF, compiled once per model and rendered in a bounded sandbox off the event loop.

A template is code that came with a model file: in jinja2's immutable sandbox it can read the messages it is given
and nothing else (no attribute walk to `__globals__`, no mutation of the caller's objects). The sandbox does not
bound work, though: a loop over `range(100000)` nested in another, a macro that calls itself, a string doubled in a
loop would hold a CPU (and, rendered on the event loop, the whole server) for as long as they like. So every render
has a budget: loop iterations and calls count as steps, strings and lists built by operators, filters and calls are
capped in size (checked before the big ones are built), the output is capped, and a wall-clock deadline backs them
up. A render that exceeds the budget raises `TemplateLimitExceeded` (a 400 for that request) and is counted on the
template (shown in `/ready`). Renders run on a small thread pool of the model's own, so the event loop keeps answering.

A model without a template gets ChatML, which is what most instruction-tuned GGUFs use. Tools are offered to the
template only when the template mentions them, since a template that ignores `tools` would drop them without a word.
"""

from __future__ import annotations

import asyncio
import json
import operator
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial, wraps
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RenderLimits:
    """What one render may do. The defaults leave real templates far below them: a tool-calling template over a
    full context of messages takes a few thousand steps and renders a few hundred KB."""

    max_steps: int = 200_000
    """Loop iterations plus calls (functions, macros, methods, filters)."""
    max_output_chars: int = 4 << 20
    """The rendered prompt, and any one string or list the template builds on the way."""
    max_seconds: float = 5.0


DEFAULT_LIMITS = RenderLimits()
RENDER_THREADS = 2
"""Threads per model for rendering its template: a hostile template queues its own model's requests only, never
another model's nor the threads the audit log and hashing use."""


class ChatTemplateError(Exception):
    """The template does not compile, raised an exception of its own, or cannot render these messages."""


class TemplateLimitExceeded(ChatTemplateError):
    """The render went over its budget (steps, size or time) and was stopped."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class _Budget:
    """The steps, size and time one render has left; one per render, found through a thread-local."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps = 0
        self.deadline = time.monotonic() + limits.max_seconds

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise TemplateLimitExceeded(f"the chat template took more than {self.limits.max_steps} steps")
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(f"the chat template ran longer than {self.limits.max_seconds:g} s")

    def allow_size(self, size: int, what: str) -> None:
        if size > self.limits.max_output_chars:
            raise TemplateLimitExceeded(
                f"the chat template asked for {what} of size {size}; at most {self.limits.max_output_chars} is allowed"
            )


_current = threading.local()


def _budget() -> _Budget:
    """The running render's budget; outside a render (jinja folding constants while it compiles) a fresh default
    one, so that compiling `{{ 'a'|center(10**9) }}` is refused as rendering it would be."""
    budget: _Budget | None = getattr(_current, "budget", None)
    return budget if budget is not None else _Budget(DEFAULT_LIMITS)


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict, bytes)):
        _budget().allow_size(len(value), f"a {type(value).__name__}")
    return value


_NUMBER = re.compile(r"\d+")


def _check_format_widths(text: Any) -> None:
    """`'%999999999d' % 1` and `'{:>999999999}'.format(1)` build a huge string from a short one: refuse first."""
    if isinstance(text, str):
        for number in _NUMBER.findall(text):
            if len(number) > 9 or int(number) > _budget().limits.max_output_chars:
                raise TemplateLimitExceeded(f"the chat template formats with a width of {number} characters")


class _CountingCodeGenerator(CodeGenerator):
    """Compiles templates so that every loop iteration passes through the budget, and every `~` result is sized."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        if not getattr(node, "_counted", False):
            node.iter = nodes.Call(nodes.EnvironmentAttribute("counted_iteration"), [node.iter], [], None, None)
            node._counted = True  # type: ignore[attr-defined]
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with a work budget: steps (loop iterations, calls), sizes and time, per render."""

    code_generator_class = _CountingCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: self._counted_filter(name, function) for name, function in self.filters.items()}

    @staticmethod
    def counted_iteration(iterable: Iterable[Any]) -> Iterator[Any]:
        budget = _budget()
        for item in iterable:
            budget.step()
            yield item

    @staticmethod
    def sized(value: Any) -> Any:
        return _sized(value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        budget = _budget()
        budget.step()
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool):
                budget.allow_size(value, "a width or count")  # str.ljust(10**9), str.center(...)
        if getattr(__obj, "__name__", "") in ("format", "format_map"):  # the sandbox wraps str.format: unwrap it
            _check_format_widths(getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None))
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator_name == "*":
            for sequence, times in ((left, right), (right, left)):
                if hasattr(sequence, "__len__") and isinstance(times, int):
                    budget.allow_size(len(sequence) * max(times, 0), "a repeated sequence")
        elif operator_name == "**" and isinstance(right, int) and isinstance(left, int) and abs(right) > 64:
            raise TemplateLimitExceeded(f"the chat template raises a number to the power {right}")
        elif operator_name == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            budget.allow_size(len(left) + len(right), "a joined sequence")
        elif operator_name == "%":
            _check_format_widths(left)
        return _sized(_BINOPS[operator_name](left, right))

    def _counted_filter(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(function)  # keeps jinja's pass_context / pass_environment marks
        def bounded(*args: Any, **kwargs: Any) -> Any:
            budget = _budget()
            budget.step()
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and not isinstance(value, bool):
                    budget.allow_size(value, f"a width or count for |{name}")
            if name == "format" and args:
                _check_format_widths(next((a for a in args if isinstance(a, str)), None))
            return _sized(function(*args, **kwargs))

        return bounded


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "*": operator.mul, "**": operator.pow, "%": operator.mod,
}  # fmt: skip


@dataclass
class TemplateRefusals:
    """Renders stopped by the budget, for `/ready`: how many, and the last reason."""

    count: int = 0
    last: str | None = None
    last_at: str | None = None


class ChatTemplate:
    """One model's chat template, compiled once (at model start) and rendered per request."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "",
                 limits: RenderLimits = DEFAULT_LIMITS) -> None:  # fmt: skip
        self.source = source or CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits
        self.refusals = TemplateRefusals()
        self._threads: ThreadPoolExecutor | None = None
        environment = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda fmt: datetime.now(UTC).strftime(fmt)
        environment.filters["tojson"] = environment._counted_filter("tojson", _tojson)
        try:
            self._template = environment.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.source

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opened. Runs on the caller's thread:
        servers use `render_off_loop`.

        Raises:
            TemplateLimitExceeded: the render went over its budget (steps, sizes, output or time).
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
        budget = _Budget(self.limits)
        _current.budget = budget
        try:
            parts: list[str] = []
            size = 0
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > self.limits.max_output_chars:
                    raise TemplateLimitExceeded(
                        f"the chat template's output exceeds {self.limits.max_output_chars} characters"
                    )
                parts.append(chunk)
                budget.step()  # output with no loop or call in between (a long run of literal text) still counts
            return "".join(parts)
        except TemplateLimitExceeded as exc:
            self._note_refusal(str(exc))
            raise
        except ChatTemplateError:
            raise
        except RecursionError as exc:
            reason = f"the chat template recursed too deeply: {exc}"
            self._note_refusal(reason)
            raise TemplateLimitExceeded(reason) from exc
        except Exception as exc:  # a template is foreign code: any failure of it is the template's, not ours
            raise ChatTemplateError(f"the model's chat template failed on these messages: {exc}") from exc
        finally:
            _current.budget = None

    def _note_refusal(self, reason: str) -> None:
        self.refusals.count += 1
        self.refusals.last = reason
        self.refusals.last_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    async def render_off_loop(self, messages: list[dict[str, Any]], *,
                              tools: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
        """`render` on the template threads, so that the event loop (and `/health`) keeps answering meanwhile.

        Raises the same errors as `render`.
        """
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="chat-template")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, partial(self.render, messages, tools=tools))
