"""Nested quantization: one set of scales for every budget, sliced quantized tensors that
are bit-for-bit sub-blocks of the parent's, exports equal to ModelOpt's own, the
dequantized slice equal to the fake-quantized elastic model, and refusals."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from conftest import preset, token_batch
from checkpoint_helpers import elastic_meta
from elastic_helpers import logits, masked_logits, randomised_model
from elastic_megatron.checkpoint import store
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.convert import hf_nemotron_h as hf
from elastic_megatron.convert.megatron_dist import DistCheckpointSource
from elastic_megatron.convert.tensors import SafetensorsSource, TensorSource
from elastic_megatron.elastic.reindex import prefix_index, reindex_source
from elastic_megatron.elastic.widths import full_widths, sub_model_config
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.quant import formats
from elastic_megatron.quant.export import EncodedSource, quant_config_fields, slice_encoded
from elastic_megatron.quant.hooks import QuantHooks, attach
from elastic_megatron.quant.recipes import check_block_alignment, linear_modules, quantized_modules
from elastic_megatron.slicing.zero_shot import slice_checkpoint

FORMATS = ("fp8", "nvfp4")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare encoded tensors by their bytes (FP8 NaN payloads and -0 included)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def calibration_batches(cfg) -> list[dict]:
    return [dict(zip(("tokens", "position_ids"), token_batch(cfg.vocab_size, 2, 32, seed=s))) for s in range(2)]


@pytest.fixture(scope="module")
def quant_ckpt(dist, tmp_path_factory):
    """A tiny elastic checkpoint whose budgets shrink hidden and MoE FFN in multiples of 16
    (recipes/elastic/tiny.yaml), and its scales per format calibrated at every budget."""
    cfg = preset("tiny")
    model = randomised_model(cfg, seed=5)
    full = full_widths(cfg)
    budgets = {"full": full, "medium": full.replace(hidden=48, moe_ffn=48), "small": full.replace(hidden=32, moe_ffn=32)}
    run_dir = tmp_path_factory.mktemp("quant") / "run"
    store.save_checkpoint(run_dir, model, None, None, 1, 0, elastic_meta(cfg, budgets))
    from elastic_megatron.quant.calibrate import calibrate_budgets

    records = {}
    for fmt in FORMATS:
        hooks = QuantHooks(model, fmt, "aggressive")
        calibrate_budgets(model, cfg, hooks, list(budgets.items()), calibration_batches(cfg))
        records[fmt] = hooks.record()
        hooks.remove()
    return run_dir, cfg, model, budgets, records


def test_recipe_keeps_what_modelopt_keeps_in_bf16():
    cfg = preset("tiny")
    linears = linear_modules(cfg)
    for fmt in FORMATS:
        on = set(quantized_modules(linears, fmt, "aggressive"))
        assert not any("self_attention" in m for m in on)  # attention stays BF16
        assert {"decoder.layers.0.mixer.in_proj", "decoder.layers.0.mixer.out_proj", "decoder.layers.4.mlp.linear_fc1",
                "decoder.layers.2.mlp.experts.local_experts.7.linear_fc2", "decoder.layers.2.mlp.shared_experts.linear_fc1"} <= on
        conservative = set(quantized_modules(linears, fmt, "conservative"))
        assert conservative == {m for m in on if ".mixer." not in m}


def observed_input_amax(model, cfg, budgets: dict, batches: list[dict], names) -> dict[str, float]:
    """max |input| each linear in `names` sees over `batches` run at every budget of
    `budgets` (hard masks), read by forward pre-hooks behind the masks' own hooks: what
    the one input scale of each linear must cover."""
    from elastic_megatron.elastic.masks import ElasticHooks, hard_masks

    elastic = ElasticHooks(model, cfg)
    seen: dict[str, float] = {}

    def observe(name):
        def hook(module, args):
            if args[0].numel():  # an expert no token was routed to sees nothing
                seen[name] = max(seen.get(name, 0.0), float(args[0].detach().abs().max()))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(observe(n)) for n in names]
    try:
        with torch.no_grad():
            for w in budgets.values():
                elastic.set(hard_masks(cfg, w))
                for b in batches:
                    model(b["tokens"], b["position_ids"], None)
    finally:
        for h in handles:
            h.remove()
        elastic.remove()
    # The routed experts of a MoE layer share one input scale: the max over them.
    group = lambda n: re.sub(r"local_experts\.\d+\.", "local_experts.*.", n)  # noqa: E731
    shared: dict[str, float] = {}
    for n, v in seen.items():
        shared[group(n)] = max(shared.get(group(n), 0.0), v)
    return {n: shared[group(n)] for n in names}


def test_scales_are_one_set_for_all_budgets(quant_ckpt):
    """Weight amax is the parent's whole weight; input amax is the max over the
    calibration batches run at EVERY budget (a calibration of the full budget alone
    would miss the larger activations of the smaller budgets, whose norms normalise
    over fewer channels); the experts of a MoE layer share one."""
    _, cfg, model, budgets, records = quant_ckpt
    batches = calibration_batches(cfg)
    for fmt, record in records.items():
        amax = record["amax"]
        inputs = [n for n, a in amax.items() if "input" in a]
        assert len(inputs) > 20
        for name, a in amax.items():
            weight = dict(model.named_parameters())[f"{name}.weight"]
            assert a["weight"] == float(weight.detach().abs().max())
        every = observed_input_amax(model, cfg, budgets, batches, inputs)
        full_only = observed_input_amax(model, cfg, {"full": budgets["full"]}, batches, inputs)
        assert {n: amax[n]["input"] for n in inputs} == every
        # The smaller budgets raise the scale of some linears above what the full model sees.
        assert sum(every[n] > full_only[n] for n in inputs) >= 5
        experts = [a["input"] for n, a in amax.items() if ".local_experts." in n and n.startswith("decoder.layers.2.") and n.endswith("fc1")]
        assert len(experts) == cfg.moe_num_experts and len(set(experts)) == 1  # one activation scale per MoE layer


@pytest.mark.parametrize("fmt", FORMATS)
def test_sliced_quantized_tensors_are_sub_blocks_of_the_parents(quant_ckpt, fmt):
    run_dir, cfg, _, budgets, records = quant_ckpt
    record = records[fmt]
    src = DistCheckpointSource(run_dir)
    encoded = EncodedSource(src, record)
    parent = {n: encoded.get(n) for n in encoded.names() if n.rsplit(".", 1)[0] in encoded.quantized or n.endswith(("_scale", "_scale_2"))}
    for name, w in budgets.items():
        index = prefix_index(cfg, w)
        sliced = slice_encoded(cfg, index, encoded)
        bf16 = reindex_source(cfg, index, src)
        checked = 0
        for module in sorted(encoded.quantized):
            got = {s: sliced.get(f"{module}.{s}") for s in ("weight", "weight_scale", "input_scale")}
            # (1) Quantizing the budget's own weight with the parent's scale gives the same bits.
            alone = formats.encode_weight(fmt, bf16.get(f"{module}.weight"), torch.tensor(record["amax"][module]["weight"]))
            for part in ("weight", "weight_scale"):
                assert torch.equal(bits(got[part]), bits(alone[part])), (name, module, part)
            # (2) ...which is the top-left sub-block of the parent's encoded tensors for the
            # prefix-sliced experts and MLPs (rows: output channels, columns: whole blocks).
            rows, cols = bf16.spec(f"{module}.weight").shape
            p_w, p_s = parent[f"{module}.weight"], parent[f"{module}.weight_scale"]
            if ".mlp." in module:
                per_byte = 2 if fmt == "nvfp4" else 1
                assert torch.equal(got["weight"].view(torch.uint8), p_w[:rows, : cols // per_byte].view(torch.uint8))
                if fmt == "nvfp4":
                    assert torch.equal(got["weight_scale"].view(torch.uint8), p_s[:rows, : cols // formats.BLOCK].view(torch.uint8))
            if fmt == "nvfp4":
                assert torch.equal(sliced.get(f"{module}.weight_scale_2"), parent[f"{module}.weight_scale_2"])
            else:
                assert torch.equal(got["weight_scale"], p_s)  # the per-tensor scale is the parent's
            assert torch.equal(got["input_scale"], parent[f"{module}.input_scale"])
            checked += 1
        assert checked == len(encoded.quantized) > 20


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_bytes_equal_modelopts_exporter(fmt):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.quant_utils import get_quant_config
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight

    torch.manual_seed(3)
    w, x = torch.randn(48, 64) * 0.05, torch.randn(8, 64) * 2
    linear = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    with torch.no_grad():
        linear[0].weight.copy_(w)
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG if fmt == "fp8" else mtq.NVFP4_DEFAULT_CFG)
    linear = mtq.quantize(linear, cfg, None)
    linear[0].weight_quantizer.amax = w.abs().max()
    linear[0].input_quantizer.amax = x.abs().max()
    expected_config = get_quant_config(linear)
    _export_quantized_weight(linear[0], torch.float32)  # our checkpoints export from fp32 masters
    theirs = {k: v for k, v in linear[0].state_dict().items() if "quantizer" not in k}
    ours = formats.encode_weight(fmt, w, w.abs().max())
    ours["input_scale"] = formats.tensor_scale(fmt, x.abs().max())
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        assert v.dtype == ours[k].dtype and v.shape == ours[k].shape, k
        assert torch.equal(bits(v), bits(ours[k])), k
    # The exported config carries ModelOpt's fields.
    hf_quant, qc = quant_config_fields(preset("tiny"), {"format": fmt, "recipe": "aggressive", "modelopt": "x"})
    q = hf_quant["quantization"]
    assert {k: v for k, v in q.items() if k != "exclude_modules"} == {k: v for k, v in expected_config["quantization"].items() if k != "exclude_modules"}
    assert "lm_head" in q["exclude_modules"] and "backbone.layers.1.mixer.q_proj" in q["exclude_modules"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == q["quant_algo"] and qc["ignore"] == q["exclude_modules"]


class Dequantized(TensorSource):
    """The tensors of a quantized HF export with every packed weight dequantized."""

    def __init__(self, base: SafetensorsSource, fmt: str):
        self.base, self.fmt = base, fmt
        names = set(base.names())
        self.quantized = {n for n in names if n.endswith(".weight") and n[: -len("weight")] + "weight_scale" in names}

    def names(self):
        return [n for n in self.base.names() if not n.endswith(("_scale", "_scale_2"))]

    def _get(self, name, meta):
        if name not in self.quantized:
            return self.base._get(name, meta).float()
        stem = name[: -len("weight")]
        parts = {s: self.base.get(stem + s) for s in ("weight", "weight_scale", "weight_scale_2") if stem + s in set(self.base.names())}
        out = formats.decode_weight(self.fmt, parts)
        return out.to("meta") if meta else out


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_slice_gives_the_fake_quantized_elastic_models_logits(quant_ckpt, tmp_path, fmt):
    run_dir, cfg, model, budgets, records = quant_ckpt
    record = records[fmt]
    out = slice_checkpoint(run_dir, tmp_path / "small", "small", precision=fmt, fmt="hf", scales=record)
    w = budgets["small"]
    sub_cfg = sub_model_config(cfg, w, name=f"{cfg.name}_small")
    files = SafetensorsSource(out)
    import json

    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "modelopt" and (out / "hf_quant_config.json").exists()
    sliced = build_model(sub_cfg).eval()
    flat = hf.hf_to_flat(Dequantized(files, fmt), sub_cfg)
    sliced.load_state_dict({n: flat.get(n) for n in flat.names()}, strict=False)
    from elastic_megatron.quant.export import sliced_record

    hooks = attach(sliced, sliced_record(cfg, prefix_index(cfg, w), record), fmt, "aggressive")
    for name, q in hooks.weight_q.items():
        q.disable()  # the weights are already the dequantized packed values
        assert torch.equal(files.get(hf.hf_linear_names(name)[0] + ".input_scale"), formats.tensor_scale(fmt, hooks.input_q[name].amax))
    # The reference: the parent with fake quantization at the budget's masks, its BF16-kept
    # tensors rounded like the export's.
    reference = randomised_model(cfg, seed=5)
    ref_hooks = attach(reference, record, fmt, "aggressive")
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name[: -len(".weight")] not in ref_hooks.modules:
                p.copy_(p.bfloat16().float())
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=40)
    expected = masked_logits(reference, cfg, w, ids, pos)
    got = logits(sliced, ids, pos)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    # And quantization is not a no-op at this budget.
    ref_hooks.remove()
    assert (masked_logits(reference, cfg, w, ids, pos) - expected).abs().max().item() > 1e-3


def test_refusals_name_the_problem_and_write_nothing(quant_ckpt, tmp_path):
    run_dir, cfg, _, _, records = quant_ckpt
    with pytest.raises(ConfigError, match="--precision"):
        slice_checkpoint(run_dir, tmp_path / "int4", "small", precision="int4", fmt="hf")
    assert not (tmp_path / "int4").exists()
    # A budget whose Mamba head channels are not whole blocks of 16.
    with pytest.raises(ConfigError, match="multiple of 16"):
        check_block_alignment(cfg, "nvfp4", "aggressive", {"mamba_head_dim": [8]}, "quant.format")
    check_block_alignment(cfg, "nvfp4", "conservative", {"mamba_head_dim": [8]}, "quant.format")  # Mamba kept BF16
    check_block_alignment(cfg, "fp8", "aggressive", {"hidden": [40]}, "quant.format")  # one scale per tensor
    with pytest.raises(ConfigError, match="hidden"):
        check_block_alignment(cfg, "nvfp4", "aggressive", {"hidden": [40]}, "quant.format")
    # PTQ of a checkpoint that records no training data.
    with pytest.raises(ConfigError, match="training data"):
        slice_checkpoint(run_dir, tmp_path / "ptq", "small", precision="fp8", fmt="hf")
    assert not (tmp_path / "ptq").exists()
