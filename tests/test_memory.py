"""The memory estimate (parallel/memory.py) against measurements.

Activation elements per token of each layer type are measured on CPU as what autograd
keeps for backward (SavedActivations: saved tensors and checkpoint inputs, parameters
excluded), for every recompute setting, in fp32 and in bf16 (the norms' fp32 working
copies count twice in bf16), and compared with `layer_activation_elements` within 1%.
The difference of a 4-layer and a 2-layer stack is measured, so the embedding-free
decoder's final norm cancels. The Mamba scan runs as a stand-in with the save list of
mamba_ssm's Triton kernel (`MambaChunkScanCombinedFn.forward` in
mamba_ssm/ops/triton/ssd_combined.py saves its output, x, dt, dA_cumsum, A, B, C, D, z,
dt_bias, initial_states, seq_idx), which is what the estimate counts for GPUs; the
pure-PyTorch scan used on CPU keeps its chunk matrices too (measured: more).

The per-GPU figures for Nemotron 3 Nano (describe_model memory=true) are estimates: the
tests check that they are the sum of the parts (the counter's parameters, the measured
per-layer activations) and how each layout lever moves them; no GPU is measured."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

import elastic_megatron.models.mamba_mixer as mamba_mixer
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.models.recompute import SavedActivations, apply_recompute
from elastic_megatron.models.ssd import ssd_chunk_scan
from elastic_megatron.parallel.memory import layer_activation_elements

from conftest import REPO, preset

SEQ, BATCH = 128, 2
ALL = ("core_attn", "mamba_scan", "moe", "mlp")
SETTINGS = {"none": dict(granularity="none"), "selective": dict(granularity="selective", modules=ALL),
            "full": dict(granularity="full")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class TritonScanSaves(torch.autograd.Function):
    """The SSD scan, keeping for backward exactly what mamba_ssm's Triton kernel keeps
    (z, initial_states and seq_idx are None here): its output, x, dt, the fp32
    cumulative decay dA_cumsum [batch, heads, chunks, chunk], A, B, C, D and dt_bias.
    Forward only (the measurement never runs backward)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit):
        out = ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
        batch, seqlen, heads, _ = x.shape
        dA_cumsum = torch.empty(batch, heads, math.ceil(seqlen / chunk_size), chunk_size, dtype=torch.float32)
        ctx.save_for_backward(out, x, dt, dA_cumsum, A, B, C, D, dt_bias)
        return out


def triton_scan_saves(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                      dt_limit=(0.0, float("inf"))):
    assert z is None  # the mixer gates in its own norm
    return TritonScanSaves.apply(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit)


def kept_elements(cfg, setting: dict, dtype=torch.float32) -> float:
    """What autograd keeps for backward in a decoder forward, in elements of `dtype`."""
    torch.manual_seed(0)
    model = build_model(cfg, params_dtype=dtype)
    apply_recompute(model, **setting)
    x = torch.randn(SEQ, BATCH, cfg.hidden_size, dtype=dtype, requires_grad=True)
    with SavedActivations(model) as saved:
        model.decoder(hidden_states=x, attention_mask=None)
    return saved.bytes / x.element_size()


def per_layer(base, layer: str, setting: dict, dtype) -> float:
    """Elements per token one layer of type `layer` keeps (4 layers minus 2)."""
    cfgs = {n: dataclasses.replace(base, hybrid_pattern=layer * n) for n in (2, 4)}
    return (kept_elements(cfgs[4], setting, dtype) - kept_elements(cfgs[2], setting, dtype)) / 2 / (SEQ * BATCH)


@pytest.fixture(scope="module")
def measured(dist):
    base = preset("tiny")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mamba_mixer, "ssd_chunk_scan", triton_scan_saves)
        for t in "M*-E":
            for name, setting in SETTINGS.items():
                for d, dtype in DTYPES.items():
                    out[t, name, d] = per_layer(base, t, setting, dtype)
    # The scan as it runs on CPU (pure PyTorch), for the record.
    out["M", "none", "fp32 pytorch scan"] = per_layer(base, "M", SETTINGS["none"], torch.float32)
    return base, out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layer", list("M*-E"))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_activation_estimate_matches_what_autograd_keeps_within_1_percent(layer, setting, dtype, measured):
    cfg, got = measured
    estimate = layer_activation_elements(cfg, layer, recompute=SETTINGS[setting]["granularity"], modules=ALL,
                                         activation_bytes=DTYPES[dtype].itemsize)
    value = got[layer, setting, dtype]
    assert value == pytest.approx(estimate, rel=0.01), (layer, setting, dtype, value, estimate)


def test_the_pytorch_scan_on_cpu_keeps_more_than_the_triton_kernel(measured):
    _, got = measured
    assert got["M", "none", "fp32 pytorch scan"] > 1.5 * got["M", "none", "fp32"]


def test_recompute_keeps_less_in_the_order_none_selective_full(measured):
    _, got = measured
    for t in "M*-E":
        for d in DTYPES:
            assert got[t, "full", d] < got[t, "selective", d] <= got[t, "none", d] * 1.001, (t, d)


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


def test_the_stage2_layout_is_estimated_under_72_gib_at_49k_tokens_and_each_lever_counts():
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


def test_memory_estimate_follows_the_layout_and_puts_the_recipe_under_90_percent_of_an_h100():
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


@pytest.mark.parametrize("layout, recompute", [("nano_h100", "none"), ("nano_h100_cp2", "full")])
def test_the_estimate_is_the_sum_of_the_counted_parameters_and_the_measured_layers(layout, recompute):
    """Each term from its source: parameters from the analytic counter (held equal to the
    built models in test_counter.py) split as the layout splits them (norms and routers
    whole on every TP rank), activations as the
    stack's layer count times the per-layer count measured above."""
    from elastic_megatron.models.counter import model_size

    seq, nodes, gbs = 49152, 8, 128
    got = describe(f"parallel={layout}", f"recompute={recompute}", f"nodes={nodes}", f"seq_length={seq}",
                   f"global_batch_size={gbs}")
    cfg = preset("nemotron_nano_v3_30b")
    comp = model_size(cfg).params_by_component
    tp, ep, cp = 2, 8, got["cp"]
    world = nodes * 8
    # Megatron keeps the RMSNorm weights and the MoE routers whole on every TP rank (the
    # dry run counts what each rank's built modules hold: tests/test_dry_run.py).
    replicated = comp["norm"] + comp["router"]
    dense_gpu = (sum(comp.values()) - comp["expert"] - replicated) / tp + replicated
    expert_gpu = comp["expert"] / ep  # expert TP 1
    dp, edp = world // (tp * cp), world // ep
    assert got["weights"] == pytest.approx(2 * (dense_gpu + expert_gpu), rel=1e-9)
    assert got["teacher"] == got["weights"] and got["gradients"] == pytest.approx(4 * (dense_gpu + expert_gpu), rel=1e-9)
    assert got["optimizer"] == pytest.approx(12 * (dense_gpu / (dp * cp) + expert_gpu / edp), rel=1e-9)
    assert got["logits"] == pytest.approx(2 * 4 * 1024 * cfg.vocab_size / tp, rel=1e-9)
    tokens = seq // cp  # micro batch 1, no pipeline: one micro-batch in flight
    if recompute == "none":
        per_token = sum(cfg.hybrid_pattern.count(t) * layer_activation_elements(cfg, t, tp, True, cp) for t in "M*-E")
    else:  # every layer keeps its input (h / tp under SP), one layer is rebuilt at a time
        per_token = len(cfg.hybrid_pattern) * cfg.hidden_size / tp + max(
            layer_activation_elements(cfg, t, tp, True, cp) for t in set(cfg.hybrid_pattern))
    assert got["activations"] == pytest.approx(per_token * tokens * 2, rel=1e-9)
    parts = ("weights", "gradients", "optimizer", "teacher", "activations", "logits")
    assert got["total"] == pytest.approx(sum(got[k] for k in parts), rel=1e-12)


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
