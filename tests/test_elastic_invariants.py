"""DESIGN.md invariants 2-5: the full budget is the parent, masked = sliced for every
budget (fp32, <= 1e-5), nesting on every axis, counter = numel of sliced models."""

from __future__ import annotations

import pytest
import torch

from conftest import preset, small_config, token_batch
from elastic_helpers import logits, masked_logits, randomised_model, sliced_model

from elastic_megatron.elastic.masks import ElasticHooks, ElasticMasks, hard_masks
from elastic_megatron.elastic.widths import AXES, Widths, full_widths, model_cost, sub_model_config
from elastic_megatron.models.counter import model_size

# Budgets of the tiny preset that shrink every axis, alone and together.
TINY_FULL = Widths(hidden=64, attn_heads=4, mamba_heads=8, mamba_head_dim=16, ffn=128, moe_ffn=64, moe_experts=8, shared_ffn=64)
TINY_BUDGETS = [
    TINY_FULL.replace(hidden=40),
    TINY_FULL.replace(attn_heads=2),
    TINY_FULL.replace(mamba_heads=4),
    TINY_FULL.replace(mamba_head_dim=8),
    TINY_FULL.replace(ffn=48),
    TINY_FULL.replace(moe_ffn=24),
    TINY_FULL.replace(moe_experts=3),
    TINY_FULL.replace(shared_ffn=16),
    Widths(hidden=48, attn_heads=2, mamba_heads=6, mamba_head_dim=12, ffn=96, moe_ffn=40, moe_experts=4, shared_ffn=32),
    Widths(hidden=32, attn_heads=2, mamba_heads=2, mamba_head_dim=4, ffn=16, moe_ffn=8, moe_experts=2, shared_ffn=8),
]


@pytest.fixture(scope="module")
def tiny_parent(dist):
    cfg = preset("tiny")
    return cfg, randomised_model(cfg)


def test_full_budget_is_the_parent(tiny_parent):
    cfg, model = tiny_parent
    ids, pos = token_batch(cfg.vocab_size)
    reference = logits(model, ids, pos)
    hooks = ElasticHooks(model, cfg)
    try:
        hooks.set(hard_masks(cfg, full_widths(cfg)))
        assert logits(model, ids, pos).equal(reference)
        # Masks that are all ones on every axis also give the parent (up to fp32 rounding
        # of the explicit normalisation).
        ones = ElasticMasks(**{a: torch.ones(getattr(full_widths(cfg), a)) for a in AXES})
        hooks.set(ones)
        assert (logits(model, ids, pos) - reference).abs().max() <= 1e-5
    finally:
        hooks.remove()


@pytest.mark.parametrize("w", TINY_BUDGETS, ids=lambda w: "-".join(f"{getattr(w, a)}" for a in AXES))
def test_masked_equals_sliced(tiny_parent, w):
    cfg, model = tiny_parent
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=40)
    sub, sub_cfg = sliced_model(model, cfg, w)
    expected = logits(sub, ids, pos)
    got = masked_logits(model, cfg, w, ids, pos)
    full = logits(model, ids, pos)
    assert (got - expected).abs().max().item() <= 1e-5
    # The budget really is a different model.
    assert (full - expected).abs().max().item() > 1e-3
    # Invariant 5 on the sliced model: counter == numel, total and active.
    size = model_size(sub_cfg)
    assert sum(p.numel() for p in sub.parameters()) == size.total_params == model_cost(cfg, w, "total_params")
    assert model_cost(cfg, w, "active_params") == size.active_params


def test_masked_equals_sliced_with_softmax_router_and_dense_pattern(dist):
    cfg = small_config("M-*E", moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                       moe_shared_expert_ffn_hidden_size=0)
    model = randomised_model(cfg, seed=3)
    w = full_widths(cfg).replace(hidden=48, ffn=64, moe_experts=5, attn_heads=2)
    ids, pos = token_batch(cfg.vocab_size, seq=32)
    sub, _ = sliced_model(model, cfg, w)
    hooks = ElasticHooks(model, cfg)
    hooks.set(hard_masks(cfg, w))
    try:
        assert (logits(model, ids, pos) - logits(sub, ids, pos)).abs().max().item() <= 1e-5
    finally:
        hooks.remove()


def test_nesting_on_every_axis():
    """A smaller budget's active set is a prefix of a larger one's, on every axis."""
    cfg = preset("tiny")
    big, small = TINY_BUDGETS[-2], TINY_BUDGETS[-1]
    mb, ms = hard_masks(cfg, big), hard_masks(cfg, small)
    for axis in AXES:
        a, b = getattr(ms, axis), getattr(mb, axis)
        if b is None:
            continue
        assert a is not None
        assert bool((a <= b).all()), axis  # every channel active in the small one is active in the big one
        assert a.sum() == getattr(small, axis) and b.sum() == getattr(big, axis), axis


@pytest.mark.parametrize("name", ["tiny", "small", "nemotron_nano_v3_30b"])
def test_closed_form_cost_equals_counter(name):
    cfg = preset(name)
    full = full_widths(cfg)
    half = Widths(**{a: max(getattr(full, a) // 2, 1) for a in AXES}).replace(
        attn_heads=cfg.num_query_groups, mamba_heads=cfg.mamba_num_groups * 2, moe_experts=max(cfg.moe_router_topk, 2))
    for w in (full, half):
        size = model_size(sub_model_config(cfg, w))
        assert model_cost(cfg, w, "total_params") == size.total_params
        assert model_cost(cfg, w, "active_params") == size.active_params
        assert model_cost(cfg, w, "memory_bytes") == size.total_bytes["bf16"]


def test_per_layer_widths_cost_and_masks(tiny_parent):
    """Heterogeneous widths: the cost is per layer, and each layer's mask is its own."""
    cfg, model = tiny_parent
    full = full_widths(cfg)
    # Two Mamba layers: their costs add up layer by layer.
    mixed = full.replace(mamba_heads=(8, 4))
    assert model_cost(cfg, mixed) * 2 == model_cost(cfg, full) + model_cost(cfg, full.replace(mamba_heads=4))
    assert mixed.heterogeneous and not full.heterogeneous
    with pytest.raises(Exception, match="per-layer widths"):
        sub_model_config(cfg, mixed)

    ids, pos = token_batch(cfg.vocab_size)
    outputs = {}
    handles = [model.decoder.layers[i].register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0].detach().clone()))
               for i in (0, 3)]
    hooks = ElasticHooks(model, cfg)
    try:
        hooks.set(hard_masks(cfg, full.replace(mamba_heads=4, moe_experts=4)))
        uniform = logits(model, ids, pos)
        hooks.set(hard_masks(cfg, full.replace(mamba_heads=(4, 4), moe_experts=(4, 4))))
        assert logits(model, ids, pos).equal(uniform)  # the same widths on every layer = the uniform model
        hooks.set(None)
        logits(model, ids, pos)
        parent_layer0, parent_layer3 = outputs[0], outputs[3]
        hooks.set(hard_masks(cfg, full.replace(mamba_heads=(8, 4))))
        logits(model, ids, pos)
        assert outputs[0].equal(parent_layer0)  # layer 0 keeps all its heads
        assert (outputs[3] - parent_layer3).abs().max() > 1e-4  # layer 3 lost half of its heads
    finally:
        hooks.remove()
        for h in handles:
            h.remove()
