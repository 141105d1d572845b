"""`ElasticGenerator`: text generation from one checkpoint, at any of its budgets, and
elastic budget control (a small nested model writes the reasoning trace, a larger one the
answer).

    gen = ElasticGenerator.from_checkpoint("runs/demo-stage2")
    out = gen.generate(["def main("], budget="small", max_new_tokens=64)
    out = gen.budget_control("Q: ...", think_budget="small", answer_budget="full")

One copy of the weights serves every budget: the parent is loaded once and each budget is
a view model over it (inference/budgets.py), built on first use. Works on a parent, an
elastic checkpoint (any recorded budget), a sliced checkpoint, an imported HF model and any
HF directory, quantized ones included (inference/loading.py: one loading path for the
generator, the evaluation tools and the server).

Budget control: the trace is generated at the think budget until the delimiter appears
(or the cap of thinking tokens is reached, which forces the delimiter, as Nemotron Nano's
budget control does); then the answer budget prefills prompt + trace from scratch (caches
of different widths are not interchangeable) and writes the answer. That re-prefill is a
parallel forward over the tokens, far cheaper per token than decoding them
(benchmarks/generation.py measures it); prefilling the prompt at the answer budget while
thinking would not save compute, only move it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.inference.loading import budget_quantization, open_for_inference
from elastic_megatron.checkpoint.metadata import require_same_architecture
from elastic_megatron.elastic.budgets import checkpoint_budgets, recorded_budgets
from elastic_megatron.elastic.widths import Widths, full_widths
from elastic_megatron.inference.budgets import ViewStats, budget_model
from elastic_megatron.inference.decoder import HybridDecoder

FULL = "full"


def ends_thinking(tokenizer, tokens: Sequence[int], delimiter: str, delimiter_ids: Sequence[int]) -> bool:
    """Budget control's stop: the trace ends with `delimiter` (decoded over its last tokens
    only, enough to hold the delimiter however the tokenizer split it)."""
    return tokenizer.decode(tokens[-4 * len(delimiter_ids) - 4:]).endswith(delimiter)


@dataclass
class Sampling:
    """temperature 0: greedy; otherwise softmax(logits / temperature), restricted to the
    top_k tokens (0: all) and to the smallest set with probability >= top_p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self, vocab: int) -> None:
        if not self.temperature >= 0:
            raise ConfigError("--temperature", self.temperature, "must be >= 0 (0: greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= vocab:
            raise ConfigError("--top-k", self.top_k, f"must be an integer between 0 (no limit) and the vocabulary size {vocab}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p", self.top_p, "must be in (0, 1]")

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Next token ids [b] from logits [b, vocab]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        # Divided as fp32, a temperature of 1e-300 would be 0 and one of 1e300 inf: clamped to
        # fp32's finite range, and dividing the gaps to the best score (<= 0), every score is
        # finite or -inf whatever the temperature (softmax is unchanged by the shift).
        finfo = torch.finfo(torch.float32)
        temperature = min(max(self.temperature, finfo.tiny), finfo.max)
        scores = logits.float()
        scores = (scores - scores.amax(-1, keepdim=True)) / temperature
        if self.top_k:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # keep the smallest prefix reaching top_p
            drop[..., 0] = False  # and the best token, even when top_p rounds to 0 in fp32
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@dataclass
class Phase:
    budget: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    def as_dict(self) -> dict:
        return vars(self).copy()


@dataclass
class Generation:
    texts: list[str]
    token_ids: list[list[int]]  # new tokens of each prompt
    phases: list[Phase] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"texts": self.texts, "token_ids": self.token_ids, "phases": [p.as_dict() for p in self.phases]}


class ElasticGenerator:
    """`model`: the parent, or a function that loads it (called on the first generation, so
    that every request is checked before the weights are read)."""

    def __init__(self, model, cfg, budgets: dict[str, Widths], tokenizer, source: str = "", contiguous: bool = False,
                 cuda_graph: bool = False, quantization: Optional[dict] = None, compiled: bool = False):
        self._parent, self.cfg, self.tokenizer, self.source = model, cfg, tokenizer, source
        # Scales (a QuantHooks record) every budget's model runs fake-quantized with, or None
        # (inference/loading.py budget_quantization); attached to each model as it is built.
        self.quantization = quantization
        # Set before the first generation: budgets' strided weights copied contiguous
        # (memory: view_stats[name].copied_bytes), decode steps as CUDA graphs (CUDA only) or
        # compiled (torch.compile: one compile per budget and batch size, on its first step).
        self.contiguous, self.cuda_graph, self.compiled = contiguous, cuda_graph, compiled
        self.budgets = budgets  # name -> widths (the parent itself under FULL when not elastic)
        self.elastic = any(w != full_widths(cfg) for w in budgets.values())
        self._decoders: dict[str, HybridDecoder] = {}
        self.view_stats: dict[str, ViewStats] = {}

    @property
    def parent(self):
        if callable(self._parent) and not isinstance(self._parent, torch.nn.Module):
            self._parent = self._parent()
        return self._parent.eval()

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, tokenizer: Optional[str] = None, dtype: torch.dtype = torch.float32,
                        precision: Optional[str] = None, calibration_batches: int = 16,
                        budgets_from: Optional[str | Path] = None, contiguous: bool = False,
                        cuda_graph: bool = False, compiled: bool = False) -> "ElasticGenerator":
        """Load a checkpoint (run dir or iter_* dir, or a Hugging Face directory: BF16, FP8 or
        NVFP4, inference/loading.py) once; `tokenizer`: a tokenizer.json to use instead of the
        one the checkpoint records. `precision` (bf16, fp8, nvfp4; default: as stored, a QAD
        checkpoint with its scales): every budget fake-quantized with one set of scales, see
        `budget_quantization`. `budgets_from`: run at the budgets another elastic checkpoint
        of the same architecture records (a sorted parent at an elastic run's budgets: its
        untrained slices of the same sizes) instead of its own."""
        checkpoint = open_for_inference(path)
        cfg, meta, directory = checkpoint.cfg, checkpoint.meta, checkpoint.path
        tok = checkpoint.tokenizer(tokenizer)
        if tok.vocab_size > cfg.vocab_size:
            raise ConfigError("--tokenizer", tokenizer or "(the checkpoint's)", f"has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
        budgets = {FULL: full_widths(cfg)}
        if budgets_from is not None:
            require_same_architecture(cfg, budgets_from, "--budgets-from")
            budgets = dict(checkpoint_budgets(budgets_from))
        elif (meta.get("elastic") or {}).get("budgets"):
            budgets = dict(recorded_budgets(meta, directory))
        quantization = budget_quantization(checkpoint, precision, calibration_batches)
        return cls(lambda: checkpoint.load_model(dtype), cfg, budgets, tok, str(directory), quantization=quantization,
                   contiguous=contiguous, cuda_graph=cuda_graph, compiled=compiled)

    def budget_names(self) -> list[str]:
        return list(self.budgets)

    def resolve_budget(self, name: Optional[str]) -> str:
        if name is None:
            return next(iter(self.budgets))  # the largest (budgets are listed largest first)
        if name not in self.budgets:
            if not self.elastic:
                raise ConfigError("--budget", name, f"{self.source} is not an elastic checkpoint (it is one model); omit --budget")
            raise ConfigError("--budget", name, f"is not a budget of {self.source}; allowed: {self.budget_names()}")
        if self.budgets[name].heterogeneous:
            raise ConfigError("--budget", name, "has per-layer widths, which have no uniform model to run; choose a uniform budget")
        return name

    def decoder(self, budget: Optional[str] = None) -> HybridDecoder:
        name = self.resolve_budget(budget)
        if name not in self._decoders:
            widths = self.budgets[name]
            if widths == full_widths(self.cfg):
                model, sub_cfg = self.parent, self.cfg
            else:
                model, sub_cfg, stats = budget_model(self.parent, self.cfg, widths, name=f"{self.cfg.name}_{name}",
                                                     contiguous=self.contiguous)
                self.view_stats[name] = stats
            if self.quantization is not None:  # after any contiguous copy, before a CUDA graph is captured
                from elastic_megatron.quant.hooks import attach

                q = self.quantization
                attach(model, q, q["format"], q["recipe"])
            self._decoders[name] = HybridDecoder(model, sub_cfg, cuda_graph=self.cuda_graph, compiled=self.compiled)
        return self._decoders[name]

    # ---- generation -------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not prompt or not ids:
            raise ConfigError("--prompt", prompt, "must not be empty")
        return ids

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], budget: Optional[str] = None, max_new_tokens: int = 64,
                     sampling: Sampling = Sampling(), stop: Optional[Callable[[int, list[int]], bool]] = None,
                     on_token: Optional[Callable[[int, int], None]] = None) -> tuple[list[list[int]], Phase]:
        """New token ids per prompt (batched, left-padded). A sequence ends at the end-of-
        document token, after max_new_tokens, or when `stop(i, its tokens)` says so."""
        name = self.check(prompts, budget, max_new_tokens, sampling)
        dec = self.decoder(name)
        generator = torch.Generator().manual_seed(sampling.seed)
        begin = time.perf_counter()
        logits, state = dec.prefill(prompts, max_new_tokens)
        prefill_s = time.perf_counter() - begin
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        vocab = self.tokenizer.vocab_size  # rows past it pad the model's vocabulary: never tokens
        begin = time.perf_counter()
        for t in range(max_new_tokens):
            logits[:, vocab:] = float("-inf")
            nxt = sampling.pick(logits, generator)
            for i, token in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if token == self.tokenizer.eod:
                    done[i] = True
                    continue
                out[i].append(token)
                if on_token is not None:
                    on_token(i, token)
                if len(out[i]) >= max_new_tokens or (stop is not None and stop(i, out[i])):
                    done[i] = True
            if all(done) or t == max_new_tokens - 1:
                break
            logits = dec.step(nxt, state)
        phase = Phase(name, sum(len(p) for p in prompts), sum(len(o) for o in out), prefill_s, time.perf_counter() - begin)
        return out, phase

    def check(self, prompts: Sequence[Sequence[int]], budget: Optional[str], max_new_tokens: int, sampling: Sampling) -> str:
        """Every check of a request, before any weight is read; returns the budget's name."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError("--max-new-tokens", max_new_tokens, "must be a positive integer")
        name = self.resolve_budget(budget)
        sampling.check(self.cfg.vocab_size)
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_sequence_length:
            raise ConfigError("--max-new-tokens", max_new_tokens, f"the longest prompt ({longest} tokens) + new tokens must fit "
                              f"model.max_sequence_length={self.cfg.max_sequence_length}")
        return name

    def generate(self, prompts: Sequence[str], budget: Optional[str] = None, max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), on_text: Optional[Callable[[int, str], None]] = None) -> Generation:
        """Text continuations of `prompts`; `on_text(i, piece)` streams each sequence's new text."""
        ids = [self.encode(p) for p in prompts]
        stream = _TextStream(self.tokenizer, on_text) if on_text else None
        new, phase = self.generate_ids(ids, budget, max_new_tokens, sampling, on_token=stream.add if stream else None)
        return Generation([self.tokenizer.decode(t) for t in new], new, [phase])

    def budget_control(self, prompt: str, think_budget: str, answer_budget: str, delimiter: str = "</think>",
                       max_think_tokens: int = 256, max_answer_tokens: int = 128, sampling: Sampling = Sampling(),
                       on_text: Optional[Callable[[int, str], None]] = None) -> Generation:
        """The trace at `think_budget` until `delimiter` (forced after `max_think_tokens`),
        then the answer at `answer_budget` from prompt + trace. texts = [trace, answer]."""
        if not delimiter:
            raise ConfigError("--delimiter", delimiter, "must not be empty")
        prompt_ids = self.encode(prompt)
        delimiter_ids = self.tokenizer.encode(delimiter)
        self.check([prompt_ids], think_budget, max_think_tokens, sampling)
        self.check([prompt_ids + [0] * (max_think_tokens + len(delimiter_ids))], answer_budget, max_answer_tokens, sampling)
        stream = _TextStream(self.tokenizer, on_text) if on_text else None

        trace, think = self.generate_ids([prompt_ids], think_budget, max_think_tokens, sampling,
                                         stop=lambda _, tokens: ends_thinking(self.tokenizer, tokens, delimiter, delimiter_ids),
                                         on_token=stream.add if stream else None)
        trace = trace[0]
        if not self.tokenizer.decode(trace).endswith(delimiter):  # the cap: force the delimiter
            trace = trace + delimiter_ids
            if stream:
                for token in delimiter_ids:
                    stream.add(0, token)
        answer, phase = self.generate_ids([prompt_ids + trace], answer_budget, max_answer_tokens,
                                          Sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed + 1),
                                          on_token=stream.add if stream else None)
        return Generation([self.tokenizer.decode(trace), self.tokenizer.decode(answer[0])], [trace, answer[0]], [think, phase])


class _TextStream:
    """Turns tokens into text pieces as they come (byte tokenizers may split a character)."""

    def __init__(self, tokenizer, on_text: Callable[[int, str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: dict[int, list[int]] = {}
        self.shown: dict[int, int] = {}

    def add(self, i: int, token: int) -> None:
        tokens = self.tokens.setdefault(i, [])
        tokens.append(token)
        text = self.tokenizer.decode(tokens)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        shown = self.shown.get(i, 0)
        if len(text) > shown:
            self.on_text(i, text[shown:])
            self.shown[i] = len(text)


def write_report(generation: Generation, path: str | Path) -> None:
    Path(path).write_text(json.dumps(generation.as_dict(), indent=1))
