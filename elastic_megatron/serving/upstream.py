"""Budgets served by upstream OpenAI-compatible servers (vLLM, SGLang, llama.cpp's
llama-server, another tools/serve.py), run as the scheduler runs local ones: the same
`Sequence`s, the same events, so the app's routes, errors, queue bound and streams are
the ones of local budgets.

Every phase is one streamed `/v1/completions` call with the prompt as token ids and the
generated tokens read back as ids (`return_tokens_as_token_ids` with `logprobs`, or
`token_ids`): the text is decoded here, stop strings are found here, and budget control's
answer phase sends prompt + trace as the very ids the think phase produced (the answer
budget prefills them anyway, so no cache crosses engines). A phase that must end early
(a stop string, the delimiter, the token limit) closes its stream, which cancels the
upstream's request, as a client going away does.

An upstream is checked when first reached (at start-up, or later if it was down then):
its model id from `/v1/models`, its tokenizer by the ids its `/tokenize` gives for a
probe text (refused by name if they differ from ours). Faults reach the client as one
error naming the upstream: 503 unavailable (refused connection, a refused check), 504 no
byte within its timeout, 502 a dropped connection, an error answer or a stream cut short
(in a stream: an error event, then [DONE]). An upstream that failed is checked again by
the next request for it, so one that comes back is used again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import httpx

from elastic_megatron.serving.fleet import UpstreamConfig
from elastic_megatron.serving.metrics import LATENCY_BUCKETS, PREFIX, Metrics
from elastic_megatron.serving.protocol import error_body
from elastic_megatron.serving.scheduler import (NotServing, PromptScores, QueueFull, Sequence, Token, Failed, Finished,
                                               take_token)
from elastic_megatron.serving.text import encode

log = logging.getLogger("elastic_megatron.serving")

# Text whose token ids tell tokenizers apart: ASCII, digits, the think delimiter, accents,
# CJK, whitespace runs, code.
PROBE = "Budget control: 12 + 30 = 42.</think> Café, naïve, 東京 —\n\tdef f(x):  return x ** 2"
HEALTH_TIMEOUT_S = 2.0
UP, DOWN, REFUSED = "up", "down", "refused"


class UpstreamError(Exception):
    """A fault of an upstream, answered to the client as `status` with `message`."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None, refused: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
        self.refused = refused  # reached, but it fails the check (another tokenizer, no such model)


@dataclass
class Piece:
    """One generated token as the upstream reported it."""

    token: int
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None


class UpstreamMetrics:
    """elastic_megatron_upstream_{requests,errors,tokens}_total, _latency_seconds, _up, by upstream."""

    def __init__(self, metrics: Metrics, names: list[str]):
        from prometheus_client import Counter, Gauge, Histogram

        r = metrics.registry
        self.requests = Counter(PREFIX + "upstream_requests", "Calls to an upstream", ["upstream"], registry=r)
        self.errors = Counter(PREFIX + "upstream_errors", "Calls to an upstream that failed, by the status answered",
                              ["upstream", "status"], registry=r)
        self.latency = Histogram(PREFIX + "upstream_latency_seconds", "A call to an upstream, sent to its last token",
                                 ["upstream"], buckets=LATENCY_BUCKETS + (20.0, 60.0), registry=r)
        self.tokens = Counter(PREFIX + "upstream_tokens", "Tokens an upstream prefilled (prompt) or generated",
                              ["upstream", "kind"], registry=r)
        self.up = Gauge(PREFIX + "upstream_up", "1 when the upstream answered its last call", ["upstream"], registry=r)
        for name in names:
            self.requests.labels(name)
            self.latency.labels(name)
            self.tokens.labels(name, "prompt")
            self.tokens.labels(name, "generated")
            self.up.labels(name)


class Upstream:
    """One upstream server and what was learnt about it."""

    def __init__(self, config: UpstreamConfig, tokenizer, metrics: Optional[UpstreamMetrics] = None):
        self.config, self.tokenizer, self.metrics = config, tokenizer, metrics
        self.name = config.budget
        self.state, self.error = DOWN, "not reached yet"
        self.model_id: Optional[str] = None
        self.max_model_len: Optional[int] = None
        self.tokenizer_checked: Optional[bool] = None  # None: not reached; False: it has no /tokenize
        self.gives_ids: Optional[bool] = None  # whether its answers carry token ids (else text is re-tokenized here)
        self.client: Optional[httpx.AsyncClient] = None
        self._checking: Optional[asyncio.Lock] = None

    def new_client(self) -> httpx.AsyncClient:
        c = self.config
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        timeout = httpx.Timeout(c.timeout, connect=c.connect_timeout)
        return httpx.AsyncClient(headers=headers, timeout=timeout, limits=httpx.Limits(max_keepalive_connections=32))

    def open(self) -> None:
        self.client, self._checking = self.new_client(), asyncio.Lock()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    # ---- the check ------------------------------------------------------------------------------

    async def check(self, client: Optional[httpx.AsyncClient] = None) -> None:
        """Reach the upstream: its model id and length from /v1/models, its tokenizer against
        ours. Raises UpstreamError (503; `refused` for another tokenizer or a missing model)."""
        client = client or self.client
        c = self.config
        try:
            listed = await self._get_json(client, c.url + "/models")
            cards = [m for m in listed.get("data", []) if isinstance(m, dict) and m.get("id")]
            self.model_id, card = self._pick_model(cards)
            self.max_model_len = card.get("max_model_len") or card.get("context_length") or card.get("n_ctx_train")
            self.tokenizer_checked = await self._check_tokenizer(client)
        except UpstreamError as err:
            self.state, self.error = (REFUSED if err.refused else DOWN), err.message
            raise
        self.state, self.error = UP, None
        if self.metrics:
            self.metrics.up.labels(self.name).set(1)

    async def ready(self) -> None:
        """Checked once per coming up: every request for a budget whose upstream failed
        checks it again (one at a time), so one that comes back is used again."""
        if self.state == UP:
            return
        async with self._checking:
            if self.state != UP:
                await self.check()

    def _pick_model(self, cards: list[dict]) -> tuple[str, dict]:
        ids = [m["id"] for m in cards]
        c = self.config
        if c.model is not None:
            if c.model not in ids:
                raise UpstreamError(503, f"{c.describe()} serves no model {c.model!r}; it lists {ids}", refused=True)
            return c.model, cards[ids.index(c.model)]
        roots = {m.get("root") for m in cards}
        if len(ids) == 1:
            return ids[0], cards[0]
        # one model under several ids (tools/serve.py lists <name> and <name>:<budget>)
        if len(roots) == 1 and next(iter(roots)) in ids:
            root = next(iter(roots))
            return root, cards[ids.index(root)]
        raise UpstreamError(503, f"{c.describe()} serves {ids}: name the one for budget {self.name!r} "
                                 f"(model: in the --upstreams file)", refused=True)

    async def _check_tokenizer(self, client: httpx.AsyncClient) -> bool:
        ours = encode(self.tokenizer, PROBE)
        body = {"model": self.model_id, "prompt": PROBE, "content": PROBE, "add_special_tokens": False}
        try:
            response = await client.post(self.config.root + "/tokenize", json=body)
        except httpx.HTTPError as err:
            raise self._failure(err) from None
        if response.status_code in (404, 405, 501):
            log.warning("%s has no /tokenize: its tokenizer is not checked against this server's", self.config.describe())
            return False
        if response.status_code != 200:
            raise self._answer_error(response.status_code, response.text, response.headers)
        theirs = _json(response, self.config.describe()).get("tokens")
        theirs = [t if isinstance(t, int) else t.get("id") if isinstance(t, dict) else None for t in theirs or []]
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise UpstreamError(503, f"{self.config.describe()} has another tokenizer than the other budgets: "
                                         f"{PROBE!r} is {len(theirs)} tokens there, {len(ours)} here, first different "
                                         f"at token {first}; every budget must share one tokenizer", refused=True)
        return True

    async def _get_json(self, client: httpx.AsyncClient, url: str) -> dict:
        try:
            response = await client.get(url)
        except httpx.HTTPError as err:
            raise self._failure(err) from None
        if response.status_code != 200:
            raise self._answer_error(response.status_code, response.text, response.headers)
        return _json(response, self.config.describe())

    async def probe(self) -> dict:
        """Its state for /health: reached now (briefly), checked again if it was not up."""
        try:
            if self.state == UP:
                response = await self.client.get(self.config.url + "/models", timeout=HEALTH_TIMEOUT_S)
                if response.status_code != 200:
                    raise self._answer_error(response.status_code, response.text, response.headers)
            else:
                async with asyncio.timeout(HEALTH_TIMEOUT_S + self.config.connect_timeout):
                    await self.ready()
        except (UpstreamError, httpx.HTTPError, TimeoutError) as err:
            if self.state == UP:
                self.state = DOWN
            self.error = getattr(err, "message", None) or f"{type(err).__name__}: {err}"
        if self.metrics:
            self.metrics.up.labels(self.name).set(int(self.state == UP))
        out = {"url": self.config.url, "model": self.model_id, "state": self.state,
               "tokenizer_checked": self.tokenizer_checked, "prompt_ids": self.config.prompt_ids}
        if self.error:
            out["error"] = self.error
        return out

    # ---- faults ---------------------------------------------------------------------------------

    def _failure(self, err: BaseException) -> UpstreamError:
        """The client's error for a transport fault; the upstream is down until checked again."""
        c = self.config
        self.state = DOWN
        if self.metrics:
            self.metrics.up.labels(self.name).set(0)
        if isinstance(err, httpx.ConnectTimeout) or isinstance(err, httpx.ConnectError):
            self.error = f"{c.describe()} is unavailable: cannot connect ({err or type(err).__name__})"
            return UpstreamError(503, self.error)
        if isinstance(err, httpx.TimeoutException):
            self.error = f"{c.describe()} did not answer within its timeout of {c.timeout:g} s"
            return UpstreamError(504, self.error)
        self.error = f"{c.describe()} dropped the connection ({type(err).__name__}: {err})"
        return UpstreamError(502, self.error)

    def _answer_error(self, status: int, text: str, headers) -> UpstreamError:
        """The client's error for an error answer: its 400 and 429 stay theirs, the rest is 502."""
        try:
            body = json.loads(text)
            message = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else None
            message = message or body.get("message") or body.get("detail") or text
        except (ValueError, AttributeError):
            message = text
        message = str(message).strip()[:500]
        described = self.config.describe()
        if status == 400:
            return UpstreamError(400, f"{described} refused the request: {message}")
        if status == 429:
            return UpstreamError(429, f"{described} is at capacity: {message}",
                                 {"Retry-After": headers.get("retry-after", "1")})
        return UpstreamError(502, f"{described} answered {status}: {message}")

    # ---- a phase --------------------------------------------------------------------------------

    async def tokens(self, seq: Sequence, prompt: list[int], max_tokens: int, seed: int) -> AsyncIterator:
        """The upstream's tokens (Piece) for `prompt`, a PromptScores first when the prompt
        is scored; then its finish reason (a str). Closing the iterator early closes the stream."""
        c, s = self.config, seq.sampling
        body = {"model": self.model_id, "prompt": prompt if c.prompt_ids else self.tokenizer.decode(prompt),
                "max_tokens": max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": seed,
                "stream": not seq.score_prompt, "logprobs": seq.logprobs or 0, "return_tokens_as_token_ids": True,
                "return_token_ids": True}
        if s.top_k > 0:
            body["top_k"] = s.top_k
        if seq.score_prompt:
            body["echo"] = True
        if self.metrics:
            self.metrics.requests.labels(self.name).inc()
            self.metrics.tokens.labels(self.name, "prompt").inc(len(prompt))
        start = time.perf_counter()
        try:
            async with aclosing(self._call(seq, body, prompt)) as items:  # closing it closes the stream at once
                async for item in items:
                    yield item
        except UpstreamError as err:
            if self.metrics:
                self.metrics.errors.labels(self.name, str(err.status)).inc()
            raise
        finally:
            if self.metrics:
                self.metrics.latency.labels(self.name).observe(time.perf_counter() - start)

    async def _call(self, seq: Sequence, body: dict, prompt: list[int]) -> AsyncIterator:
        c = self.config
        try:
            async with self.client.stream("POST", c.url + "/completions", json=body) as response:
                if response.status_code != 200:
                    raise self._answer_error(response.status_code, (await response.aread()).decode(errors="replace"),
                                             response.headers)
                if seq.score_prompt:
                    chunks = [json.loads(await response.aread())]
                else:
                    chunks = self._events(response)
                finish = None
                async for chunk in _aiter(chunks):
                    if not isinstance(chunk, dict) or "error" in chunk or "choices" not in chunk:
                        message = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
                        message = message.get("message", message) if isinstance(message, dict) else message
                        raise UpstreamError(502, f"{c.describe()} failed mid-stream: {message}")
                    for choice in chunk["choices"]:
                        pieces = self._pieces(choice)
                        if seq.score_prompt:
                            scores, pieces = self._prompt_scores(prompt, pieces)
                            yield scores
                        for piece in pieces:
                            if self.metrics:
                                self.metrics.tokens.labels(self.name, "generated").inc()
                            yield piece
                        finish = choice.get("finish_reason") or finish
                if finish is None:
                    raise UpstreamError(502, f"{c.describe()} ended the stream before its end (no finish_reason)")
                yield "length" if finish == "length" else "stop"
        except httpx.HTTPError as err:
            raise self._failure(err) from None
        except json.JSONDecodeError as err:
            raise UpstreamError(502, f"{c.describe()} answered something that is not JSON: {err}") from None

    async def _events(self, response: httpx.Response) -> AsyncIterator[dict]:
        """The JSON of each `data:` line, until [DONE]; a stream cut before it is a fault."""
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
        raise UpstreamError(502, f"{self.config.describe()} ended the stream before [DONE]")

    def _pieces(self, choice: dict) -> list[Piece]:
        """The tokens of a choice: `token_ids` (vLLM's return_token_ids), else the log-probs'
        "token_id:<id>" strings; an upstream that gives neither has its text tokenized here."""
        lp = choice.get("logprobs") or {}
        strings = lp.get("tokens") or []
        ids = choice.get("token_ids")
        if not isinstance(ids, list):
            ids = [_token_id(t) for t in strings]
            if any(i is None for i in ids):
                ids = None
        text = choice.get("text") or ""
        if ids and self.gives_ids is None:
            self.gives_ids = True
        elif not ids and text and not self.gives_ids:  # text, never an id: say once, then tokenize it here
            if self.gives_ids is None:
                self.gives_ids = False
                log.warning("%s returns no token ids: its text is tokenized again here, so budget control's answer "
                            "prompt may differ from the trace it wrote", self.config.describe())
            ids = encode(self.tokenizer, text)
        ids = ids or []
        logprobs = lp.get("token_logprobs") or []
        tops = lp.get("top_logprobs") or []
        pieces = []
        for i, token in enumerate(ids):
            top = tops[i] if i < len(tops) else None
            top = None if top is None else [(t, v) for t, v in ((_token_id(k), v) for k, v in top.items()) if t is not None]
            pieces.append(Piece(token, logprobs[i] if i < len(logprobs) and len(logprobs) == len(ids) else None, top))
        return pieces

    @staticmethod
    def _prompt_scores(prompt: list[int], pieces: list[Piece]) -> tuple[PromptScores, list[Piece]]:
        """An echoed answer: the prompt's pieces, then the generated ones."""
        head, rest = pieces[:len(prompt)], pieces[len(prompt):]
        logprobs = [p.logprob for p in head] + [None] * (len(prompt) - len(head))
        top = [p.top for p in head] + [None] * (len(prompt) - len(head))
        logprobs[0], top[0] = None, None
        return PromptScores(list(prompt), logprobs, top), rest


def _json(response: httpx.Response, described: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise UpstreamError(502, f"{described} answered {response.request.url.path} with something that is not a JSON "
                                 f"object: {response.text[:200]!r}")
    return body


def _token_id(text) -> Optional[int]:
    if isinstance(text, str) and text.startswith("token_id:"):
        try:
            return int(text[9:])
        except ValueError:
            return None
    return None


async def _aiter(chunks):
    if isinstance(chunks, list):
        for c in chunks:
            yield c
    else:
        async for c in chunks:
            yield c


# ---- the budgets of upstreams, as the scheduler runs local ones -------------------------------------


class RemoteBudgets:
    """Runs `Sequence`s of upstream budgets: at most `max_batch` in flight per upstream,
    `max_queue` waiting beyond them (then QueueFull, a 429), each a task on the event loop
    sending its events to its sink as the scheduler does."""

    def __init__(self, upstreams: dict[str, Upstream], tokenizer, metrics: Metrics, max_batch: int, max_queue: int,
                 local_budgets: int = 0):
        self.upstreams, self.tokenizer, self.metrics = upstreams, tokenizer, metrics
        self.local_budgets = local_budgets  # budgets run here, which answer whatever the upstreams do
        self.max_batch, self.max_queue = max_batch, max_queue
        self._assigned = {b: 0 for b in upstreams}  # sequences running or waiting, per budget
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._tasks: dict[Sequence, asyncio.Task] = {}
        self._stopping = False

    def start(self) -> None:
        """On the server's event loop (its lifespan): the clients and slots live there."""
        self._slots = {b: asyncio.Semaphore(self.max_batch) for b in self.upstreams}
        for up in self.upstreams.values():
            up.open()

    def stop(self) -> None:
        """Requests still running are ended (the server has waited for them, up to its grace period)."""
        self._stopping = True
        for task in list(self._tasks.values()):
            task.cancel()

    async def close(self) -> None:
        self.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=5)
        for up in self.upstreams.values():
            await up.close()

    async def health(self) -> tuple[int, dict]:
        """(status, body) of /health: every upstream reached now; 200 while any budget can
        answer ("degraded" when some upstream cannot), else 503."""
        states = dict(zip(self.upstreams, await asyncio.gather(*(u.probe() for u in self.upstreams.values()))))
        up = sum(s["state"] == UP for s in states.values())
        if up == len(states):
            return 200, {"status": "ok", "upstreams": states}
        if up or self.local_budgets:
            return 200, {"status": "degraded", "upstreams": states}
        return 503, {**error_body(503, "no budget can answer: every upstream is unavailable"), "upstreams": states}

    def _waiting(self, assigned: dict[str, int]) -> int:
        return sum(max(0, n - self.max_batch) for n in assigned.values())

    def submit(self, seqs: list[Sequence]) -> None:
        if self._stopping:
            raise NotServing("the server is shutting down")
        assigned = dict(self._assigned)
        for s in seqs:
            assigned[s.budget] += 1
        if self._waiting(assigned) > self.max_queue:
            raise QueueFull(self._waiting(self._assigned), self.max_queue)
        self._assigned = assigned
        loop = asyncio.get_running_loop()
        for s in seqs:
            task = self._tasks[s] = loop.create_task(self._run(s))
            task.add_done_callback(lambda _task, seq=s: self._ended(seq))  # also when cancelled before it ran

    def cancel(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            s.cancelled = True
            task = self._tasks.get(s)
            if task is not None and not task.done():
                task.cancel()

    def _ended(self, seq: Sequence) -> None:
        """A sequence's task is over, however: its place is free; one the server's stop
        cancelled tells its client."""
        self._tasks.pop(seq, None)
        self._assigned[seq.budget] -= 1
        if not seq.done:  # cancelled: by its client (nobody listens) or by the server stopping
            seq.done = True
            if self._stopping:
                seq.sink(Failed(503, "the server stopped before this request finished"))

    async def _run(self, seq: Sequence) -> None:
        try:
            while True:
                up = self.upstreams[seq.budget]
                async with self._slots[seq.budget]:
                    self.metrics.running.labels(seq.budget).inc()
                    try:
                        reason = await self._phase(seq, up)
                    finally:
                        self.metrics.running.labels(seq.budget).dec()
                if seq.phase != "think":
                    break
                self._to_answer(seq)  # however the trace ended, as ElasticGenerator.budget_control
            seq.done = True
            text, tail = seq.out.final()
            seq.sink(Finished(reason, text, tail, len(seq.out.detok.tokens), seq.phases))
        except UpstreamError as err:
            seq.done = True
            seq.sink(Failed(err.status, err.message))
        except Exception as err:  # a bug here: the client still gets one error
            log.exception("upstream request failed")
            seq.done = True
            seq.sink(Failed(500, f"generation failed: {type(err).__name__}: {err}"))

    async def _phase(self, seq: Sequence, up: Upstream) -> str:
        """One phase at the upstream of `seq.budget`, token by token, as the scheduler's
        `_take` ends it: end-of-document, a stop string, the token limit, the delimiter."""
        await up.ready()
        seq.phase_start, seq.phase_tokens = time.perf_counter(), []
        seed = seq.sampling.seed + (1 if seq.phase == "answer" else 0)  # as budget control seeds its answer
        budget, reason = seq.budget, None
        self.metrics.prompt_tokens.labels(budget).inc(len(seq.phase_prompt))
        if seq.phase_max == 0:  # echo only: the prompt's scores, nothing generated
            async with aclosing(up.tokens(seq, seq.phase_prompt, 0, seed)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, PromptScores):
                        seq.sink(piece)
            self._record(seq)
            return "length"
        async with aclosing(up.tokens(seq, seq.phase_prompt, seq.phase_max, seed)) as pieces:
            async for piece in pieces:
                if isinstance(piece, PromptScores):
                    seq.sink(piece)
                    continue
                if isinstance(piece, str):  # the upstream ended the phase itself
                    reason = piece
                    break
                reason = take_token(seq, piece.token, piece.logprob, piece.top, self.tokenizer, self.metrics,
                                    time.perf_counter())
                if reason is not None:
                    break
        self._record(seq)
        return reason

    def _record(self, seq: Sequence) -> None:
        seq.phases.append({"phase": seq.phase, "budget": seq.budget, "prompt_tokens": len(seq.phase_prompt),
                           "completion_tokens": len(seq.phase_tokens), "seconds": time.perf_counter() - seq.phase_start})

    def _to_answer(self, seq: Sequence) -> None:
        """The think phase is over: the answer budget gets prompt + trace (the delimiter
        forced at the cap), as the scheduler's `_end_phase` hands it over."""
        control, trace = seq.control, seq.phase_tokens
        if not self.tokenizer.decode(trace).endswith(control.delimiter):
            for token in control.delimiter_ids:
                offset = len(seq.out.text)
                seq.sink(Token(token, seq.out.add(token), offset))
            trace = trace + control.delimiter_ids
        self._assigned[seq.budget] -= 1
        seq.phase, seq.budget = "answer", control.answer_budget
        self._assigned[seq.budget] += 1
        seq.phase_prompt, seq.phase_max, seq.phase_tokens = seq.prompt + trace, seq.max_tokens, []
        seq.out.stop_from = len(seq.out.text)
