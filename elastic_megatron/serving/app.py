"""The OpenAI-compatible server of one checkpoint: FastAPI routes over the scheduler, uvicorn
around them.

    server = Server(ElasticGenerator.from_checkpoint(path), name="demo", options=ServeOptions(max_batch=8))
    server.run(bind("127.0.0.1", 8000))      # until SIGTERM: stop accepting, finish, return

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streams ending
with `data: [DONE]`), GET /health, GET /metrics (Prometheus), and the tokenizer routes
lm-evaluation-harness's remote tokenizer uses (GET /tokenizer_info, POST /tokenize,
POST /detokenize). With an API key every route but /health wants `Authorization: Bearer`.

The event loop only parses, checks and forwards: prompts are tokenized in a worker thread,
generation happens in the scheduler's thread (scheduler.py), whose events reach the
request's handler through `call_soon_threadsafe`. A request is checked completely before
it is queued; anything wrong is a 400 naming the field (protocol.py's error shape). When
more sequences would wait for a decode slot than `max_queue`, the request gets a 429 with
Retry-After. A client that goes away (a stream closed, a connection dropped) cancels its
sequences, which leave the batch before the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import secrets
import signal
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from elastic_megatron.inference.generator import ElasticGenerator, Sampling
from elastic_megatron.serving.metrics import Metrics
from elastic_megatron.serving.options import ServeOptions
from elastic_megatron.serving.protocol import (
    APIError, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessageOut, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, DetokenizeRequest,
    MAX_LOGPROBS, ModelCard, ModelList, PhaseUsage, TokenizeRequest, Usage, _Generation, bad_request, error_body, new_id,
    now,
)
from elastic_megatron.serving.scheduler import (
    Control, Failed, Finished, NotServing, PromptScores, QueueFull, Scheduler, Sequence, Token,
)
from elastic_megatron.serving.text import ChatTemplate, OutputText, encode, text_offsets, token_string

log = logging.getLogger("elastic_megatron.serving")

DEFAULT_THINK_TOKENS = 256  # as tools/generate.py's --max-think-tokens
DEFAULT_DELIMITER = "</think>"
RETRY_AFTER_S = 1


class ServedModel:
    """What requests are checked against: the model ids (one per budget, `<name>:<budget>`,
    and `<name>` for the largest), the tokenizer, the length limit."""

    def __init__(self, gen: ElasticGenerator, name: str, max_len: int):
        self.gen, self.name, self.max_len = gen, name, max_len
        self.tokenizer = gen.tokenizer
        self.budgets = [b for b in gen.budget_names() if not gen.budgets[b].heterogeneous]
        self.chat = ChatTemplate(self.tokenizer)
        self.created = now()
        self.elastic = gen.elastic  # budget control needs two budgets

    def ids(self) -> list[str]:
        return [self.name] + [f"{self.name}:{b}" for b in self.budgets]

    def cards(self) -> ModelList:
        return ModelList(data=[ModelCard(id=i, created=self.created, root=self.name, budget=b, max_model_len=self.max_len)
                               for i, b in zip(self.ids(), [self.budgets[0], *self.budgets])])

    def budget(self, name: str, param: str) -> str:
        if name not in self.budgets:
            raise bad_request(param, f"unknown budget {name!r}; allowed: {self.budgets}")
        return name

    def encode(self, text: str, param: str) -> list[int]:
        ids = encode(self.tokenizer, text) if text else []
        if not ids:
            raise bad_request(param, "must not be empty")
        return ids

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise bad_request(param, "must not be empty")
        bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise bad_request(param, f"token id {bad[0]} is not in the vocabulary (0 .. {self.tokenizer.vocab_size - 1})")
        return ids


@dataclass
class Plan:
    """A request's checked generation settings."""

    budget: str
    control: Optional[Control]
    sampling: Sampling
    stops: list[str]
    max_tokens: int


def plan(served: ServedModel, req: _Generation, prompts: list[list[int]], max_tokens: Optional[int],
         echo: bool = False) -> Plan:
    """Every check of a request's generation fields, before anything is queued."""
    for key, value, default in (("presence_penalty", req.presence_penalty, 0.0), ("frequency_penalty", req.frequency_penalty, 0.0)):
        if value != default:
            raise bad_request(key, "is not supported by this server (only 0)")
    if req.logit_bias:
        raise bad_request("logit_bias", "is not supported by this server")
    if req.n != 1:
        raise bad_request("n", f"only n=1 is supported, got {req.n}")
    if not (math.isfinite(req.temperature) and req.temperature >= 0):
        raise bad_request("temperature", f"must be >= 0 (0: greedy), got {req.temperature}")
    if not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise bad_request("top_p", f"must be in (0, 1], got {req.top_p}")
    vocab = served.tokenizer.vocab_size
    top_k = 0 if req.top_k == -1 else req.top_k
    if not 0 <= top_k <= vocab:
        raise bad_request("top_k", f"must be -1 or 0 (no limit) or at most the vocabulary size {vocab}, got {req.top_k}")
    seed = random.randrange(2**31) if req.seed is None else req.seed
    if not 0 <= seed < 2**63 - 1:
        raise bad_request("seed", f"must be a non-negative integer, got {seed}")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
        raise bad_request("stop", "stop strings must not be empty")

    budget, control = _budgets(served, req)
    longest = max(len(p) for p in prompts)
    think_room = control.max_think_tokens + len(control.delimiter_ids) if control else 0  # trace + forced delimiter
    if max_tokens is None:
        max_tokens = served.max_len - longest - think_room
    if isinstance(max_tokens, bool) or max_tokens < (0 if echo else 1) or (control and max_tokens < 1):
        raise bad_request("max_tokens", f"must be >= 1{' (0 with echo: score the prompt only)' if echo and not control else ''}, "
                                        f"got {max_tokens}")
    if longest + max_tokens + think_room > served.max_len:
        think = f" + max_think_tokens and the delimiter ({think_room})" if control else ""
        raise bad_request("max_tokens", f"the prompt ({longest} tokens) + max_tokens ({max_tokens}){think} must fit the "
                                        f"model's length of {served.max_len} tokens")
    return Plan(budget, control, Sampling(req.temperature, top_k, req.top_p, seed), stops, max_tokens)


def _budgets(served: ServedModel, req: _Generation) -> tuple[str, Optional[Control]]:
    """(the budget, budget control or None) from the model id and the body's budget fields."""
    model_budget = None
    if req.model is not None and req.model != served.name:
        prefix = served.name + ":"
        if not (req.model.startswith(prefix) and req.model[len(prefix):] in served.budgets):
            raise bad_request("model", f"unknown model {req.model!r}; this server serves {served.ids()}")
        model_budget = req.model[len(prefix):]
    control_fields = {k: getattr(req, k) for k in ("think_budget", "answer_budget", "max_think_tokens", "think_delimiter")}
    if all(v is None for v in control_fields.values()):
        if req.budget is not None:
            served.budget(req.budget, "budget")
            if model_budget is not None and req.budget != model_budget:
                raise bad_request("budget", f"{req.budget!r} contradicts the model id {req.model!r}")
        return req.budget or model_budget or served.budgets[0], None
    if not served.elastic:
        raise bad_request("think_budget", f"budget control needs an elastic checkpoint; {served.name} is one model "
                                          f"(budget {served.budgets[0]!r})")
    for key in ("think_budget", "answer_budget"):
        if control_fields[key] is None:
            raise bad_request(key, "budget control needs both think_budget and answer_budget")
        served.budget(control_fields[key], key)
    if req.budget is not None:
        raise bad_request("budget", "not with budget control (think_budget / answer_budget)")
    if model_budget is not None and model_budget != req.answer_budget:
        raise bad_request("model", f"{req.model!r} contradicts answer_budget {req.answer_budget!r}")
    think = DEFAULT_THINK_TOKENS if req.max_think_tokens is None else req.max_think_tokens
    if think < 1:
        raise bad_request("max_think_tokens", f"must be >= 1, got {think}")
    delimiter = DEFAULT_DELIMITER if req.think_delimiter is None else req.think_delimiter
    if not delimiter:
        raise bad_request("think_delimiter", "must not be empty")
    delimiter_ids = encode(served.tokenizer, delimiter)
    return req.answer_budget, Control(req.think_budget, req.answer_budget, think, delimiter, delimiter_ids)


# ---- a request's events, on the event loop ------------------------------------------------------


@dataclass
class Outcome:
    """What one sequence produced, as its events arrived."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)
    top: list = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    prompt: Optional[PromptScores] = None
    finished: Optional[Finished] = None
    failed: Optional[Failed] = None

    def add(self, event) -> bool:
        """Take an event; True when it is the last."""
        if isinstance(event, Token):
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.top.append(event.top)
            self.offsets.append(event.offset)
        elif isinstance(event, PromptScores):
            self.prompt = event
        elif isinstance(event, Finished):
            self.finished = event
        elif isinstance(event, Failed):
            self.failed = event
        return self.over

    @property
    def over(self) -> bool:
        return self.finished is not None or self.failed is not None


class Events:
    """The events of one request's sequences, handed from the scheduler's thread to the loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int):
        def put(event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return put


def submit(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    try:
        scheduler.submit(seqs)
    except QueueFull as full:
        raise APIError(429, f"the server is at capacity: {full.waiting} sequences wait for a decode slot (bound "
                            f"{full.bound}, --max-queue); retry later", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except NotServing as err:
        raise APIError(503, str(err)) from None


async def collect(request: Request, scheduler: Scheduler, seqs: list[Sequence], events: Events) -> Optional[list[Outcome]]:
    """Every sequence's outcome, or None when the client went away first (its sequences cancelled)."""
    outcomes = [Outcome() for _ in seqs]

    async def consume():
        left = len(seqs)
        while left:
            index, event = await events.queue.get()
            left -= outcomes[index].add(event)

    work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            return None
        work.result()
    finally:
        work.cancel()
        gone.cancel()
        scheduler.cancel([s for s, o in zip(seqs, outcomes) if not o.over])
    for o in outcomes:
        if o.failed is not None:
            raise APIError(o.failed.status, o.failed.message)
    return outcomes


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events; the generator is closed however the response ends (a client that
    goes away cancels its sequences in the generator's `finally`)."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


# Characters JSON leaves raw in strings that line readers split on (Python's splitlines, which
# httpx's iter_lines follows): escaped, so one event stays one line for every client.
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload) -> str:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body.translate(LINE_BREAKS)}\n\n"


def usage(seqs: list[Sequence], finished: list[Optional[Finished]]) -> Usage:
    prompt = sum(len(s.prompt) for s in seqs)
    completion = sum(f.completion_tokens for f in finished if f is not None)
    phases = [PhaseUsage(index=i, **p) for i, f in enumerate(finished) if f is not None for p in f.phases]
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, phases=phases)


def completion_logprobs(tokenizer, tokens, logprobs, top, offsets, as_ids: bool) -> CompletionLogprobs:
    """OpenAI's completions log-probs; each position's top tokens include the token itself."""
    strings = [token_string(tokenizer, t, as_ids) for t in tokens]
    tops = []
    for s, lp, alternatives in zip(strings, logprobs, top):
        if lp is None:
            tops.append(None)
            continue
        best = {token_string(tokenizer, i, as_ids): v for i, v in alternatives or []}
        best.setdefault(s, lp)
        tops.append(best)
    return CompletionLogprobs(tokens=strings, token_logprobs=list(logprobs), top_logprobs=tops, text_offset=list(offsets))


# ---- the application ------------------------------------------------------------------------------


class CountRequests:
    """ASGI middleware: every answered request in the requests_total metric (streams untouched)."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(path, str(status)).inc()


def build_app(served: ServedModel, scheduler: Scheduler, metrics: Metrics, api_key: Optional[str] = None,
              upstreams=None) -> FastAPI:
    """`upstreams`: the budgets of upstream servers (upstream.RemoteBudgets, the front end's;
    `scheduler` routes to them), reported by /health and closed at shutdown."""
    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            if upstreams is not None:
                await upstreams.close()

    app = FastAPI(title="elastic_megatron", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    tok = served.tokenizer

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                                           "body"), status_code=400)
        param = ".".join(loc) or "body"
        message = first["msg"].removeprefix("Value error, ")  # the schema's own checks (protocol.py)
        return JSONResponse(error_body(400, f"{param}: {message}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(_request, err: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"), status_code=500)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse(error_body(503, "the decode loop is not running"), status_code=503)
        if upstreams is not None:
            status, report = await upstreams.health()
            return JSONResponse(report, status_code=status)
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return served.cards()

    @app.get("/tokenizer_info", dependencies=guarded)
    async def tokenizer_info():
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eod_token, "pad_token": tok.eod_token,
                "bos_token": served.chat.specials.get("bos_token") or None, "chat_template": served.chat.source,
                "model_max_length": served.max_len, "vocab_size": tok.vocab_size}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        ids = await asyncio.to_thread(encode, tok, body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        if body.tokens:
            served.check_ids(body.tokens, "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        if body.best_of not in (None, 1):
            raise bad_request("best_of", "only best_of=1 is supported")
        if body.suffix:
            raise bad_request("suffix", "is not supported by this server")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise bad_request("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}")
        prompts, texts = await asyncio.to_thread(completion_prompts, served, body.prompt,
                                                 scheduler.max_batch + scheduler.max_queue)
        p = plan(served, body, prompts, body.max_tokens, echo=body.echo)
        if p.control is not None and body.logprobs is not None:
            raise bad_request("logprobs", "not with budget control (think_budget / answer_budget)")
        events = Events()
        seqs = [Sequence(ids, p.budget, p.max_tokens, p.sampling, OutputText(tok, p.stops), events.sink(i),
                         logprobs=body.logprobs, score_prompt=body.echo and body.logprobs is not None, control=p.control)
                for i, ids in enumerate(prompts)]
        submit(scheduler, seqs)
        model = body.model or served.name
        if body.stream:
            return EventStream(stream_completion(body, seqs, texts, events, scheduler, model))
        outcomes = await collect(request, scheduler, seqs, events)
        if outcomes is None:
            return Response(status_code=499)
        choices = []
        for i, (o, echo_text) in enumerate(zip(outcomes, texts)):
            logprobs = None
            if body.logprobs is not None:
                logprobs = await asyncio.to_thread(choice_logprobs, tok, body, o, echo_text)
            choices.append(CompletionChoice(index=i, text=(echo_text if body.echo else "") + o.finished.text,
                                            logprobs=logprobs, finish_reason=o.finished.reason))
        return CompletionResponse(id=new_id("cmpl"), created=now(), model=model, choices=choices,
                                  usage=usage(seqs, [o.finished for o in outcomes]))

    async def stream_completion(body: CompletionRequest, seqs, texts, events: Events, scheduler: Scheduler,
                                model: str) -> AsyncIterator[str]:
        rid, created = new_id("cmpl"), now()
        finished: list[Optional[Finished]] = [None] * len(seqs)

        def chunk(index: int, text: str, logprobs=None, reason=None) -> str:
            return sse(CompletionResponse(id=rid, created=created, model=model, choices=[
                CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)]))

        try:
            if body.echo and body.logprobs is None:
                for i, text in enumerate(texts):
                    yield chunk(i, text)
            left = len(seqs)
            while left:
                index, event = await events.queue.get()
                if isinstance(event, PromptScores):
                    yield chunk(index, texts[index], completion_logprobs(
                        tok, event.tokens, event.logprobs, event.top, text_offsets(tok, event.tokens), body.return_tokens_as_token_ids))
                elif isinstance(event, Token):
                    if event.text or body.logprobs is not None:
                        start = len(texts[index]) if body.echo else 0
                        lp = None if body.logprobs is None else completion_logprobs(
                            tok, [event.token], [event.logprob], [event.top], [start + event.offset], body.return_tokens_as_token_ids)
                        yield chunk(index, event.text, lp)
                elif isinstance(event, Finished):
                    finished[index], left = event, left - 1
                    yield chunk(index, event.tail, reason=event.reason)
                else:
                    left -= 1
                    yield sse(error_body(event.status, event.message))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage(seqs, finished)))
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel([s for s in seqs if not s.done])

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.logprobs:
            raise bad_request("logprobs", "log-probs are served by /v1/completions only")
        prompt = await asyncio.to_thread(chat_prompt, served, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        p = plan(served, body, [prompt], max_tokens)
        events = Events()
        seqs = [Sequence(prompt, p.budget, p.max_tokens, p.sampling, OutputText(tok, p.stops), events.sink(0), control=p.control)]
        submit(scheduler, seqs)
        model = body.model or served.name
        if body.stream:
            return EventStream(stream_chat(body, seqs, events, scheduler, model))
        outcomes = await collect(request, scheduler, seqs, events)
        if outcomes is None:
            return Response(status_code=499)
        f = outcomes[0].finished
        return ChatCompletionResponse(id=new_id("chatcmpl"), created=now(), model=model, usage=usage(seqs, [f]), choices=[
            ChatChoice(index=0, message=ChatMessageOut(content=f.text), finish_reason=f.reason)])

    async def stream_chat(body: ChatCompletionRequest, seqs, events: Events, scheduler: Scheduler, model: str) -> AsyncIterator[str]:
        rid, created = new_id("chatcmpl"), now()

        def chunk(delta: ChatDelta, reason=None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                ChatChunkChoice(index=0, delta=delta, finish_reason=reason)]))

        try:
            yield chunk(ChatDelta(role="assistant", content=""))
            while True:
                _, event = await events.queue.get()
                if isinstance(event, Token):
                    if event.text:
                        yield chunk(ChatDelta(content=event.text))
                elif isinstance(event, Finished):
                    if event.tail:
                        yield chunk(ChatDelta(content=event.tail))
                    yield chunk(ChatDelta(), reason=event.reason)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                                      usage=usage(seqs, [event])))
                    break
                elif isinstance(event, Failed):
                    yield sse(error_body(event.status, event.message))
                    break
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel([s for s in seqs if not s.done])

    paths = {route.path for route in app.routes}
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
    return app


def completion_prompts(served: ServedModel, prompt, most: int) -> tuple[list[list[int]], list[str]]:
    """(token ids, text) of each prompt of a completions request: a string, a list of
    strings, a list of token ids, or a list of lists of token ids; at most `most` of them
    (counted before any is tokenized)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt", "must not be empty")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) > most:
        raise bad_request("prompt", f"{len(prompt)} prompts in one request; at most --max-batch + --max-queue ({most})")
    ids, texts = [], []
    for i, p in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            ids.append(served.encode(p, param))
            texts.append(p)
        else:
            ids.append(served.check_ids(list(p), param))
            texts.append(served.tokenizer.decode(p))
    return ids, texts


def chat_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    if not body.messages:
        raise bad_request("messages", "must not be empty")
    if len(body.messages) > served.max_len:  # each message is at least one token of the prompt
        raise bad_request("messages", f"{len(body.messages)} messages; at most the model's length ({served.max_len})")
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise bad_request(f"messages.{i}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) are served")
            content = "".join(part.text for part in content)
        messages.append({**m.model_dump(exclude_none=True), "content": content or ""})
    try:
        text = served.chat.render(messages, body.add_generation_prompt, **(body.chat_template_kwargs or {}))
    except Exception as err:  # the template's own checks (raise_exception) and template errors
        raise bad_request("messages", f"the chat template refused them: {err}") from None
    return served.encode(text, "messages")


def choice_logprobs(tokenizer, body: CompletionRequest, o: Outcome, echo_text: str) -> CompletionLogprobs:
    """One choice's log-probs: the prompt's (echo) then the completion's."""
    as_ids = body.return_tokens_as_token_ids
    start = len(echo_text) if body.echo else 0
    generated = completion_logprobs(tokenizer, o.tokens, o.logprobs, o.top, [start + x for x in o.offsets], as_ids)
    if not body.echo or o.prompt is None:
        return generated
    p = o.prompt
    prompt = completion_logprobs(tokenizer, p.tokens, p.logprobs, p.top, text_offsets(tokenizer, p.tokens), as_ids)
    return CompletionLogprobs(tokens=prompt.tokens + generated.tokens,
                              token_logprobs=prompt.token_logprobs + generated.token_logprobs,
                              top_logprobs=prompt.top_logprobs + generated.top_logprobs,
                              text_offset=prompt.text_offset + generated.text_offset)


class Server:
    """The scheduler (weights loaded, a decode state per budget, warmed up) and the app."""

    def __init__(self, gen: ElasticGenerator, name: str, options: ServeOptions):
        options.check(gen.cfg.max_sequence_length)
        self.options = options
        max_len = options.max_model_len or gen.cfg.max_sequence_length
        self.served = ServedModel(gen, name, max_len)
        self.metrics = Metrics(self.served.budgets)
        self.scheduler = Scheduler(gen, self.served.budgets, options.max_batch, options.max_queue, max_len, self.metrics)
        self.scheduler.warm_up()
        self.app = build_app(self.served, self.scheduler, self.metrics, options.api_key)

    def uvicorn(self, log_level: str = "info", access_log: bool = False):
        import uvicorn

        config = uvicorn.Config(self.app, log_level=log_level, access_log=access_log, lifespan="on",
                                timeout_graceful_shutdown=self.options.grace_period)
        return uvicorn.Server(config)

    def run(self, sock: socket.socket, log_level: str = "info", access_log: bool = False) -> None:
        """Serve on `sock` until SIGTERM or SIGINT: stop accepting, let the requests in flight
        finish (up to the grace period), stop the decode loop, return."""
        server = self.uvicorn(log_level, access_log)
        main = threading.current_thread() is threading.main_thread()
        # uvicorn drains on SIGTERM, restores the handlers it found and raises the signal
        # again; this handler makes that second delivery a no-op, so a drained server exits 0.
        previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
        try:
            server.run(sockets=[sock])
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
