"""The analytic counter equals the instantiated models exactly: names, shapes, totals,
active parameters; and the describe_model tool reports it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from elastic_megatron.models.counter import model_size, parameter_inventory, tensor_bytes
from elastic_megatron.models.hybrid import build_model

from conftest import REPO, preset, small_config

CONFIGS = {
    "tiny": lambda: preset("tiny"),
    "mamba_only": lambda: small_config("MM"),
    "gqa_explicit_head_dim": lambda: small_config("*", num_attention_heads=8, num_query_groups=2, kv_channels=24),
    "moe_shared_expert": lambda: small_config("EE", moe_num_experts=6, moe_router_topk=3, moe_shared_expert_ffn_hidden_size=48),
    "moe_no_shared_expert": lambda: small_config("E", moe_shared_expert_ffn_hidden_size=0),
    "dense_mlp": lambda: small_config("-*-", ffn_hidden_size=96),
    "every_type_mixed": lambda: small_config("ME*-EM", mamba_num_heads=6, mamba_num_groups=3, mamba_state_dim=8),
}


def active_from_modules(model, topk: int) -> int:
    """Active parameters read off the built modules: all of them, minus routed experts
    beyond the top-k of each MoE layer (every expert of a layer has the same size)."""
    total = sum(p.numel() for p in model.parameters())
    for layer in model.decoder.layers:
        experts = getattr(getattr(getattr(layer, "mlp", None), "experts", None), "local_experts", None)
        if experts is not None:
            sizes = [sum(p.numel() for p in e.parameters()) for e in experts]
            assert len(set(sizes)) == 1
            total -= sizes[0] * (len(experts) - topk)
    return total


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counter_equals_instantiated_model(dist, name):
    cfg = CONFIGS[name]()
    model = build_model(cfg)
    built = {n: tuple(p.shape) for n, p in model.named_parameters()}
    analytic = {e.name: e.shape for e in parameter_inventory(cfg)}
    assert analytic == built
    size = model_size(cfg)
    assert size.total_params == sum(p.numel() for p in model.parameters())
    assert size.active_params == active_from_modules(model, cfg.moe_router_topk)


def test_active_excludes_only_unrouted_experts():
    cfg = small_config("E", moe_num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, hidden_size=64)
    size = model_size(cfg)
    per_expert = 2 * 32 * 64
    assert size.total_params - size.active_params == (8 - 2) * per_expert


def test_precision_bytes():
    cfg = small_config("-", hidden_size=64, ffn_hidden_size=128)
    inv = {e.name: e for e in parameter_inventory(cfg)}
    fc1 = inv["decoder.layers.0.mlp.linear_fc1.weight"]  # [128, 64], quantised
    emb = inv["embedding.word_embeddings.weight"]  # kept in bf16
    assert tensor_bytes(fc1, "bf16") == 2 * 128 * 64
    assert tensor_bytes(fc1, "fp8") == 128 * 64 + 8
    assert tensor_bytes(fc1, "nvfp4") == 128 * 64 // 2 + 128 * (64 // 16) + 8
    for p in ("fp8", "nvfp4"):
        assert tensor_bytes(emb, p) == tensor_bytes(emb, "bf16")
    size = model_size(cfg)
    assert size.total_bytes["bf16"] == 2 * size.total_params
    assert size.total_bytes["nvfp4"] < size.total_bytes["fp8"] < size.total_bytes["bf16"]


def describe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "describe_model.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_describe_model_nemotron_nano_matches_published_size():
    out = describe("model=nemotron_nano_v3_30b", "format=json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    # Published: ~31.6B total, ~3.6B active (including embeddings).
    assert abs(report["total_params"] - 31.6e9) < 0.1e9
    assert abs(report["active_params"] - 3.6e9) < 0.1e9
    assert report["total_params"] == model_size(preset("nemotron_nano_v3_30b")).total_params
    table = describe("model=nemotron_nano_v3_30b")
    assert table.returncode == 0, table.stderr
    assert f"{report['total_params']:,}" in table.stdout and "nvfp4" in table.stdout


def test_describe_model_rejects_bad_override():
    out = describe("model=tiny", "model.moe_router_topk=9")
    assert out.returncode != 0
    assert "model.moe_router_topk=9" in out.stderr and "moe_num_experts=8" in out.stderr
    out = describe("model=tiny", "format=xml")
    assert out.returncode != 0 and "format" in out.stderr and "json" in out.stderr
