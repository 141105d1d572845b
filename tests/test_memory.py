"""The memory estimate (parallel/memory.py) against measurements.

Activation elements per token of each layer type are measured on CPU as what autograd
keeps for backward (SavedActivations: saved tensors and checkpoint inputs, parameters
excluded), for every recompute setting, and compared with `layer_activation_elements`.
The difference of a 4-layer and a 2-layer stack is measured, so the embedding-free
decoder's final norm cancels. Without recompute, the Mamba scan and core attention keep
kernel-specific intermediates: the estimate counts what mamba_ssm's Triton scan keeps,
while the PyTorch scan used on CPU keeps its chunk matrices too (measured: more)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from elastic_megatron.models.hybrid import build_model
from elastic_megatron.models.recompute import SavedActivations, apply_recompute
from elastic_megatron.parallel.memory import layer_activation_elements

from conftest import REPO, preset

SEQ, BATCH = 128, 2
ALL = ("core_attn", "mamba_scan", "moe", "mlp")
SETTINGS = {"none": dict(granularity="none"), "selective": dict(granularity="selective", modules=ALL),
            "full": dict(granularity="full")}


def kept_elements(cfg, layers: int, setting: dict) -> float:
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_recompute(model, **setting)
    x = torch.randn(SEQ, BATCH, cfg.hidden_size, requires_grad=True)
    with SavedActivations(model) as saved:
        model.decoder(hidden_states=x, attention_mask=None)
    return saved.bytes / x.element_size()


@pytest.fixture(scope="module")
def measured(dist):
    base = preset("tiny")
    out = {}
    for t in "M*-E":
        cfgs = {n: dataclasses.replace(base, hybrid_pattern=t * n) for n in (2, 4)}
        for name, setting in SETTINGS.items():
            per_layer = (kept_elements(cfgs[4], 4, setting) - kept_elements(cfgs[2], 2, setting)) / 2
            out[t, name] = per_layer / (SEQ * BATCH)
    return base, out


@pytest.mark.parametrize("layer", list("M*-E"))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_activation_estimate_matches_what_autograd_keeps(layer, setting, measured):
    cfg, got = measured
    estimate = layer_activation_elements(cfg, layer, recompute=SETTINGS[setting]["granularity"], modules=ALL)
    value = got[layer, setting]
    if setting == "none" and layer == "M":
        assert value > estimate  # the PyTorch scan keeps more than the Triton kernel counted
    else:
        assert value == pytest.approx(estimate, rel=0.10), (layer, setting, value, estimate)


def test_recompute_keeps_less_in_the_order_none_selective_full(measured):
    _, got = measured
    for t in "M*-E":
        assert got[t, "full"] < got[t, "selective"] <= got[t, "none"] * 1.001, t


def describe(*args: str) -> dict:
    """tools/describe_model.py memory=true format=json, in this process (Hydra's compose)."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    spec = importlib.util.spec_from_file_location("describe_model", REPO / "tools" / "describe_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with initialize_config_dir(str(REPO / "recipes"), version_base=None):
        cfg = compose("describe_model", ["model=nemotron_nano_v3_30b", "memory=true", "format=json", *args])
    return json.loads(tool.describe(cfg))


def test_the_stage2_layout_fits_an_h100_at_49k_tokens_and_each_lever_counts():
    long = ["nodes=8", "seq_length=49152", "global_batch_size=128"]
    shipped = describe("parallel=nano_h100_cp2", "recompute=full", *long)
    assert shipped["total"] <= 72 * 2**30 and shipped["cp"] == 2 and shipped["dp"] == 16
    plain = describe("parallel=nano_h100", *long)
    assert plain["total"] > 80 * 2**30
    # Context parallelism halves the activations per GPU; recompute cuts them further.
    cp2 = describe("parallel=nano_h100_cp2", *long)
    assert cp2["activations"] == pytest.approx(plain["activations"] / 2, rel=0.02)
    selective = describe("parallel=nano_h100_cp2", "recompute=selective", *long)
    assert shipped["activations"] < selective["activations"] < cp2["activations"]
    # The dense optimizer state is sharded over DP x CP: the same ranks either way.
    assert cp2["optimizer"] == pytest.approx(plain["optimizer"], rel=1e-6)


def test_memory_estimate_follows_the_layout_and_the_recipe_fits_an_h100():
    scale = describe("parallel=nano_h100", "nodes=8")
    assert scale["world"] == 64 and scale["dp"] == 32 and scale["total"] < 0.9 * 80 * 2**30
    # Experts dominate the weights: twice the expert parallelism nearly halves them.
    ep4 = describe("parallel=nano_h100", "nodes=8", "parallel.ep=4")
    assert 1.6 < ep4["weights"] / scale["weights"] < 2.0
    # The student's optimizer state is sharded over data parallelism, the teacher has none.
    more_nodes = describe("parallel=nano_h100", "nodes=16", "global_batch_size=768")
    assert more_nodes["optimizer"] < scale["optimizer"] and more_nodes["teacher"] == scale["teacher"]
    assert scale["teacher"] == scale["weights"] and scale["gradients"] == 2 * scale["weights"]
    single = describe("parallel=single")
    assert single["total"] > 3 * scale["total"]


def test_describe_refuses_bad_memory_settings():
    """Each bad value is named before any estimate; once as a user runs the tool."""
    from elastic_megatron.config.errors import ConfigError

    for args, key in ((["parallel=nano_h100_cp2", "seq_length=49150"], "seq_length"),
                      (["parallel=nano_h100", "parallel.ep=5"], "model.moe_num_experts"),
                      (["parallel=nano_h100", "recompute_modules=[mamba_scan,attention]"], "recompute_modules")):
        with pytest.raises(ConfigError) as err:
            describe(*args)
        assert err.value.key == key
    proc = subprocess.run([sys.executable, "tools/describe_model.py", "model=nemotron_nano_v3_30b", "memory=true",
                           "parallel=nano_h100", "recompute=sometimes"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid config recompute='sometimes': allowed" in proc.stderr, proc.stderr
