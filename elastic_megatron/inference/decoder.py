"""Cached decoding of one hybrid model (a parent, a budget's view model, a slice).

    decoder = HybridDecoder(model, cfg)
    logits, state = decoder.prefill(prompts, max_new_tokens)   # list of token lists, any lengths
    logits = decoder.step(next_tokens, state)                  # one token per sequence

Prefill runs each prompt through every layer (prompts of one length together): causal
attention within the prompt, the Mamba mixers' own cached conv + chunked scan from a zero
state, norms, MLPs and MoE as rows of tokens (inference/layers.py); the keys, values,
conv inputs and SSM states go into the prompts' slots. Only the last position's logits
are computed (`all_logits`: every position's), so the MLP and MoE layers after the last
layer that keeps state run on the last position alone. Each decode
step runs the layers written for one token per sequence
(inference/layers.py) on the model's own parameters: no MoE dispatcher, no
sequence-parallel regions or autograd functions around linears, no bias-dropout-add, no
re-slicing of weights, caches preallocated for the request's length.

The state: slots (for a server's continuous batching)
------------------------------------------------------
A `DecodeState` (models/cache.py) holds preallocated caches for up to `slots` sequences
of up to `max_len` positions. Sequences come and go between steps:

    state = decoder.new_state(slots=8, max_len=2048)
    slot = state.acquire()                                  # a free slot (RuntimeError if none)
    logits = decoder.prefill([prompt], state=state, slots=[slot])[0]   # [1, vocab]: its first token
    ...
    rows = state.span                                       # one past the highest active slot
    logits = decoder.step(tokens, state)                    # tokens [rows] (any id in free rows),
                                                            # logits [rows, vocab] (free rows: ignore)
    logprobs = token_logprobs(logits, tokens_chosen)        # per-token log-probabilities
    state.release(slot)                                     # done: the slot is free at once

A new request is prefilled into a free slot while others are mid-sequence (slots need not
be at the same position: each has its own length) and joins the next step; a finished
sequence releases its slot at once. Nothing is allocated per step. One state serves one
budget (its caches have that budget's widths); a server keeps one per budget.

CUDA graphs (`cuda_graph=True`, CUDA only): the step runs with static shapes (every slot,
attention over all `max_len` positions under a mask, every routed expert weighted by its
routing weight) and is captured once per state, when the state is made; each step then
copies the tokens in and replays it. `static=True` runs that same static step without a
graph (what the CPU tests check against the full forward).

Compiled (`compiled=True`): the step over every slot of the state goes through
`torch.compile` (inductor: C++ kernels on CPU; `mode="reduce-overhead"`, CUDA graphs, on
CUDA), fusing the hundreds of small per-token operations into a few kernels. Its inputs
are tensors only (tokens, positions, the caches), so a new state of the same shape reuses
the compiled code: one compile per budget and slot count, on the first step (a server
warms up every budget at start). On CPU the attention window is a dynamic size (the
longest sequence + 1, like the eager step) and so is `max_len`; on CUDA the window is
all `max_len` positions, as for the captured graph. On CUDA the MoE layers weight every
expert (no host sync, as the captured graph); on CPU only the routed experts run, as one
opaque operator in the graph (inference/layers.py `routed_experts`), since every expert on
every row would multiply the expert FLOPs by experts / top-k. The eager step stays the
reference: tests/test_inference.py holds the compiled step to its greedy tokens on every
budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch._dynamo import config as dynamo_config
from torch._dynamo import mark_dynamic

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from elastic_megatron.elastic.sites import layer_sites
from elastic_megatron.inference.layers import (
    HAVE_SELECTIVE_STATE_UPDATE, AttentionStep, Linear, MambaStep, MlpStep, MoEStep, Norm, PrefillCaches,
    check_moe_supported, is_wrapped,
)
from elastic_megatron.models.cache import CacheShapes, DecodeState
from elastic_megatron.models.forward import output_layer, unwrap

__all__ = ["HybridDecoder", "DecodeState", "token_logprobs"]

# The compiled step's code object serves every decoder (budget) and slot count: room for
# that many compiled graphs (the limits' names before torch 2.7: cache_size_limit,
# accumulated_cache_size_limit).
_RECOMPILE_LIMITS = ({"recompile_limit": 64, "accumulated_recompile_limit": 512} if hasattr(dynamo_config, "recompile_limit")
                     else {"cache_size_limit": 64, "accumulated_cache_size_limit": 512})


@dataclass
class StepContext:
    """Where the rows of one decode step stand (read by the attention and MoE steps)."""

    static: bool = False  # MoE: every expert on every row, weighted (no host sync)
    compiled: bool = False  # MoE: data-dependent expert calls leave the compiled graph
    same_position: Optional[int] = None  # every row at this position (eager): no mask, slice writes
    rows: Optional[torch.Tensor] = None  # [n] row ids, for writes at per-row positions
    positions: Optional[torch.Tensor] = None  # [n] each row's position
    width: int = 0  # positions attended to
    mask: Optional[torch.Tensor] = None  # [n, 1, 1, width] bool, True = attend


@dataclass
class StepCaches:
    """The caches a step reads and writes (a DecodeState's, as plain tensors: what the
    compiled step takes as inputs, so that it does not depend on the state object)."""

    keys: list
    values: list
    conv: list
    ssm: list


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) of each row of `logits` [n, vocab] for `tokens` [n] (fp32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens.reshape(-1, 1).to(logits.device)).squeeze(1)


class HybridDecoder:
    def __init__(self, model, cfg: ModelConfig, static: bool = False, cuda_graph: bool = False, compiled: bool = False):
        self.model = unwrap(model)
        self.cfg = cfg
        config = self.model.config
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cuda_graph = cuda_graph
        self.static = static or cuda_graph
        if compiled and (static or cuda_graph):
            raise ConfigError("--compile", True, "is a step of its own; not with --cuda-graph or static=True")
        self.compiled = compiled
        if cfg.backend != "local":  # TE fuses the norms into its linears: other modules, other parameters
            raise ConfigError("model.backend", cfg.backend, "cached decoding runs the local backend's modules; allowed: local")
        if cuda_graph and self.device.type != "cuda":
            raise ConfigError("--cuda-graph", True, f"CUDA graphs need a model on a CUDA device; this one is on {self.device}")
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                    "context_parallel_size"):
            if getattr(config, key, 1) != 1:
                raise ConfigError("parallel", f"{key}={getattr(config, key)}", "cached decoding runs on one rank (all sizes 1)")
        if getattr(config, "fp32_residual_connection", False) or getattr(config, "gated_linear_unit", False):
            raise NotImplementedError("cached decoding: fp32_residual_connection / gated_linear_unit are not reproduced")
        act = config.activation_func
        sites = layer_sites(self.model, cfg)
        if any(site.symbol == MOE for site in sites):
            check_moe_supported(config)
        self.layers = []
        for site, layer in zip(sites, self.model.decoder.layers):
            if site.symbol == MAMBA:
                self.layers.append(MambaStep(layer, sum(isinstance(s, MambaStep) for s in self.layers)))
            elif site.symbol == ATTENTION:
                self.layers.append(AttentionStep(layer, sum(isinstance(s, AttentionStep) for s in self.layers)))
            elif site.symbol == MLP:
                self.layers.append(MlpStep(layer, act))
            elif site.symbol == MOE:
                self.layers.append(MoEStep(layer, act))
        self.last_stateful = max((i for i, s in enumerate(self.layers) if isinstance(s, (AttentionStep, MambaStep))), default=-1)
        self.shapes = CacheShapes(tuple(s.cache_shape() for s in self.layers if isinstance(s, AttentionStep)),
                                  tuple(s.cache_shape() for s in self.layers if isinstance(s, MambaStep)))
        self.embedding = self.model.embedding.word_embeddings.weight
        self.final_norm = Norm(self.model.decoder.final_norm)
        self.output = Linear(output_layer(self.model))
        self._fast = {id(m) for step in self.layers for m in step.linears()} | {id(self.output.module)}
        self._states: list[DecodeState] = []  # kept for reuse when states carry a captured graph
        self._check_hooks()
        self._compiled_step = None
        if compiled:
            self._compile()

    # ---- states -----------------------------------------------------------------------------

    def new_state(self, slots: int, max_len: int) -> DecodeState:
        """Preallocated caches for `slots` sequences of up to `max_len` positions (with the
        decode step captured in a CUDA graph when this decoder uses one)."""
        if max_len > self.cfg.max_sequence_length:
            raise ConfigError("max_new_tokens", max_len, f"prompt + new tokens must fit model.max_sequence_length={self.cfg.max_sequence_length}")
        state = DecodeState(self.shapes, slots, max_len, self.dtype, self.device)
        if self.cuda_graph:
            self._capture(state)
        if self.compiled and self.device.type != "cuda":
            for cache in state.keys + state.values:  # any max_len: one compile per budget and slot count
                mark_dynamic(cache, 2)
        return state

    def _request_state(self, batch: int, max_len: int) -> DecodeState:
        """A state for one request: new, or (with CUDA graphs, whose capture is worth
        keeping, or compiled, whose CUDA graphs are recorded per state's shapes) a kept
        one of the same batch that is long enough, emptied."""
        if not (self.cuda_graph or self.compiled):
            return self.new_state(batch, max_len)
        for state in self._states:
            if state.slots == batch and state.max_len >= max_len:
                for slot in range(state.slots):
                    if state.active[slot]:
                        state.release(slot)
                return state
        bucket = min(self.cfg.max_sequence_length, -(-max_len // 256) * 256)
        state = self.new_state(batch, bucket)
        self._states.append(state)
        return state

    # ---- prefill ----------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 0, state: DecodeState | None = None,
                slots: Optional[Sequence[int]] = None, all_logits: bool = False) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompts into their slots: (logits of each prompt's last token [b, vocab],
        or of every position [b, longest prompt, vocab] with `all_logits`, right-aligned
        (a shorter prompt's rows start later; the rows before are 0); the state).

        Without `state`, a state for these prompts + `max_new_tokens` is made and the
        prompts take slots 0 .. b - 1; with one, `slots` (acquired, one per prompt) say
        where they go (default: newly acquired slots)."""
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ConfigError("prompt", "", "every prompt needs at least one token")
        if state is None:
            state = self._request_state(len(prompts), max(lengths) + max_new_tokens)
        if slots is None:
            slots = [state.acquire() for _ in prompts]
        if len(slots) != len(prompts) or any(not 0 <= s < state.slots or not state.active[s] for s in slots):
            raise ValueError(f"prefill: {len(prompts)} prompts need as many acquired slots of the state, got {list(slots)}")
        if max(lengths) + max_new_tokens > state.max_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens + {max_new_tokens} new ones does not fit the "
                             f"{state.max_len} positions of this decode state")
        self._check_hooks()
        self.refresh()
        width = max(lengths)
        out = torch.zeros(len(prompts), *((width,) if all_logits else ()), self.cfg.vocab_size, device=self.device)
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_length.setdefault(n, []).append(i)
        for n, group in by_length.items():
            tokens = torch.tensor([list(prompts[i]) for i in group], dtype=torch.long, device=self.device)
            hidden = self._prefill_group(tokens, state, [slots[i] for i in group], all_logits)  # [n or 1, b, hidden]
            logits = self.output(hidden if all_logits else hidden[-1]).float()
            index = torch.tensor(group, device=self.device)
            if all_logits:
                out[index, width - n:] = logits.transpose(0, 1)
            else:
                out[index] = logits
        return out, state

    def _prefill_group(self, tokens: torch.Tensor, state: DecodeState, slots: list[int], every_position: bool) -> torch.Tensor:
        """Prompts of one length through every layer's prefill; their caches go into
        `slots`. Returns the final-norm hidden states [length, b, hidden], or of the last
        position only [1, b, hidden] unless `every_position`: the layers after the last one
        that keeps state (MLP, MoE) then run on that position alone."""
        n = tokens.shape[1]
        caches = PrefillCaches(len(self.shapes.attention), len(self.shapes.mamba))
        h = F.embedding(tokens.t(), self.embedding)  # [length, b, hidden], Megatron's layout
        for i, layer in enumerate(self.layers):
            if i == self.last_stateful + 1 and not every_position:
                h = h[-1:]
            h = layer.prefill(h, caches)
        state.store(slots, n, caches.keys, caches.values, caches.conv, caches.ssm)
        return self.final_norm(h)

    def refresh(self) -> None:
        """Recompute what the steps derive from parameters (after the weights changed)."""
        for step in self.layers:
            if isinstance(step, MambaStep):
                step.refresh()

    def _check_hooks(self) -> None:
        """The decode step calls only linears through their modules; any other module
        with hooks or a replaced forward (elastic masks, say) would be bypassed."""
        for name, module in self.model.named_modules():
            if id(module) not in self._fast and is_wrapped(module):
                raise RuntimeError(f"cached decoding: module {name or '(model)'} ({type(module).__name__}) has forward hooks or "
                                   "a replaced forward, which the decode step does not run (for a budget, decode its view "
                                   "model from inference/budgets.py instead of a masked parent)")

    # ---- decode -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One new token for each row 0 .. state.span - 1 ([rows] ids; rows of free slots are
        ignored): logits of the next token [rows, vocab]."""
        tokens = tokens.reshape(-1).to(self.device)
        n = state.span
        if n == 0:
            raise ValueError("decode step: no slot of the state holds a sequence (prefill one first)")
        if tokens.numel() != n:
            raise ValueError(f"decode step: one token per row 0 .. {n - 1} of the state ({n}), got {tokens.numel()}")
        if any(length >= state.max_len for length, on in zip(state.lengths[:n], state.active[:n]) if on):
            raise ValueError(f"decoding past the {state.max_len} positions this state was made for")
        if state.graph is not None:
            graph, token_buffer, logits = state.graph
            token_buffer[:n].copy_(tokens)
            graph.replay()
            state.advance(n)
            return logits[:n].clone()  # the graph's output buffer is rewritten by the next replay
        if self.static or self.compiled:
            token_buffer = torch.zeros(state.slots, dtype=torch.long, device=self.device)
            token_buffer[:n] = tokens
            step = self._run_compiled if self.compiled else self._static_step
            logits = step(token_buffer, state)[:n]
        else:
            logits = self._run(tokens, state, self._eager_context(state, n))
        state.advance(n)
        return logits

    def _eager_context(self, state: DecodeState, n: int) -> StepContext:
        lengths = state.lengths[:n]
        if all(state.active[:n]) and len(set(lengths)) == 1:
            return StepContext(same_position=lengths[0])
        width = max(lengths) + 1
        positions = state.positions[:n]
        mask = (state.arange[None, :width] <= positions[:, None]).view(n, 1, 1, width)
        return StepContext(rows=state.rows[:n], positions=positions, width=width, mask=mask)

    def _static_step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The step over every slot with static shapes and no host sync (graph-capturable)."""
        positions = state.positions
        mask = (state.arange[None, :] <= positions[:, None]).view(state.slots, 1, 1, state.max_len)
        context = StepContext(static=True, rows=state.rows, positions=positions, width=state.max_len, mask=mask)
        return self._run(tokens, state, context)

    # ---- the compiled step --------------------------------------------------------------------

    def _compile(self) -> None:
        """torch.compile of the step over every slot (`_compiled_body`); nothing is traced
        until the first step. The Mamba kernel choice is fixed here, outside the graph."""
        probe = torch.empty(0, device=self.device)
        for layer in self.layers:
            if isinstance(layer, MambaStep):
                layer.use_triton = HAVE_SELECTIVE_STATE_UPDATE and layer.mixer.use_triton(probe)
        cuda = self.device.type == "cuda"
        # One graph or an error: a graph break inside the loop over layers would leave dynamo
        # compiling each layer's call on its own, recompiled for every layer object.
        self._compiled_step = torch.compile(self._compiled_body, dynamic=False, fullgraph=True,
                                            mode="reduce-overhead" if cuda else None)

    def _run_compiled(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        if self.device.type == "cuda":
            window = state.arange  # static: one CUDA graph per state shape
        else:  # the filled positions only (a dynamic size), as the eager step attends
            window = state.arange[:max(state.lengths) + 1]
            mark_dynamic(window, 0)
        # Every expert on every row (no host sync, what a CUDA graph needs) multiplies the
        # expert FLOPs by experts / top-k: on a CPU, where a batch's linears are compute
        # bound, only the routed experts run (an opaque operator in the graph).
        dense_moe = self.device.type == "cuda"
        caches = (state.keys, state.values, state.conv, state.ssm)
        # The package turns dynamo off on CPU (models/compat.py: Megatron's jit_fuser); on
        # only here. The limit: one compiled graph per budget and slot count, kept (one code
        # object serves every decoder's step).
        with dynamo_config.patch(disable=False, **_RECOMPILE_LIMITS):
            logits = self._compiled_step(tokens, state.positions, state.live, window, caches, dense_moe)
        return logits.clone() if self.device.type == "cuda" else logits  # CUDA graphs' outputs are overwritten

    def _compiled_body(self, tokens, positions, live, window, caches, dense_moe: bool) -> torch.Tensor:
        n = tokens.shape[0]
        mask = (window[None, :] <= positions[:, None]).view(n, 1, 1, window.shape[0])
        context = StepContext(static=dense_moe, compiled=True, rows=torch.arange(n, device=tokens.device),
                              positions=positions, width=window.shape[0], mask=mask)
        h = F.embedding(tokens, self.embedding)
        state = StepCaches(*caches)
        for layer in self.layers:
            h = layer(h, state, context)
        positions.add_(live)
        return self.output(self.final_norm(h)).float()

    def _run(self, tokens: torch.Tensor, state: DecodeState, context: StepContext) -> torch.Tensor:
        n = tokens.shape[0]
        h = F.embedding(tokens, self.embedding)
        for layer in self.layers:
            h = layer(h, state, context)
        state.positions[:n].add_(state.live[:n])
        return self.output(self.final_norm(h)).float()

    def _capture(self, state: DecodeState) -> None:
        """Capture the static step of `state` in a CUDA graph. Done when the state is made:
        the warm-up runs only write what a prefill overwrites (no slot is active yet)."""
        tokens = torch.zeros(state.slots, dtype=torch.long, device=self.device)
        with torch.no_grad():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._static_step(tokens, state)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._static_step(tokens, state)
        state.graph = (graph, tokens, logits)
