"""Bad model configs fail with an error that names the field, the value and what is
allowed, before any module or tensor is created."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import model_config_from_dict
from elastic_megatron.config.parallel import validate_parallel_layout
from elastic_megatron.models.hybrid import build_model

from conftest import preset

BAD = [
    # (overrides, key named in the error, words of the allowed values)
    ({"hybrid_pattern": "M*X-E"}, "model.hybrid_pattern", ["'X'", "'M'", "'*'", "'-'", "'E'"]),
    ({"hybrid_pattern": ""}, "model.hybrid_pattern", ["at least one"]),
    ({"num_attention_heads": 6, "num_query_groups": 4}, "model.num_attention_heads", ["divisible by model.num_query_groups=4"]),
    ({"hidden_size": 66}, "model.hidden_size", ["divisible by model.num_attention_heads=4"]),
    ({"moe_router_topk": 9}, "model.moe_router_topk", ["model.moe_num_experts=8"]),
    ({"mamba_num_heads": 6, "mamba_num_groups": 4}, "model.mamba_num_heads", ["divisible by model.mamba_num_groups=4"]),
    ({"backend": "cuda"}, "model.backend", ["local", "te"]),
    ({"init": "random"}, "model.init", ["layout_independent", "megatron"]),
    ({"hidden_size": 0}, "model.hidden_size", ["positive integer"]),
    ({"activation": "swish"}, "model.activation", ["squared_relu"]),
    ({"moe_router_score_function": "softmax"}, "model.moe_router_enable_expert_bias", ["sigmoid"]),
    ({"hiden_size": 64}, "model.hiden_size", ["unknown key", "hidden_size"]),
]


@pytest.mark.parametrize("overrides,key,allowed", BAD, ids=[b[1] + ":" + str(b[0]) for b in BAD])
def test_bad_config_names_key_and_allowed_values(overrides, key, allowed):
    values = dataclasses.asdict(preset("tiny"))
    values.update(overrides)
    with pytest.raises(ConfigError) as err:
        model_config_from_dict(values)
    assert err.value.key == key
    for word in allowed:
        assert word in str(err.value)


def test_unused_layer_types_are_not_checked():
    """A pure-Mamba pattern ignores attention and MoE widths."""
    values = dataclasses.asdict(preset("tiny"))
    values.update(hybrid_pattern="MM", moe_router_topk=99, num_attention_heads=3)
    assert model_config_from_dict(values).num_layers == 2


@pytest.fixture
def created_modules(monkeypatch) -> list[str]:
    """Names of the torch modules constructed while the test runs."""
    created = []
    original = torch.nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        created.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting_init)
    return created


def test_build_model_validates_before_creating_any_module(dist, created_modules):
    bad = dataclasses.replace(preset("tiny"), moe_router_topk=20)
    with pytest.raises(ConfigError, match="moe_router_topk"):
        build_model(bad)
    assert created_modules == []


@pytest.mark.parametrize(
    "tp,ep,key",
    [(3, 1, "model.num_attention_heads"), (4, 1, "model.num_query_groups"), (1, 3, "model.moe_num_experts")],
)
def test_parallel_layout_checks(tp, ep, key, created_modules):
    from elastic_megatron.config.parallel import ParallelConfig

    layout = ParallelConfig(tp=tp, ep=ep, sequence_parallel=tp > 1)
    with pytest.raises(ConfigError) as err:
        validate_parallel_layout(preset("tiny"), layout)
    assert err.value.key == key
    # build_model refuses the layout before any module exists.
    with pytest.raises(ConfigError, match=key):
        build_model(preset("tiny"), parallel=layout)
    assert created_modules == []
