"""Request and response bodies of the OpenAI-compatible API (plus vLLM's extras).

Requests ignore unknown fields, as OpenAI clients send fields a server may not know, but a
known field this server does not implement is declared (``unsupported_fields``) so that using
it gets a 400 naming it instead of being silently ignored. Every string must be valid Unicode
(no lone surrogates) and every float finite. Range checks that belong to the protocol (``n``,
``logprobs``, ``seed``) live here so that a violation names its ``param``; everything else is
checked by ``SamplingParams`` and the server's limits.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _check_unicode(value: Any) -> None:
    """Raises ValueError for a string (in any list or dict) that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone UTF-16 surrogate (not valid Unicode)") from None
    elif isinstance(value, list | tuple):
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        _check_unicode(value)
        return value


def _unset(value: Any) -> bool:
    return value is None or value == [] or value == {} or value is False


def _unset_or(*accepted: Any) -> Callable[[Any], bool]:
    return lambda value: _unset(value) or value in accepted


class _Unsupported(_Request):
    """Known fields this server does not implement. ``_UNUSED`` gives, per field, the values
    that mean "not used" (any other value is refused)."""

    _UNUSED: ClassVar[dict[str, Callable[[Any], bool]]] = {}

    def unsupported_fields(self) -> list[str]:
        return [name for name, unused in self._UNUSED.items() if not unused(getattr(self, name))]


_TOOL_CHOICE_UNUSED = _unset_or("none", "auto")
_VLLM_UNSUPPORTED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs", "allowed_token_ids", "bad_words",
                     "truncate_prompt_tokens", "prompt_logprobs")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Unsupported):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)  # lower first, under --scheduling-policy priority
    # beam search (vLLM's extras): n is the beam width; not with stream
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # known but not implemented (see _Unsupported)
    store: bool | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = None  # None: 16, shortened to fit the context
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    response_format: Any = None  # vLLM's structured output (not in OpenAI's completions)

    _UNUSED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "suffix": _unset_or(""),
        "response_format": _unset_or({"type": "text"}),
        "store": _unset,
        **dict.fromkeys(_VLLM_UNSUPPORTED, _unset),
    }


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Unsupported):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    audio: Any = None

    _UNUSED: ClassVar[dict[str, Callable[[Any], bool]]] = {"tool_calls": _unset, "tool_call_id": _unset, "function_call": _unset,
               "audio": _unset}

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None:
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # known but not implemented (see _Unsupported)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    _UNUSED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "response_format": _unset_or({"type": "text"}),
        "tools": _unset,
        "tool_choice": _TOOL_CHOICE_UNUSED,
        "functions": _unset,
        "function_call": _TOOL_CHOICE_UNUSED,
        "audio": _unset,
        "modalities": _unset_or(["text"]),
        "prediction": _unset,
        "reasoning_effort": _unset,
        "verbosity": _unset,
        "web_search_options": _unset,
        "store": _unset,
        **dict.fromkeys(_VLLM_UNSUPPORTED, _unset),
    }


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvpage"
    root: str | None = None
    parent: str | None = None  # an adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
