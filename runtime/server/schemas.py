"""The request bodies of the OpenAI API that sealbox serves, validated before any work is done.

Unknown fields are refused rather than ignored: a misspelt `max_token` silently ignored would hand a client a
completion it did not ask for. Fields OpenAI defines that sealbox does not implement are accepted only at their
neutral value (`best_of=1`, no `suffix`), and refused with a message naming them otherwise.

JSON `null` for an optional field means its default: the `openai` client sends `null` for every argument an app
passes as `None`, so `temperature: null` is `temperature` left out.

Numbers must be finite (`NaN` and `Infinity` are JSON extensions Python accepts), and text must be valid Unicode: a
lone surrogate (`"\\ud800"`) parses in Python but cannot be encoded for the tokenizer or the audit log.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_SEED = 2**64 - 1
MAX_TOP_K = 2**31 - 1
"""llama.cpp takes top_k as a C int."""
MAX_CHOICES = 16
"""`n` at most: each choice holds a sequence of its own (OpenAI allows 128; a host serves a few sequences at once)."""
MAX_PROMPTS = 16
"""Prompts in one `/v1/completions` request at most (a LangChain `batch`)."""
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
"""OpenAI's bound for chat's `top_logprobs`; text completions' `logprobs` stops at 5."""
MAX_COMPLETION_LOGPROBS = 5

UNENCODABLE_TEXT = "unencodable_text"
"""The pydantic error type of a string holding a lone surrogate; its `where` names the field."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """A field sent as `null` takes its default, as if it had been left out."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


def _unencodable_text(data: Any) -> str | None:
    """The dotted path of the first string (key or value) in `data` that is not valid Unicode, or None.

    Iterative: a body nested as deep as the JSON parser allows must not overflow the stack here.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")  # the path is echoed back
                path = f"{where}.{name}" if where else name
                stack.append((path, key))
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}" if where else str(i), item) for i, item in enumerate(value))
    return None


class _Request(_Body):
    """A whole request body: checked for text the tokenizer and the audit log could not encode, before anything else."""

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        where = _unencodable_text(data)
        if where is not None:
            raise PydanticCustomError(
                UNENCODABLE_TEXT, "{where}: not valid Unicode text (a lone surrogate)", {"where": where}
            )
        return data


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ContentPart(_Body):
    """One part of a message's content: text, or (in a replayed assistant message) a refusal. Image, audio and file
    parts are refused by name: the models served here read text only."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    type: str
    text: str | None = None
    refusal: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value not in ("text", "refusal"):
            raise ValueError(f"content parts of type {value!r} are not supported: the models served here read text only")
        return value

    @model_validator(mode="after")
    def _filled(self) -> ContentPart:
        if (self.text if self.type == "text" else self.refusal) is None:
            raise ValueError(f"a {self.type} part needs its {self.type} field")
        return self

    @property
    def content(self) -> str:
        return self.text if self.type == "text" else (self.refusal or "")


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    """A message of the conversation. Assistant messages replayed as the API returned them are accepted whole
    (`refusal`, `annotations`, `audio: null`, the legacy `function_call`); `function` is the legacy tool role."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("replayed audio is not supported: the models served here produce text only (send null)")
        return value

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        answered = self.tool_calls or self.function_call or self.refusal is not None
        if self.content is None and not (self.role == "assistant" and answered):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.role == "function" and not self.name:
            raise ValueError("a function message needs the function's name")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.content for part in self.content)


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(_Body):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolsChoice(_Body):
    """`tool_choice: {"type": "allowed_tools", …}`: only these of the tools may be called (and only they are offered)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool = False
    """OpenAI pads chunks against length side channels; accepted, and a stream here is not padded."""


class _Sampling(_Request):
    """Fields shared by chat and text completions; top_k, min_p and repeat_penalty are llama.cpp's extensions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=-(2**63), le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for stop in stops:
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"a stop sequence is 1 to {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Token ids (as strings, the JSON object's keys) to a bias in [-100, 100]; the engine checks each id
        against the model's vocabulary."""
        if not value:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 10:
                raise ValueError(f"logit_bias keys are token ids; {key[:20]!r} is not one")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias of token {key} is {bias}; a bias lies in [-100, 100]")
        return value

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(key), float(bias)) for key, bias in (self.logit_bias or {}).items())

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]
ONE_TIER = ("auto", "default")
"""The service tiers this server can honour: it has one, and every request is served in it."""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, min_length=1)
    """The legacy form of `tools`; the answer then comes back as the legacy `function_call`."""
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    """Accepted: the engine finds a shared prompt prefix in its cache by itself."""
    service_tier: ServiceTier | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    """Accepted as the bound it is: a model without a reasoning phase spends less than any effort allows."""
    verbosity: Literal["low", "medium", "high"] | None = None
    """Accepted as the hint it is (OpenAI's models treat it as one too)."""
    prediction: dict[str, Any] | None = None
    """Predicted output only speeds an answer up, never changes it: accepted and not used."""
    web_search_options: dict[str, Any] | None = None

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("store: true is not offered: this server keeps no completions to retrieve later "
                             "(send false or leave it out)")  # fmt: skip
        return value

    @field_validator("service_tier")
    @classmethod
    def _one_tier(cls, value: str | None) -> str | None:
        if value is not None and value not in ONE_TIER:
            raise ValueError(f"service_tier {value!r} is not offered: this server has one tier (send auto or default)")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, value: list[str] | None) -> list[str] | None:
        if value and "audio" in value:
            raise ValueError("modality 'audio' is not offered: the models served here produce text only "
                             "(send [\"text\"])")  # fmt: skip
        return value

    @field_validator("audio")
    @classmethod
    def _no_audio_out(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("audio output is not offered: the models served here produce text only")
        return value

    @field_validator("web_search_options")
    @classmethod
    def _no_web_search(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("web search is not offered: this server has no network to search")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        if self.functions is not None and self.tools is not None:
            raise ValueError("send tools or the legacy functions, not both")
        if self.function_call is not None and self.tool_choice is not None:
            raise ValueError("send tool_choice or the legacy function_call, not both")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, AllowedToolsChoice):
            offered = {tool.function.name for tool in self.tools or []}
            unknown = [t.function.name for t in self.tool_choice.allowed_tools.tools if t.function.name not in offered]
            if unknown:
                raise ValueError(f"tool_choice allows {unknown[0]!r}, which is not among tools")
        if self.function_call not in (None, "none") and not self.functions:
            raise ValueError("function_call needs functions")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_alternatives(self) -> int | None:
        """Alternatives to report per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def legacy_functions(self) -> bool:
        """The request used `functions`: the answer carries `function_call` and one call at most."""
        return self.functions is not None

    def offered_tools(self) -> list[ToolDefinition]:
        """The tools offered, whichever form the request used."""
        if self.functions is not None:
            return [ToolDefinition(type="function", function=function) for function in self.functions]
        if isinstance(self.tool_choice, AllowedToolsChoice):
            allowed = {tool.function.name for tool in self.tool_choice.allowed_tools.tools}
            return [tool for tool in self.tools or [] if tool.function.name in allowed]
        return list(self.tools or [])

    def tool_choice_mode(self) -> tuple[Literal["none", "auto", "required", "named"], str | None]:
        """How tools may be used, whichever form the request used, and the named tool's name (`named` only)."""
        choice = self.function_call if self.functions is not None else self.tool_choice
        if choice is None:
            return "auto", None
        if isinstance(choice, str):
            return choice, None  # type: ignore[return-value]
        if isinstance(choice, NamedFunction):
            return "named", choice.name
        if isinstance(choice, AllowedToolsChoice):
            return choice.allowed_tools.mode, None
        return "named", choice.function.name


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    """One prompt (text or token ids) or several (a list of texts, or of token-id lists): choice i·n + j is the
    j-th choice of prompt i."""
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=1)

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported: the prompt's own logprobs are not computed")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt is empty")
            if not isinstance(self.prompt[0], int) and len(self.prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _supported(self) -> EmbeddingRequest:
        if self.dimensions is not None:
            raise ValueError("dimensions is not supported: the model's own size is returned")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is empty")
        return self
