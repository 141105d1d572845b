"""The scheduler: one thread that owns the decode loop over one copy of the weights.

Each budget has a decoder (a view model of the one parent, inference/budgets.py) and one
`DecodeState` of `max_batch` slots (inference/decoder.py). The loop, until stopped:

1. drops cancelled sequences (a client that went away): their slots are free at once;
2. admits waiting sequences into free slots of their budget (budget control's answers
   first, then arrivals in order; a full budget does not hold up the others): their
   prompts are prefilled into the slots (with every position's logits when the prompt is
   scored, `echo` + `logprobs`) and each picks its first token;
3. runs one decode step per budget over its running sequences; each picks its next token.

A sequence leaves at the end-of-document token, at its token limit, or at a stop string,
and its slot is released before the next step. A budget-control sequence runs in two
phases, as `ElasticGenerator.budget_control` does: the think budget writes the trace until
the delimiter (forced after `max_think_tokens`); then the sequence leaves that budget's
batch and joins the answer budget's, whose prefill of prompt + trace starts its answer.

Greedy picks are the argmax of the same logits `ElasticGenerator.generate_ids` takes (rows
past the tokenizer's vocabulary masked), so a request's greedy tokens do not depend on what
else runs; sampled ones draw from the request's own generator (seeded by `seed`; the answer
phase `seed + 1`, as budget control does). Log-probs are the model's own log-softmax over
its whole vocabulary.

Everything a sequence produces goes to its `sink` as events (`PromptScores`, `Token`,
`Finished`, `Failed`), from this thread; the server forwards them to the event loop.
`submit` and `cancel` are the only calls from other threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq

import torch

from elastic_megatron.inference.generator import ElasticGenerator, Sampling, ends_thinking
from elastic_megatron.serving.metrics import Metrics
from elastic_megatron.serving.text import OutputText

log = logging.getLogger("elastic_megatron.serving")

NEVER = 1 << 62  # no stop string is looked for while thinking


class QueueFull(Exception):
    def __init__(self, waiting: int, bound: int):
        super().__init__(f"{waiting} sequences wait for a decode slot (bound {bound})")
        self.waiting, self.bound = waiting, bound


class NotServing(Exception):
    """The scheduler is stopping or stopped."""


@dataclass
class Control:
    """Budget control of one sequence."""

    think_budget: str
    answer_budget: str
    max_think_tokens: int
    delimiter: str
    delimiter_ids: list[int]


# ---- events ------------------------------------------------------------------------------------


@dataclass
class PromptScores:
    """log p(prompt[j] | prompt[:j]) for every prompt token (None for the first) and the
    `top` most likely tokens there [(id, log p)]."""

    tokens: list[int]
    logprobs: list[Optional[float]]
    top: list[Optional[list[tuple[int, float]]]]


@dataclass
class Token:
    token: int
    text: str  # what a stream may show now (may be "")
    offset: int  # where the token's text begins in the completion text
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None


def end_of_text_entry(token: int, offset: int, logprob: Optional[float], top) -> Token:
    """A scored prompt (`echo` + `logprobs`) whose first pick ends the text still reports that
    pick, with no text and not counted as a completion token, as OpenAI's completions do:
    lm-evaluation-harness reads a continuation's log-likelihood as token_logprobs[ctxlen:-1],
    dropping one generated entry, so without it the prompt's last token would be dropped."""
    return Token(token, "", offset, logprob, top)


def take_token(seq: "Sequence", token: int, logprob: Optional[float], top, tokenizer, metrics: Metrics,
               now: float) -> Optional[str]:
    """A sequence's next token, picked here or streamed by an upstream (serving/upstream.py): sent
    to its sink with its text, counted in the metrics; why its phase ends with it (stop, length)
    or None. The end of text ends the phase and is not a token of the answer."""
    if token == tokenizer.eod:
        if seq.score_prompt:
            seq.sink(end_of_text_entry(token, len(seq.out.text), logprob, top))
        return "stop"
    seq.phase_tokens.append(token)
    offset = len(seq.out.text)
    seq.sink(Token(token, seq.out.add(token), offset, logprob, top))
    metrics.generated_tokens.labels(seq.budget).inc()
    if seq.last_token_time is None:
        metrics.first_token.labels(seq.budget).observe(now - seq.arrival)
    else:
        metrics.inter_token.labels(seq.budget).observe(now - seq.last_token_time)
    seq.last_token_time = now
    if seq.out.stopped_at is not None:
        return "stop"
    if len(seq.phase_tokens) >= seq.phase_max:
        return "length"
    if seq.phase == "think" and ends_thinking(tokenizer, seq.phase_tokens, seq.control.delimiter,
                                              seq.control.delimiter_ids):
        return "stop"
    return None


@dataclass
class Finished:
    reason: str  # stop | length | abort
    text: str  # the whole completion text
    tail: str  # what a stream has not shown of it yet
    completion_tokens: int
    phases: list[dict]


@dataclass
class Failed:
    status: int
    message: str


Event = PromptScores | Token | Finished | Failed


@dataclass(eq=False)
class Sequence:
    """One prompt's generation. `max_tokens`: new tokens (the answer's, under budget control);
    `logprobs`: how many top tokens to report with each token (None: no log-probs);
    `score_prompt`: report the prompt tokens' log-probs too."""

    prompt: list[int]
    budget: str
    max_tokens: int
    sampling: Sampling
    out: OutputText
    sink: Callable[[Event], None]
    logprobs: Optional[int] = None
    score_prompt: bool = False
    control: Optional[Control] = None
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    phases: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.phase, self.phase_prompt, self.phase_max = "generate", self.prompt, self.max_tokens
        if self.control is not None:
            self.phase, self.budget, self.phase_max = "think", self.control.think_budget, self.control.max_think_tokens
            self.out.stop_from = NEVER
        self.phase_tokens: list[int] = []
        self.phase_start = 0.0
        self.generator = torch.Generator().manual_seed(self.sampling.seed)
        self.slot: Optional[int] = None
        self.next_token = 0
        self.last_token_time: Optional[float] = None


class Scheduler:
    def __init__(self, gen: ElasticGenerator, budgets: Seq[str], max_batch: int, max_queue: int, max_len: int,
                 metrics: Metrics):
        self.gen, self.tokenizer, self.metrics = gen, gen.tokenizer, metrics
        self.vocab = gen.tokenizer.vocab_size  # logits past it pad the model's vocabulary: never picked
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoders = {b: gen.decoder(b) for b in budgets}  # the first one loads the weights
        self.states = {b: d.new_state(max_batch, max_len) for b, d in self.decoders.items()}
        self.running: dict[str, dict[int, Sequence]] = {b: {} for b in budgets}  # budget -> slot -> sequence
        self._free = {b: max_batch for b in budgets}  # slots not held, guarded by _cv (submit reads it)
        self._queued = {b: 0 for b in budgets}  # arrivals waiting, per budget, guarded by _cv
        self._waiting: deque[Sequence] = deque()  # arrivals, guarded by _cv
        self._handoff: deque[Sequence] = deque()  # budget control's answers waiting for a slot (this thread's)
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.failure: Optional[BaseException] = None

    @property
    def cache_bytes(self) -> int:
        return sum(s.nbytes() for s in self.states.values())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- other threads --------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for admission, or refuse them all (QueueFull) when more than
        `max_queue` sequences would wait beyond the free slots of their budgets."""
        with self._cv:
            if self._stopping or not self.alive:
                raise NotServing("the server is shutting down" if self._stopping else "the decode loop has stopped")
            queued = dict(self._queued)
            for s in seqs:
                queued[s.budget] += 1
            waiting = sum(max(0, n - self._free[b]) for b, n in queued.items())
            if waiting > self.max_queue:
                raise QueueFull(sum(max(0, n - self._free[b]) for b, n in self._queued.items()), self.max_queue)
            self._queued = queued
            self._waiting.extend(seqs)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """The client is gone: the sequences leave before the next step."""
        for s in seqs:
            s.cancelled = True
        with self._cv:
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; sequences still there are aborted (the server has already waited
        for its requests, up to its grace period)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop (this thread) ----------------------------------------------------------------

    def warm_up(self) -> None:
        """A prefill and two steps per budget, before serving (first calls are slow)."""
        with torch.no_grad():
            for budget, dec in self.decoders.items():
                state = self.states[budget]
                slot = state.acquire()
                try:
                    dec.prefill([[0, 1]], state=state, slots=[slot])
                    for _ in range(2):
                        dec.step(torch.zeros(state.span, dtype=torch.long), state)
                finally:
                    state.release(slot)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._handoff or self._busy()):
                        self._cv.wait()
                    if self._stopping:
                        break
                self._drop_cancelled()
                self._admit()
                for budget, running in self.running.items():
                    if running:
                        self._step(budget)
        except BaseException as err:  # a bug: every request still here gets a 500, /health says so
            self.failure = err
            log.exception("the decode loop stopped")
        finally:
            with self._cv:
                self._stopping = True
                pending = list(self._waiting) + list(self._handoff)
                self._waiting.clear()
            for seq in pending + [s for r in self.running.values() for s in r.values()]:
                self._release(seq)
                seq.done = True
                seq.sink(Failed(503 if self.failure is None else 500, "the server stopped before this request finished"))

    def _busy(self) -> bool:
        return any(self.running.values())

    def _drop_cancelled(self) -> None:
        for running in self.running.values():
            for seq in [s for s in running.values() if s.cancelled]:
                self._finish(seq, "abort")

    def _admit(self) -> None:
        ready: dict[str, list[Sequence]] = {}
        dropped = []
        with self._cv:
            for queue, arrivals in ((self._handoff, False), (self._waiting, True)):
                keep: deque[Sequence] = deque()
                while queue:
                    seq = queue.popleft()
                    if arrivals and (seq.cancelled or self._free[seq.budget] > 0):
                        self._queued[seq.budget] -= 1
                    if seq.cancelled:
                        dropped.append(seq)
                    elif self._free[seq.budget] > 0:
                        self._free[seq.budget] -= 1
                        ready.setdefault(seq.budget, []).append(seq)
                    else:
                        keep.append(seq)
                queue.extend(keep)
            self.metrics.queue_depth.set(len(self._waiting))
        for seq in dropped:
            self._finish(seq, "abort")
        for budget, seqs in ready.items():
            state = self.states[budget]
            for seq in seqs:
                seq.slot, seq.phase_start = state.acquire(), time.perf_counter()
                self.running[budget][seq.slot] = seq
                self.metrics.prompt_tokens.labels(budget).inc(len(seq.phase_prompt))
            self.metrics.running.labels(budget).set(len(self.running[budget]))
            try:
                self._prefill(budget, seqs)
            except Exception as err:
                log.exception("prefill at budget %s failed", budget)
                for seq in seqs:
                    self._fail(seq, err)

    def _prefill(self, budget: str, seqs: list[Sequence]) -> None:
        dec, state = self.decoders[budget], self.states[budget]
        for seq in (s for s in seqs if s.phase_max == 0 and not s.score_prompt):  # echo only: nothing to run
            self._finish(seq, "length")
        plain = [s for s in seqs if not s.score_prompt and s.phase_max > 0]
        if plain:
            logits, _ = dec.prefill([s.phase_prompt for s in plain], state=state, slots=[s.slot for s in plain])
            self._advance(list(zip(plain, range(len(plain)))), logits)
        for seq in (s for s in seqs if s.score_prompt):
            logits, _ = dec.prefill([seq.phase_prompt], state=state, slots=[seq.slot], all_logits=True)
            self._score_prompt(seq, logits[0])
            if seq.max_tokens == 0:
                self._finish(seq, "length")
            else:
                self._advance([(seq, 0)], logits[0, -1:])

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """logits [prompt length, vocab]: position j predicts token j + 1."""
        prompt = torch.tensor(seq.prompt, device=logits.device)
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        chosen = logp.gather(1, prompt[1:, None])[:, 0].tolist()
        top = _top(logp, seq.logprobs or 0)
        seq.sink(PromptScores(list(seq.prompt), [None, *chosen], [None, *top]))

    def _step(self, budget: str) -> None:
        running, state = self.running[budget], self.states[budget]
        tokens = [0] * state.span
        for slot, seq in running.items():
            tokens[slot] = seq.next_token
        try:
            logits = self.decoders[budget].step(torch.tensor(tokens, dtype=torch.long), state)
            self._advance([(seq, slot) for slot, seq in running.items()], logits)
        except Exception as err:
            log.exception("decode step at budget %s failed", budget)
            for seq in list(running.values()):
                self._fail(seq, err)

    def _advance(self, rows: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        """One new token for each (sequence, its row of `logits`)."""
        index = torch.tensor([r for _, r in rows], device=logits.device)
        logits = logits.index_select(0, index).float()
        scored = [i for i, (s, _) in enumerate(rows) if s.logprobs is not None]
        logp = torch.log_softmax(logits[scored], dim=-1) if scored else None
        logits[:, self.vocab:] = float("-inf")
        greedy = logits.argmax(-1).tolist()
        now = time.perf_counter()
        for i, (seq, _) in enumerate(rows):
            if seq.sampling.temperature == 0:
                token = greedy[i]
            else:
                token = int(seq.sampling.pick(logits[i:i + 1], seq.generator)[0])
            logprob = top = None
            if logp is not None and i in scored:
                row = logp[scored.index(i)]
                logprob, top = float(row[token]), _top(row[None], seq.logprobs)[0]
            self._take(seq, token, logprob, top, now)

    def _take(self, seq: Sequence, token: int, logprob: Optional[float], top, now: float) -> None:
        reason = take_token(seq, token, logprob, top, self.tokenizer, self.metrics, now)
        if reason is None:
            seq.next_token = token
        else:
            self._end_phase(seq, reason)

    def _end_phase(self, seq: Sequence, reason: str) -> None:
        if seq.phase != "think":
            self._finish(seq, reason)
            return
        control = seq.control
        self._record_phase(seq)
        self._release(seq)
        trace = seq.phase_tokens
        if not self.tokenizer.decode(trace).endswith(control.delimiter):  # the cap: the delimiter is forced
            for token in control.delimiter_ids:
                offset = len(seq.out.text)
                seq.sink(Token(token, seq.out.add(token), offset))
            trace = trace + control.delimiter_ids
        seq.phase, seq.budget = "answer", control.answer_budget
        seq.phase_prompt, seq.phase_max, seq.phase_tokens = seq.prompt + trace, seq.max_tokens, []
        s = seq.sampling
        seq.generator = torch.Generator().manual_seed(s.seed + 1)
        seq.out.stop_from = len(seq.out.text)
        if seq.cancelled:
            self._finish(seq, "abort")
        else:
            self._handoff.append(seq)

    def _record_phase(self, seq: Sequence) -> None:
        seq.phases.append({"phase": seq.phase, "budget": seq.budget, "prompt_tokens": len(seq.phase_prompt),
                           "completion_tokens": len(seq.phase_tokens),
                           "seconds": time.perf_counter() - seq.phase_start})

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.slot is not None:  # a phase is running (phase_start is set with the slot)
            self._record_phase(seq)
        self._release(seq)
        seq.done = True
        text, tail = seq.out.final()
        seq.sink(Finished(reason, text, tail, len(seq.out.detok.tokens), seq.phases))

    def _fail(self, seq: Sequence, err: BaseException) -> None:
        self._release(seq)
        seq.done = True
        seq.sink(Failed(500, f"generation failed: {type(err).__name__}: {err}"))

    def _release(self, seq: Sequence) -> None:
        if seq.slot is None:
            return
        budget, slot = seq.budget, seq.slot
        seq.slot, seq.phase_start = None, 0.0
        self.running[budget].pop(slot, None)
        state = self.states[budget]
        if state.active[slot]:
            state.release(slot)
        with self._cv:
            self._free[budget] += 1
        self.metrics.running.labels(budget).set(len(self.running[budget]))


def _top(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely tokens of each row of `logp` [n, vocab]: [(id, log p)] per row."""
    if k <= 0:
        return [[] for _ in range(logp.shape[0])]
    values, ids = logp.topk(k, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
