"""Chat and text completions: from a validated request to the engine's events, as one JSON answer or an SSE stream.

The prompt is measured before anything is admitted: `max_tokens` above the policy's cap, or a prompt that leaves no
room in one sequence's context, is a 400 naming the numbers, never a truncation. With no `max_tokens`, a request
gets what the context has left, up to the cap.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive

from sealbox.runtime.audit.errors import AuditError
from sealbox.runtime.engine import (
    EngineError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    TextDelta,
)
from sealbox.runtime.models.builtin_templates import turn_markers
from sealbox.runtime.server.chat_template import ChatTemplateError, TemplateLimitExceeded
from sealbox.runtime.server.choices import Choices, MergedEvents, chat_logprobs, completion_logprobs
from sealbox.runtime.server.errors import ApiError, from_engine_error
from sealbox.runtime.server.model_registry import ServedModel
from sealbox.runtime.server.request_record import RequestRecord
from sealbox.runtime.server.response_shape import CompletionShape, usage
from sealbox.runtime.server.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from sealbox.runtime.server.structured_output import response_format_grammar
from sealbox.runtime.server.tool_calls import ToolPlan, generic_messages, native_message, plan_tools

CLIENT_CLOSED_REQUEST = 499
"""Status recorded for a request whose client hung up before its answer (nginx's convention; never sent)."""


@dataclass(frozen=True)
class Prepared:
    """A request ready for the engine (one generation per prompt, each of n choices), and how to shape its answer."""

    generations: tuple[GenerationRequest, ...]
    chat: bool
    tools: ToolPlan | None
    prompt_text: str | list[str] | None
    echo: tuple[str, ...] = ()
    """Per prompt, the text an `echo` request puts before each of its choices' completions."""

    @property
    def generation(self) -> GenerationRequest:
        return self.generations[0]

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return self.generation.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(generation.prompt_tokens) for generation in self.generations)

    @property
    def logprobs(self) -> bool:
        return self.generation.logprobs is not None

    def shapes(self, model: ServedModel) -> list[CompletionShape]:
        """How each choice of this request's answer is shaped, whole or streamed (a fresh parser each)."""
        tools = self.tools
        created = int(time.time())
        return [
            CompletionShape(
                id=self.generation.id, model=model.name, chat=self.chat, index=index, created=created,
                fingerprint=_fingerprint(model) if self.chat else None,
                parser=tools.parser() if tools is not None else None, legacy=bool(tools and tools.legacy),
            )
            for index in range(len(self.generations) * self.n)
        ]  # fmt: skip


def _sampling(body: _Sampling, grammar: str | None) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=(body.seed & 0xFFFFFFFF) if body.seed is not None else None,
        grammar=grammar,
        logit_bias=body.token_bias(),
    )


def _token_budget(requested: int | None, n_prompt: int, context: int, cap: int) -> int:
    if requested is not None and requested > cap:
        raise ApiError(400, f"max_tokens {requested} is above this server's limit of {cap}", param="max_tokens",
                       code="max_tokens_exceeded")  # fmt: skip
    room = context - n_prompt
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {n_prompt} tokens; this model's context holds {context}, and at least one token "
            "must be left for the answer",
            code="context_length_exceeded",
            param="messages",
        )
    if requested is None:
        return min(cap, room)
    if n_prompt + requested > context:
        raise ApiError(
            400,
            f"the prompt ({n_prompt} tokens) plus max_tokens ({requested}) needs {n_prompt + requested} tokens; "
            f"this model's context holds {context}",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return requested


def _tokenize_rendered(model: ServedModel, text: str) -> list[int]:
    engine = model.engine
    bos = engine.card.bos_token
    return engine.tokenize(text, add_bos=not (bos and text.startswith(bos)), special=True)


async def prepare_chat(body: ChatCompletionRequest, model: ServedModel, *, cap: int, principal: str) -> Prepared:
    """The template renders off the event loop, within its budget (`chat_template`): a template that exceeds it is
    a 400 for this request, never a stalled server."""
    template = model.template
    if template is None:
        raise ApiError(400, model.template_problem or "the model has no chat template", code="chat_template_error")
    plan = plan_tools(body, native_syntax=template.supports_tools)
    grammar = response_format_grammar(body.response_format)
    if plan is not None and plan.grammar is not None:
        if grammar is not None:
            raise ApiError(400, "tool calls and a JSON response_format cannot both constrain the answer of this model "
                           "(send tool_choice none, or no response_format)", param="response_format")  # fmt: skip
        grammar = plan.grammar
    if plan is not None and not plan.native:
        messages = generic_messages(body.messages, plan)
    else:
        messages = [native_message(message) for message in body.messages]
    try:
        text = await template.render_off_loop(messages, tools=plan.template_tools() if plan is not None else None)
    except TemplateLimitExceeded as exc:
        raise ApiError(400, str(exc), code="chat_template_limit", param="messages") from exc
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), code="chat_template_error", param="messages") from exc
    tokens = _tokenize_rendered(model, text)
    # The template's own turn markers end the answer too: a model that spells one out must not show it.
    markers = tuple(m for m in turn_markers(template.source) if m not in body.stop_sequences())
    generation = _request("chatcmpl", body, tokens, model, cap=cap, grammar=grammar, principal=principal,
                          extra_stops=markers)  # fmt: skip
    return Prepared((generation,), chat=True, tools=plan, prompt_text=text)


def _request(kind: str, body: ChatCompletionRequest | CompletionRequest, tokens: list[int], model: ServedModel, *,
             cap: int, grammar: str | None, principal: str, id: str | None = None,
             extra_stops: tuple[str, ...] = ()) -> GenerationRequest:  # fmt: skip
    return GenerationRequest(
        id=id or f"{kind}-{uuid.uuid4().hex}",
        n=body.n,
        logprobs=body.logprob_alternatives,
        prompt_tokens=tokens,
        max_tokens=_token_budget(body.token_limit, len(tokens), model.context, cap),
        sampling=_sampling(body, grammar),
        stop=body.stop_sequences() + extra_stops,
        principal=principal,
    )


def prepare_completion(body: CompletionRequest, model: ServedModel, *, cap: int, principal: str) -> Prepared:
    engine = model.engine
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generations: list[GenerationRequest] = []
    texts: list[str] = []
    prompts = body.prompts
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}" if len(prompts) > 1 else "prompt"
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, f"{where} is empty", param="prompt")
            tokens = engine.tokenize(prompt, add_bos=True, special=False)
            text = prompt
        else:
            tokens = [int(token) for token in prompt]
            try:  # the engine refuses a token id outside the vocabulary (llama.cpp would abort the process)
                text = engine.detokenize(tokens) if body.echo else ""
            except InvalidRequest as exc:
                raise ApiError(400, f"{where}: {exc}", param="prompt") from exc
        generations.append(_request("cmpl", body, tokens, model, cap=cap, grammar=None, principal=principal,
                                    id=request_id))  # fmt: skip
        texts.append(text)
    prompt_text = (texts[0] if len(texts) == 1 else texts) if any(isinstance(p, str) for p in prompts) else None
    return Prepared(tuple(generations), chat=False, tools=None, prompt_text=prompt_text,
                    echo=tuple(texts) if body.echo else ())  # fmt: skip


def start(model: ServedModel, prepared: Prepared) -> AsyncIterator[GenerationEvent]:
    """Admit the request now (or queue it): every prompt's choices, or none; admission's refusals become their HTTP
    answers here."""
    engine = model.engine
    streams: list[AsyncIterator[GenerationEvent]] = []
    try:
        for generation in prepared.generations:
            streams.append(engine.generate(generation))
    except EngineError as exc:
        for admitted in streams:
            close = getattr(admitted, "close", None)
            if close is not None:
                close()
        raise from_engine_error(exc) from exc
    return MergedEvents(streams, prepared.n)


def _fingerprint(model: ServedModel) -> str:
    """`system_fingerprint`: which model file answered (its digest's prefix)."""
    return f"sealbox-{model.sha256[:12]}"


def _usage(finished: Finished) -> dict[str, int]:
    return usage(finished.prompt_tokens, finished.completion_tokens)


def _note(record: RequestRecord, prepared: Prepared, finished: Finished | None, text: str | list[str],
          log_content: bool) -> None:  # fmt: skip
    """What the audit record says of the answer (its prompt tokens were noted when the request was prepared)."""
    if finished is not None:
        record.completion_tokens = finished.completion_tokens
        record.finish_reason = finished.reason
    if log_content:
        record.content = {"prompt": prepared.prompt_text, "completion": text}


async def _collect(events: AsyncIterator[GenerationEvent], n: int) -> Choices:
    choices = Choices(n)
    async for event in events:
        choices.add(event)
    return choices


def _completions(choices: Choices) -> str | list[str]:
    """The audit record's completion: the text, or each choice's text when there are several."""
    texts = [choice.text for choice in choices.ordered()]
    return texts[0] if len(texts) == 1 else texts


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body was read already: the next message can only be the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def answer(
    model: ServedModel, prepared: Prepared, events: AsyncIterator[GenerationEvent], record: RequestRecord,
    *, log_content: bool, receive: Receive,
) -> Response:  # fmt: skip
    """The whole answer as one JSON body. A client that hangs up while it waits cancels the request at the next
    scheduler step (its sequence and KV cells are freed), as a closed stream does; the record says 499."""
    collecting = asyncio.ensure_future(_collect(events, prepared.n))
    watching = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
        await _close(events)
    if not collecting.done() or collecting.cancelled():
        record.finish_reason = "cancelled"
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    try:
        choices = collecting.result()
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    finished = choices.total()
    _note(record, prepared, finished, _completions(choices), log_content)
    shapes = prepared.shapes(model)
    shaped = []
    for choice in choices.ordered():
        echo = prepared.echo[choice.index // prepared.n] if prepared.echo else ""
        logprobs = None
        if prepared.logprobs:
            logprobs = chat_logprobs(choice.logprobs) if prepared.chat else completion_logprobs(choice.logprobs,
                                                                                                offset=len(echo))
        reason = choice.finished.reason if choice.finished is not None else "stop"
        shaped.append(shapes[choice.index].whole_choice(echo + choice.text, reason, logprobs))
    return JSONResponse(shapes[0].body(shaped, _usage(finished)))


def stream(
    model: ServedModel, prepared: Prepared, events: AsyncIterator[GenerationEvent], record: RequestRecord,
    *, include_usage: bool, log_content: bool,
) -> StreamingResponse:  # fmt: skip
    record.stream = True
    shapes = prepared.shapes(model)

    def chunk(data: dict[str, Any], counted: dict[str, int] | None = None) -> str:
        if include_usage:
            data["usage"] = counted
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

    def logprobs_of(event: TextDelta, offset: int) -> dict[str, Any] | None:
        if not prepared.logprobs:
            return None
        items = list(event.logprobs)
        return chat_logprobs(items) if prepared.chat else completion_logprobs(items, offset=offset)

    async def body() -> AsyncIterator[str]:
        choices = Choices(prepared.n)
        try:
            for index, shape in enumerate(shapes):
                for data in shape.opening():
                    yield chunk(data)
                if prepared.echo:
                    for data in shape.text(prepared.echo[index // prepared.n]):
                        yield chunk(data)
            async for event in events:
                current = choices.add(event)
                if isinstance(event, TextDelta):
                    if event.text or event.logprobs:
                        echo = len(prepared.echo[event.index // prepared.n]) if prepared.echo else 0
                        offset = echo + len(current.text) - len(event.text)
                        for data in shapes[event.index].text(event.text, logprobs=logprobs_of(event, offset)):
                            yield chunk(data)
                else:
                    for data in shapes[event.index].closing(event.reason):
                        yield chunk(data)
            finished = choices.total()
            _note(record, prepared, finished, _completions(choices), log_content)
            if include_usage:
                yield chunk(shapes[0].envelope([]), _usage(finished))
        except EngineError as exc:
            _note(record, prepared, None, _completions(choices), log_content)
            error = from_engine_error(exc)
            yield f"data: {json.dumps(error.body())}\n\n"
            await _commit_or_fail(record, error.status)
            return
        finally:
            await _close(events)
        if await _commit_or_fail(record, 200):
            yield "data: [DONE]\n\n"
        else:
            failure = ApiError(503, "the audit log cannot write; the stream ends unrecorded", code="audit_unavailable")
            yield f"data: {json.dumps(failure.body())}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _commit_or_fail(record: RequestRecord, status: int) -> bool:
    try:
        await record.commit(status)
        return True
    except AuditError:
        return False


async def _close(events: AsyncIterator[GenerationEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
