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
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

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
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param,
                                         code=code)).model_dump()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---- requests ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

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


class CompletionRequest(_Generation):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[ContentPart], None] = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
