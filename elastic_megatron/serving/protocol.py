"""Request and response schemas of the OpenAI-compatible API, and its one error shape.

Requests follow OpenAI's completions and chat completions (what the `openai` client and
lm-evaluation-harness's `local-completions` / `local-chat-completions` send); fields of
OpenAI's API this server does not implement are refused with a 400 when they would change
the result (`n` > 1, penalties, `logit_bias`, `suffix`), and ignored otherwise (`user`).
Extensions, sent by OpenAI clients as `extra_body`:

- `budget`: the budget to run (or pick it with the model id `<name>:<budget>`);
- budget control: `think_budget`, `answer_budget` (both), `max_think_tokens` (default 256),
  `think_delimiter` (default "</think>"): the think budget writes the trace until the
  delimiter (forced after `max_think_tokens`), the answer budget writes `max_tokens` more;
- `top_k` (0 or -1: no limit), `return_tokens_as_token_ids` (log-probs' tokens as
  "token_id:<id>", as vLLM does), `chat_template_kwargs` (extra template variables).

Every error, whatever raised it, is answered as OpenAI does:
`{"error": {"message": ..., "type": ..., "param": <the field>, "code": ...}}`.

Input limits, checked as the body is parsed (a 400 naming the field): a string anywhere in a
request (prompt, message content or any message field, stop, think_delimiter, model,
chat_template_kwargs, ...) must be whole characters: a lone UTF-16 surrogate (`"\\ud800"`,
valid JSON but no character) is refused, not replaced; `stop` holds at most `MAX_STOPS`
strings of at most `MAX_STOP_CHARS` characters (OpenAI's cap is 4); `content` may be null
only in an assistant message; `top_logprobs` is 0 .. `MAX_LOGPROBS`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client: HTTP `status`, the request field it is about."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def bad_request(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    # A message quoting a client's lone surrogate could not be encoded as UTF-8: escaped, the
    # error still reaches the client.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param,
                                         code=code)).model_dump()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---- requests ----------------------------------------------------------------------------------

# Each stop string is looked for at every new token, so their number is bounded; OpenAI takes 4,
# but lm-evaluation-harness sends a task's `until` list plus the end-of-text token (the shipped
# stdlib_identifier: 5), and vLLM sets no bound: 16 serves the harness and stays cheap.
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20


def check_text(value: Any) -> Any:
    """`value`, if every string in it (dict keys too) is whole characters: a lone UTF-16
    surrogate decodes from JSON but cannot be encoded, so no tokenizer could read it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"holds a lone UTF-16 surrogate ({value[err.start]!r} at character {err.start}); "
                             "only whole characters are accepted (a surrogate pair must be complete)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            check_text(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_text(item)
    elif isinstance(value, BaseModel) and not isinstance(value, _Request):
        check_text(value.model_dump())
    return value


def one_of(value: Any, handler, allowed: str) -> Any:
    """A wrap validator's body for a union field: a value of none of its types is one error
    saying what the field may be (pydantic reports one per member, the first named after a
    member's type: `prompt.str`); the field's own checks (value errors) keep their message."""
    try:
        return handler(value)
    except ValidationError as err:
        own = [e["msg"] for e in err.errors() if e["type"] == "value_error"]
        raise ValueError(own[0].removeprefix("Value error, ") if own else f"must be {allowed}") from None


class _Request(BaseModel):
    """Every request schema: each field's strings are checked by `check_text` (a nested
    request schema checks its own fields, so the error names the innermost field)."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _whole_characters(cls, value):
        return value if isinstance(value, _Request) else check_text(value)

    @model_validator(mode="after")
    def _whole_characters_in_extras(self):
        for key, value in (self.model_extra or {}).items():
            try:
                check_text({key: value})
            except ValueError as err:
                raise ValueError(f"{key!r} {err}") from None
        return self


class StreamOptions(_Request):
    include_usage: bool = False


class _Generation(_Request):
    """Fields shared by both endpoints."""

    model: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions
    budget: Optional[str] = None
    think_budget: Optional[str] = None
    answer_budget: Optional[str] = None
    max_think_tokens: Optional[int] = None
    think_delimiter: Optional[str] = None
    return_tokens_as_token_ids: bool = False

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop_types(cls, value, handler):
        return one_of(value, handler, "a string, a list of strings or null")

    @field_validator("stop", mode="after")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters, got one of {len(longest)}")
        return stop


class CompletionRequest(_Generation):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_types(cls, value, handler):
        return one_of(value, handler, "a string, a list of strings, a list of token ids or a list of lists of token ids")


class ContentPart(BaseModel):
    """Checked by its message's `content` (inside a union, its own error would name the
    union's member rather than the field)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[ContentPart], None] = Field(default=None, validate_default=True)

    @field_validator("content", mode="after")
    @classmethod
    def _content_unless_assistant(cls, content, info: ValidationInfo):
        # OpenAI: only an assistant message (one that made tool calls) may have no content
        role = info.data.get("role")
        if content is None and role is not None and role != "assistant":
            raise ValueError(f"must not be null in a {role!r} message (only an assistant message may omit it)")
        return content

    @field_validator("content", mode="wrap")
    @classmethod
    def _content_types(cls, value, handler):
        return one_of(value, handler, "a string or a list of content parts ({\"type\": \"text\", \"text\": ...})")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Request):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Request):
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PhaseUsage(BaseModel):
    """One phase of one choice: `generate`, or budget control's `think` and `answer`."""

    index: int
    phase: str
    budget: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    phases: list[PhaseUsage] = Field(default_factory=list)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions log-probs (what lm-evaluation-harness parses): per token,
    its string, its log-probability (None for the first prompt token, which has no context),
    the most likely tokens at that position (with the token itself), its character offset."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Optional[Literal["stop", "length", "abort"]]


class _Reply(BaseModel):
    """What every response and stream chunk carries."""

    id: str
    created: int
    model: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None


class CompletionResponse(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Reply):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "elastic_megatron"
    root: str
    budget: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
