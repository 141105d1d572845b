"""Cached decoding of one hybrid model (a parent, a budget's view model, a slice).

    decoder = HybridDecoder(model, cfg)
    logits, state = decoder.prefill(prompts)          # list of token lists, any lengths
    logits = decoder.step(next_tokens, state)         # one token per sequence

Prompts of a batch are left-padded to one length (see models/cache.py for why padding is
invisible to the model). The forward is Megatron's own, with a cache attached to every
attention core and Mamba mixer for its duration (models/cache.py); MoE, MLPs and norms
run per token exactly as in training, with one decode-only shortcut: routed experts that
receive no token are not called (Megatron's SequentialMLP calls all of them; at one token
per sequence most get none, and the empty calls cost more than the two that run).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.sites import layer_sites
from elastic_megatron.models.cache import AttentionCache, MambaCache, Padding
from elastic_megatron.models.forward import unwrap


@dataclass
class DecodeState:
    """The caches of one batch being decoded, and where it stands."""

    caches: dict = field(default_factory=dict)  # module -> its cache
    padding: Padding = field(default_factory=Padding)
    length: int = 0  # positions filled (prompt padding included)
    max_len: int = 0
    batch: int = 0


class HybridDecoder:
    def __init__(self, model, cfg: ModelConfig):
        self.model = unwrap(model)
        self.cfg = cfg
        self.attention, self.mamba, self.experts = [], [], []
        for site in layer_sites(self.model, cfg):
            if site.moe is not None and _skippable(site.moe.experts_module):
                self.experts.append(site.moe.experts_module)
            if site.core_attention is not None:
                if not hasattr(site.core_attention, "decode_cache"):
                    raise ConfigError("model.backend", cfg.backend, "cached decoding runs the local backend's attention; allowed: local")
                self.attention.append(site.core_attention)
            if site.mamba is not None:
                self.mamba.append(site.mamba)
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def new_state(self, batch: int, max_len: int) -> DecodeState:
        if max_len > self.cfg.max_sequence_length:
            raise ConfigError("max_new_tokens", max_len, f"prompt + new tokens must fit model.max_sequence_length={self.cfg.max_sequence_length}")
        state = DecodeState(batch=batch, max_len=max_len)
        for core in self.attention:
            state.caches[core] = AttentionCache.empty(batch, max_len, self.cfg.num_query_groups, self.cfg.head_dim,
                                                      self.dtype, self.device, state.padding)
        for mixer in self.mamba:
            state.caches[mixer] = MambaCache(padding=state.padding)
        return state

    @contextlib.contextmanager
    def _attached(self, state: DecodeState) -> Iterator[None]:
        for module, cache in state.caches.items():
            module.decode_cache = cache
        for experts in self.experts:
            experts.forward = types.MethodType(_forward_busy_experts, experts)
        try:
            yield
        finally:
            for module in state.caches:
                module.decode_cache = None
            for experts in self.experts:
                del experts.forward  # back to the class's method

    def _forward(self, tokens: torch.Tensor, state: DecodeState, pad) -> torch.Tensor:
        """Logits [b, chunk, vocab] of a chunk continuing `state`."""
        b, s = tokens.shape
        if state.length + s > state.max_len:
            raise ValueError(f"decoding past the {state.max_len} positions this state was made for")
        state.padding.pad = pad
        positions = torch.arange(state.length, state.length + s, device=self.device).expand(b, s)
        with self._attached(state):
            logits = self.model(tokens, positions, None)
        state.length += s
        state.padding.pad = None
        return logits.float()

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 0,
                state: DecodeState | None = None, all_logits: bool = False) -> tuple[torch.Tensor, DecodeState]:
        """Run the (left-padded) prompts: (logits of each prompt's last token [b, vocab], or
        of every position [b, longest prompt, vocab] with `all_logits`; the state)."""
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ConfigError("prompt", "", "every prompt needs at least one token")
        width = max(lengths)
        if state is None:
            state = self.new_state(len(prompts), width + max_new_tokens)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        pad = torch.ones(len(prompts), width, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            pad[i, width - len(p):] = False
        logits = self._forward(tokens, state, pad if pad.any() else None)
        return (logits if all_logits else logits[:, -1]), state

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One new token per sequence ([b] ids): logits of the next one [b, vocab]."""
        return self._forward(tokens.reshape(-1, 1).to(self.device), state, None)[:, -1]

    @torch.no_grad()
    def extend(self, tokens: Sequence[Sequence[int]], state: DecodeState) -> torch.Tensor:
        """Several tokens per sequence (same count for all): logits at each of them [b, n, vocab]."""
        ids = torch.as_tensor([list(t) for t in tokens], dtype=torch.long, device=self.device)
        return self._forward(ids, state, None)


def _skippable(experts) -> bool:
    """Megatron's SequentialMLP in the plain configuration the shortcut reproduces."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    c = experts.config
    return (isinstance(experts, SequentialMLP) and experts.num_local_experts > 1 and not c.fp8 and not c.fp4
            and not c.moe_apply_probs_on_input)


def _forward_busy_experts(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
    """SequentialMLP.forward calling only the experts that received tokens (same output)."""
    counts = tokens_per_expert.tolist()
    outputs = []
    for expert, tokens, p, n in zip(self.local_experts, torch.split(hidden, counts), torch.split(probs, counts), counts):
        outputs.append(expert(tokens, p)[0] if n else tokens)  # an idle expert: its empty slice
    return torch.cat(outputs, dim=0), None
